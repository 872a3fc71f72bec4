"""Heat map -> prompts with planted maps: peaks and boxes land where planted, odd sizes and aspect ratios too."""

import numpy as np
import pytest

from rea2seg_ray.discovery.merge import RawCandidate, merge_candidates, parse_box_answer
from rea2seg_ray.discovery.prompts import HeatMap, blob_boxes, coldest_points, find_peaks
from rea2seg_ray.masks import decode_rle, rle_iou_matrix


def _gauss(gh, gw, centres, sigma=0.8):
    yy, xx = np.mgrid[0:gh, 0:gw]
    g = np.zeros((gh, gw), np.float32)
    for r, c, a in centres:
        g += a * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * sigma**2))
    return g


@pytest.mark.parametrize("size", [(97, 161), (517, 333), (240, 320), (1000, 37)])
def test_peaks_land_on_planted_cells_in_original_pixels(size):
    h, w = size
    gh, gw = 9, 13
    heat = HeatMap(_gauss(gh, gw, [(2, 3, 1.0), (6, 10, 0.7)]), h, w)
    peaks = find_peaks(heat, k=5, min_distance=1, rel_threshold=0.3)
    assert len(peaks) == 2
    (x0, y0, v0), (x1, y1, v1) = peaks
    assert v0 == pytest.approx(1.0) and v1 < v0
    sx, sy = w / gw, h / gh
    assert x0 == pytest.approx(3.5 * sx) and y0 == pytest.approx(2.5 * sy)
    assert x1 == pytest.approx(10.5 * sx) and y1 == pytest.approx(6.5 * sy)
    # The upsampled map peaks inside the planted cell too.
    full = heat.to_image()
    assert full.shape == (h, w)
    ry, rx = np.unravel_index(full.argmax(), full.shape)
    assert 3 * sx - 1 <= rx <= 4 * sx + 1 and 2 * sy - 1 <= ry <= 3 * sy + 1


def test_min_distance_and_threshold_suppress_neighbours():
    g = np.zeros((10, 10), np.float32)
    g[5, 5], g[5, 7], g[1, 1], g[8, 1] = 1.0, 0.9, 0.5, 0.1
    heat = HeatMap(g, 100, 100)
    assert [(round(x), round(y)) for x, y, _ in find_peaks(heat, 5, min_distance=2, rel_threshold=0.3)] == [
        (55, 55),
        (15, 15),
    ]
    assert len(find_peaks(heat, 5, min_distance=1, rel_threshold=0.3)) == 3
    assert len(find_peaks(heat, 1, min_distance=1, rel_threshold=0.0)) == 1
    flat = HeatMap(np.ones((4, 6), np.float32), 40, 60)
    assert find_peaks(flat, 3)[0][:2] == (35.0, 25.0)  # a flat map falls back to its centre cell


def test_negative_points_come_from_the_coldest_cells():
    g = np.ones((6, 6), np.float32)
    g[0, 5] = -3.0
    ((x, y),) = coldest_points(HeatMap(g, 60, 120), 1)
    assert (x, y) == (5.5 * 20, 0.5 * 10)


def test_boxes_surround_planted_blobs_with_separate_x_y_scales():
    g = np.zeros((8, 12), np.float32)
    g[1:3, 2:5] = 1.0  # 2x3 cells
    g[5:8, 9:11] = 0.8
    heat = HeatMap(g, 97, 161)  # sx = 161/12, sy = 97/8
    boxes = blob_boxes(heat, threshold=0.5, max_boxes=3)
    assert len(boxes) == 2
    sx, sy = 161 / 12, 97 / 8
    assert boxes[0][0] == pytest.approx([2 * sx, 1 * sy, 5 * sx, 3 * sy])
    assert boxes[1][0] == pytest.approx([9 * sx, 5 * sy, 11 * sx, 97])  # clipped at the bottom edge
    assert boxes[0][1] > boxes[1][1]


def test_mass_in_mask():
    g = np.zeros((4, 4), np.float32)
    g[0, 0] = 1.0
    heat = HeatMap(g, 4, 4)
    m = np.zeros((4, 4), bool)
    m[0, 0] = True
    assert heat.mass_in(m) == pytest.approx(1.0)
    assert heat.mass_in(~m) == pytest.approx(0.0)


