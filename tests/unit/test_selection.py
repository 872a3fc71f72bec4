"""Multi-object answers: which candidates are selected, the union written, instance precision / recall, and
multi-target ground truth from manifests and synthetic scenes."""

import json

import numpy as np
import pytest

from rea2seg_ray.config import ScoringConfig
from rea2seg_ray.datasets import DatasetError, ground_truth_instances, load_ground_truth, read_queries
from rea2seg_ray.datasets.synthetic import COLOURS, MULTI_TARGET, write_scenes
from rea2seg_ray.eval.metrics import aggregate, match_instances, score_query
from rea2seg_ray.masks import decode_rle, encode_rle, mask_bbox
from rea2seg_ray.records import Candidate, Prediction
from rea2seg_ray.scoring.prompts import parse_count
from rea2seg_ray.scoring.scorer import rerank, select_ranks


def _box(y0, y1, x0, x1, shape=(40, 60)):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def _cands(masks, scores):
    cands = [Candidate(mask=encode_rle(m), bbox=mask_bbox(m), area=int(m.sum()), score=s) for m, s in
             zip(masks, scores, strict=True)]  # fmt: skip
    return rerank(cands)


def test_select_top1_threshold_count():
    ranked = _cands([_box(0, 5, 0, 5)] * 4, [0.2, 0.9, 0.55, float("nan")])
    assert [c.score for c in ranked][:3] == [0.9, 0.55, 0.2]
    assert select_ranks(ranked, "top1") == [0]
    assert select_ranks(ranked, "threshold", 0.5) == [0, 1]
    assert select_ranks(ranked, "threshold", 0.95) == [0]  # never empty: at least the best
    assert select_ranks(ranked, "count", count=3) == [0, 1, 2]
    assert select_ranks(ranked, "count", count=9) == [0, 1, 2, 3]
    assert select_ranks([], "threshold") == []
    assert (
        parse_count('{"count": 3}', 8) == 3
        and parse_count("2 objects", 8) == 2
        and parse_count('{"count": 12}', 8) == 8
    )
    with pytest.raises(ValueError, match="scoring.select must be"):
        ScoringConfig(select="all")


def test_predictions_mask_is_the_union_of_the_selected():
    pytest.importorskip("ray")
    from rea2seg_ray.pipeline.stages import to_predictions
    from rea2seg_ray.records import PREDICTIONS_SCHEMA, predictions_table

    a, b, c = _box(0, 10, 0, 10), _box(20, 30, 20, 30), _box(5, 15, 40, 55)
    ranked = _cands([a, b, c], [0.9, 0.7, 0.1])
    q = {"query_id": "q", "image": "x.jpg", "question": "all the boxes", "category": "multi-target", "error": None,
         "error_stage": None, "found": [x.to_row() for x in ranked], "selected": [0, 1]}  # fmt: skip
    row = {"queries": [q], "height": 40, "width": 60, "error": None, "error_stage": None}
    from rea2seg_ray.config import ModelsConfig

    (p,) = to_predictions([row], ModelsConfig(), "run")
    assert (
        p.selected == [0, 1] and np.array_equal(decode_rle(p.mask), a | b) and p.score == pytest.approx(0.9)
    )
    t = predictions_table([p])
    assert t.schema.field("selected").type == PREDICTIONS_SCHEMA.field("selected").type
    assert t.to_pylist()[0]["selected"] == [0, 1]
    q["selected"] = None  # a stage that chose nothing: the top candidate, as before the column existed
    (p,) = to_predictions([row], ModelsConfig(), "run")
    assert p.selected == [0] and p.mask == ranked[0].mask


def test_instance_precision_recall_on_known_matches():
    g1, g2, g3 = _box(0, 10, 0, 10), _box(20, 30, 20, 30), _box(0, 10, 40, 50)
    gt = (g1 | g2 | g3).astype(np.uint8)
    near_g1 = _box(0, 10, 0, 8)  # IoU 0.8 with g1
    half_g2 = _box(20, 30, 20, 24)  # IoU 0.4 with g2: no match
    extra = _box(32, 38, 0, 6)  # matches nothing
    assert match_instances([near_g1, half_g2, extra], [g1, g2, g3]) == 1
    assert match_instances([g1, g1], [g1]) == 1  # an instance is matched once
    ranked = _cands([near_g1, half_g2, extra, g3], [0.9, 0.8, 0.7, 0.1])
    union = near_g1 | half_g2 | extra
    pred = Prediction(query_id="q", height=40, width=60, mask=encode_rle(union), score=0.9, candidates=ranked,
                      selected=[0, 1, 2])  # fmt: skip
    s = score_query(pred, gt, "multi-target", "q", instances=[g1, g2, g3])
    assert s.instances == (1, 3, 3)
    miss = score_query(None, gt, "multi-target", "r", instances=[g1, g2, g3])
    assert miss.instances == (0, 0, 3)
    m = aggregate([s, miss])
    assert m["instances"] == {"precision": pytest.approx(1 / 3), "recall": pytest.approx(1 / 6), "matched": 1,
                              "selected": 3, "instances": 6}  # fmt: skip
    inter = int((union & (gt == 1)).sum())
    assert m["pixels"]["precision"] == pytest.approx(inter / union.sum())
    assert m["pixels"]["recall"] == pytest.approx(inter / (2 * gt.sum()))
    assert m["by_category"]["multi-target"]["instances"]["matched"] == 1


def test_multi_target_ground_truth_from_a_manifest(tmp_path):
    g1, g2 = _box(0, 10, 0, 10), _box(20, 30, 20, 30)
    rows = [{"query_id": "a", "image": "x.jpg", "question": "both boxes", "gt_instances": [encode_rle(g1), encode_rle(g2)]},
            {"query_id": "b", "image": "x.jpg", "question": "bad", "gt_instances": [{"size": [1]}]}]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match="'gt_instances' must be a non-empty list of COCO RLEs"):
        list(read_queries(str(tmp_path / "m.jsonl")))
    a, b = list(read_queries(str(tmp_path / "m.jsonl"), strict=False))
    assert "gt_instances" in b.meta["error"]
    gt = load_ground_truth(a)
    assert np.array_equal(gt == 1, g1 | g2)
    inst = ground_truth_instances(a, gt)
    assert len(inst) == 2 and np.array_equal(inst[1], g2)


def test_multi_target_scenes_ask_for_every_object_of_a_colour(tmp_path):
    manifest = write_scenes(tmp_path, 6, seed=3, categories=[MULTI_TARGET])
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for q, row in zip(read_queries(str(manifest)), rows, strict=True):
        words = q.question.replace("?", " ").replace(".", " ").split()
        colour = next(w for w in words if w in COLOURS)
        named = [d for d in row["candidate_descriptions"] if d.startswith(colour + " ")]
        assert 2 <= len(q.gt_instances) == len(named) <= 3 and q.category == MULTI_TARGET
        gt = load_ground_truth(q)  # from the LISA JSON: every target's polygons
        assert np.array_equal(gt == 1, np.logical_or.reduce([decode_rle(r) for r in q.gt_instances]))
        assert all(n in row["reasoning"] for n in named)
