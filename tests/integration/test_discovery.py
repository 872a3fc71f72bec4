"""Candidate discovery with the tiny models on CPU (real transformers + segment_anything code paths)."""

import numpy as np
import pytest
import torch
from PIL import Image

from rea2seg_ray.config import AttentionConfig, DiscoveryConfig, ModelsConfig
from rea2seg_ray.datasets import SAMPLE_SCENES, read_queries
from rea2seg_ray.discovery.attention import AttentionMapper
from rea2seg_ray.discovery.discoverer import Discoverer, DiscoveryError
from rea2seg_ray.discovery.sam_prompts import SamPrompter
from rea2seg_ray.masks import decode_rle, rle_iou_matrix
from rea2seg_ray.models.loading import load_sam, load_vlm
from rea2seg_ray.records import Query


@pytest.fixture(scope="module")
def vlm(model_cache):
    return load_vlm("tiny-qwen2-vl")


@pytest.mark.parametrize("size", [(97, 161), (517, 333), (240, 320), (60, 700)])
def test_blob_planted_in_token_space_lands_on_the_right_pixels(vlm, size):
    """Overwrite the model's attention so the question attends to one image token only, and check the mapper
    puts that token on the pixels of the original image it covers (grid order, 2x2 merge, resize, x/y scales)."""
    model, processor = vlm
    h, w = size
    image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    mapper = AttentionMapper(model, processor, AttentionConfig(layers=[-1], smooth_sigma=0))
    inputs = processor(
        text=[mapper.adapter.prompt("q")], images=[Image.fromarray(image)], return_tensors="pt"
    )
    _, gh14, gw14 = inputs["image_grid_thw"][0].tolist()
    gh, gw = gh14 // 2, gw14 // 2
    r, c = gh - 1 if gh > 1 else 0, min(1, gw - 1)  # a cell off the main diagonal: catches transposed grids
    img_pos = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    target = int(img_pos[r * gw + c])

    def plant(_m, _a, out):
        weights = out[1].clone()
        weights[..., img_pos] = 0.0
        weights[..., target] = 1.0
        return (out[0], weights)

    handles = [layer.self_attn.register_forward_hook(plant) for layer in mapper.layers]
    try:
        (heat,) = mapper.heat_maps([image], ["q"])
    finally:
        for hd in handles:
            hd.remove()
    assert heat.grid.shape == (gh, gw) and (heat.height, heat.width) == (h, w)
    assert np.unravel_index(heat.grid.argmax(), heat.grid.shape) == (r, c)
    # The cell covers resized pixels [28c, 28c+28) x [28r, 28r+28); the resized image is the original scaled by
    # (gw*28)/w along x and (gh*28)/h along y.
    rw, rh = gw * 28, gh * 28
    x_lo, x_hi = 28 * c * w / rw, 28 * (c + 1) * w / rw
    y_lo, y_hi = 28 * r * h / rh, 28 * (r + 1) * h / rh
    x, y = heat.cell_center(r, c)
    assert x_lo < x < x_hi and y_lo < y < y_hi
    full = heat.to_image()
    ys, xs = np.nonzero(full >= full.max() - 1e-6)
    assert x_lo - 1 <= xs.min() and xs.max() <= x_hi + 1 and y_lo - 1 <= ys.min() and ys.max() <= y_hi + 1


def test_query_token_modes_and_layer_choice(vlm):
    model, processor = vlm
    image = np.asarray(Image.open(SAMPLE_SCENES / "scene-0-00000.jpg"))
    maps = {}
    for mode in ("question", "last_n", "generated"):
        mapper = AttentionMapper(model, processor, AttentionConfig(query_tokens=mode, generate_tokens=3))
        (maps[mode],) = mapper.heat_maps([image], ["Where is the white bar in this picture?"])
        assert np.isfinite(maps[mode].grid).all()
    assert not np.allclose(maps["question"].grid, maps["last_n"].grid)
    with pytest.raises(ValueError, match="out of range"):
        AttentionMapper(model, processor, AttentionConfig(layers=[5]))
    with pytest.raises(ValueError, match="query_tokens"):
        AttentionMapper(model, processor, AttentionConfig(query_tokens="everything"))


@pytest.fixture(scope="module")
def discoverer(model_cache):
    return Discoverer(DiscoveryConfig(max_candidates=5), ModelsConfig())


def _scene_batch(n):
    qs = list(read_queries(str(SAMPLE_SCENES / "manifest.jsonl")))[:n]
    return qs, [np.asarray(Image.open(q.image).convert("RGB")) for q in qs]


def test_every_query_gets_1_to_k_distinct_candidates_at_image_size(discoverer):
    qs, images = _scene_batch(6)
    # An odd-sized image and two queries sharing one image (embedded once).
    odd = np.random.default_rng(1).integers(0, 255, (97, 161, 3), dtype=np.uint8)
    qs += [Query("odd-a", "odd.png", "the bright spot"), Query("odd-b", "odd.png", "the dark corner")]
    images += [odd, odd]
    before = discoverer.counts["images"]
    results = discoverer.discover(qs, images)
    assert discoverer.counts["images"] - before == 7
    for q, im, cands in zip(qs, images, results, strict=True):
        assert not isinstance(cands, Exception), (q.query_id, cands)
        assert 1 <= len(cands) <= 5
        for c in cands:
            m = decode_rle(c.mask)
            assert m.shape == im.shape[:2] and c.area == int(m.sum()) > 0
            assert c.source.startswith("attention") and c.prior >= 0
        ious = rle_iou_matrix([c.mask for c in cands], [c.mask for c in cands])
        np.fill_diagonal(ious, 0)
        assert ious.max() <= 0.7
        assert [c.prior for c in cands] == sorted((c.prior for c in cands), reverse=True)