def test_merge_nms_cap_and_tiny_mask_filter():
    h, w = 40, 40

    def box(y0, y1, x0, x1):
        m = np.zeros((h, w), bool)
        m[y0:y1, x0:x1] = True
        return m

    raw = [
        RawCandidate(box(0, 10, 0, 10), "a", 0.9),
        RawCandidate(box(0, 10, 0, 11), "b", 0.8),  # near-duplicate of the first
        RawCandidate(box(20, 30, 20, 30), "c", 0.5),
        RawCandidate(box(35, 37, 35, 37), "tiny", 0.99),  # 4 px
        RawCandidate(np.ones((h, w), bool), "everything", 0.95),  # whole image
        RawCandidate(box(12, 18, 0, 30), "d", 0.4),
    ]
    out = merge_candidates(raw, k=2, nms_iou=0.7, min_area=16)
    assert [c.source for c in out] == ["a", "c"]
    out = merge_candidates(raw, k=8, nms_iou=0.7, min_area=16)
    assert [c.source for c in out] == ["a", "c", "d"]
    ious = rle_iou_matrix([c.mask for c in out], [c.mask for c in out])
    np.fill_diagonal(ious, 0)
    assert ious.max() <= 0.7
    assert (
        decode_rle(out[0].mask).shape == (h, w)
        and out[0].area == 100
        and out[0].bbox == [0.0, 0.0, 10.0, 10.0]
    )
    # Nothing passes the filters: the best non-empty mask is still returned.
    only_tiny = merge_candidates([RawCandidate(box(0, 2, 0, 2), "tiny", 0.1)], k=3, nms_iou=0.7, min_area=16)
    assert [c.source for c in only_tiny] == ["tiny"]


def test_parse_seg_zero_style_answers():
    text = 'Thinking... the cup. {"bbox": [100, 200, 300, 400], "points": [[150, 250]]} done'
    box, pts = parse_box_answer(text, 500, 1000, "normalized_1000")
    assert box == [100.0, 100.0, 300.0, 200.0] and pts == [(150.0, 125.0)]
    box, _ = parse_box_answer('{"bbox": [28, 28, 56, 84]}', 100, 200, "resized", resized=(50, 100))
    assert box == [56.0, 56.0, 112.0, 100.0]
    assert parse_box_answer("no json here", 10, 10, "original") is None
    assert parse_box_answer('{"bbox": [5, 5, 5, 9]}', 10, 10, "original") is None  # zero width
    assert parse_box_answer('{"bbox": "x"}', 10, 10, "original") is None


def test_noun_phrases_from_the_concept_answer():
    from rea2seg_ray.discovery.merge import parse_noun_phrases

    answer = '1. the red circle\n2. "bottle opener", a knife; The Red Circle.'
    assert parse_noun_phrases(answer, 3) == ["the red circle", "bottle opener", "a knife"]
    assert parse_noun_phrases(answer, 1) == ["the red circle"]
    assert parse_noun_phrases("", 3) == [] and parse_noun_phrases(" . \n;", 3) == []
    # A long answer keeps its first words: SAM 3 reads at most 32 text tokens.
    assert parse_noun_phrases("the small red thing at the far left of the table", 3, max_words=4) == [
        "the small red thing"
    ]


def test_dialogue_messages_keep_roles_and_share_the_image_prefix():
    from rea2seg_ray.scoring.prompts import candidate_messages, dialogue_messages, dialogue_turns

    conv = [{"role": "human", "content": "I need a shape."}, {"role": "gpt", "content": "Which colour?"},
            {"role": "user", "content": "Red."}, {"role": "assistant", "content": "ignored"}]  # fmt: skip
    assert [t["role"] for t in dialogue_turns(conv)] == ["user", "assistant", "user"]
    assert dialogue_turns("Where is it?") == [{"role": "user", "content": "Where is it?"}]
    msgs = candidate_messages(conv, "overlay")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"][0] == {"type": "image"} and msgs[0]["content"][1]["text"] == "I need a shape."
    assert msgs[2]["content"][0]["text"] == "Question: Red.\n" and msgs[2]["content"][-1] == {"type": "image"}
    # a question is one user turn, exactly as before dialogues existed
    (one,) = candidate_messages("Where is it?", "overlay")
    assert [c.get("text", "image") for c in one["content"]][:2] == ["image", "Question: Where is it?\n"]
    braces = dialogue_messages("q", [], "{question} {{json}}", [])
    assert braces[0]["content"][0]["text"] == "q {json}"