def test_conversation_query_is_a_real_dialogue_with_roles(discoverer):
    """A conversation reaches the MLLM as chat turns (roles kept, the image in the first user turn), and the
    attention rows are the dialogue's tokens after the image, through the last user turn."""
    qs, images = _scene_batch(1)
    turns = [
        {"role": "user", "content": "What shapes are there?"},
        {"role": "assistant", "content": "A bar, a hexagon and more."},
        {"role": "user", "content": "Segment the one that is white."},
        {"role": "assistant", "content": "(a trailing assistant turn is not part of the intent)"},
    ]
    conv = Query("c1", qs[0].image, conversation=turns)
    adapter = discoverer.mapper.adapter
    prompt = adapter.prompt(conv.dialogue())
    assert "<|im_start|>assistant\nA bar, a hexagon and more.<|im_end|>" in prompt
    assert prompt.index("<|vision_start|>") < prompt.index("What shapes are there?")
    assert prompt.endswith("Segment the one that is white.<|im_end|>\n<|im_start|>assistant\n")
    assert "trailing" not in prompt
    inputs = adapter.encode([Image.fromarray(images[0])], [prompt])
    (span,) = adapter.spans(inputs)
    text = adapter.processor.tokenizer.decode(inputs["input_ids"][0][span.question])
    assert text.startswith("What shapes are there?") and text.endswith("Segment the one that is white.")
    (cands,) = discoverer.discover([conv], images)
    assert len(cands) >= 1


def test_given_and_automatic_sources(model_cache):
    qs, images = _scene_batch(2)
    d = Discoverer(DiscoveryConfig(sources=["given"], max_candidates=8, nms_iou=0.9), ModelsConfig())
    assert d.mapper is None and d.prompter is None  # given candidates need neither the MLLM nor SAM
    results = d.discover(qs, images)
    for q, cands in zip(qs, results, strict=True):
        assert len(cands) == len(q.candidates)
        assert {c.mask["counts"] for c in cands} == {r["counts"] for r in q.candidates}
        assert all(c.source == "given" for c in cands)
    d2 = Discoverer(
        DiscoveryConfig(sources=["automatic"], automatic_points_per_side=4, max_candidates=6), ModelsConfig()
    )
    (cands,) = d2.discover(qs[:1], images[:1])
    assert 1 <= len(cands) <= 6 and all(c.source == "automatic" for c in cands)
    with pytest.raises(ValueError, match="discovery.sources"):
        Discoverer(DiscoveryConfig(sources=["magic"]), ModelsConfig())


def test_text_box_prompt_reaches_sam(model_cache):
    sam = load_sam("tiny-sam")
    prompter = SamPrompter(sam)
    image = np.random.default_rng(2).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    (emb,) = prompter.embed([image])
    (m,) = prompter.predict_box_and_points(emb, [20.0, 30.0, 120.0, 90.0], [(70.0, 60.0)])
    assert m.mask.shape == (120, 200) and m.source == "text_box"


def test_a_bad_given_mask_fails_only_its_query(model_cache):
    qs, images = _scene_batch(2)
    qs[0].candidates = [{"size": [5, 5], "counts": "25"}]  # wrong size
    d = Discoverer(DiscoveryConfig(sources=["attention", "given"]), ModelsConfig())
    bad, good = d.discover(qs, images)
    assert isinstance(bad, DiscoveryError) and "given candidate mask is 5x5" in str(bad)
    assert len(good) >= 1 and not isinstance(good, Exception)


def test_runs_in_fp32_on_cpu(discoverer):
    assert discoverer.device == "cpu" and discoverer.dtype == torch.float32
    assert discoverer.mapper.model.dtype == torch.float32


def test_coarse_to_fine_context_pass_crops_and_maps_back(model_cache, tmp_path):
    """discovery.context: the second pass runs inside the first pass's context region, and its candidates come
    back at full size, inside that region, merged with the first pass's (no two above the NMS threshold)."""
    from rea2seg_ray.datasets.synthetic import SMALL_TARGET, write_scenes

    write_scenes(tmp_path, 3, seed=5, width=480, height=360, categories=[SMALL_TARGET])
    qs = list(read_queries(str(tmp_path / "scenes.jsonl")))
    images = [np.asarray(Image.open(q.image).convert("RGB")) for q in qs]
    d = Discoverer(
        DiscoveryConfig(context=True, context_max_area=0.9, sources=["attention", "given"]), ModelsConfig()
    )
    first, heats, boxes = d._discover_pass(qs, images)
    crops = [d.context_box(h, b, 360, 480) for h, b in zip(heats, boxes, strict=True)]
    results = d.discover(qs, images)
    assert d.counts["context_crops"] == sum(c is not None for c in crops) > 0
    for res, crop, one in zip(results, crops, first, strict=True):
        assert isinstance(res, list) and 1 <= len(res) <= d.cfg.max_candidates
        inside = [c for c in res if c.source.startswith("context_")]
        assert crop is not None or not inside
        for c in inside:
            m = decode_rle(c.mask)
            assert m.shape == (360, 480)
            x0, y0, x1, y1 = crop
            assert m[y0:y1, x0:x1].sum() == m.sum() > 0  # every pixel inside the crop it came from
        assert not any(
            c.source == "context_given" for c in res
        )  # full-size given masks stay in the first pass
        iou = rle_iou_matrix([c.mask for c in res], [c.mask for c in res])
        assert (iou[~np.eye(len(res), dtype=bool)] <= d.cfg.nms_iou + 1e-9).all()
        assert {c.mask["counts"] for c in one} & {c.mask["counts"] for c in res} or inside
