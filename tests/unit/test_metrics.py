"""gIoU / cIoU with LISA semantics, top-k and oracle, per category: hand-computed numbers."""

import numpy as np
import pytest

from rea2seg_ray.eval.metrics import aggregate, score_query
from rea2seg_ray.masks import IGNORE, encode_rle, mask_bbox
from rea2seg_ray.records import Candidate, Prediction


def _pred(qid, masks, status="ok"):
    cands = [
        Candidate(mask=encode_rle(m), bbox=mask_bbox(m), area=int(m.sum()), rank=i, score=1 - i / 10)
        for i, m in enumerate(masks)
    ]
    return Prediction(query_id=qid, status=status, mask=cands[0].mask if cands else None, candidates=cands)


def _box(h, w, y0, y1, x0, x1, value=True):
    m = np.zeros((h, w), bool if value is True else np.uint8)
    m[y0:y1, x0:x1] = value
    return m


def test_giou_ciou_topk_oracle_by_hand():
    # q1: GT 4x4=16 px; ranked candidates: IoU 4/16, then exact (IoU 1), then disjoint.
    gt1 = _box(10, 10, 0, 4, 0, 4, 1)
    c_quarter, c_exact, c_far = _box(10, 10, 0, 2, 0, 2), _box(10, 10, 0, 4, 0, 4), _box(10, 10, 8, 10, 8, 10)
    # q2: GT 2x3 = 6 px, failed query -> I=0, U=6.
    gt2 = _box(10, 10, 5, 7, 5, 8, 1)
    # q3: nothing to find, nothing predicted -> IoU 1, I=U=0.
    gt3 = np.zeros((10, 10), np.uint8)
    s1 = score_query(_pred("q1", [c_quarter, c_far, c_exact, c_far]), gt1, "a", "q1", k=3)
    s2 = score_query(_pred("q2", [], status="error"), gt2, "a", "q2", k=3)
    s3 = score_query(_pred("q3", [np.zeros((10, 10), bool)]), gt3, "b", "q3", k=3)
    assert s1.iu == {"top1": (4, 16), "top3": (16, 16), "oracle": (16, 16)}
    assert s2.iu["top1"] == (0, 6) and not s2.ok
    assert s3.iu["top1"] == (0, 0) and s3.iou("top1") == 1.0
    m = aggregate([s1, s2, s3], k=3)
    assert m["n"] == 3 and m["n_error"] == 1
    assert m["top1"]["giou"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert m["top1"]["ciou"] == pytest.approx(4 / 22)
    assert m["top3"]["giou"] == pytest.approx((1 + 0 + 1) / 3)
    assert m["top3"]["ciou"] == pytest.approx(16 / 22)
    assert m["oracle"] == m["top3"]
    assert m["by_category"]["a"]["n"] == 2
    assert m["by_category"]["a"]["top1"]["giou"] == pytest.approx(0.125)
    assert m["by_category"]["b"]["top1"] == {"giou": 1.0, "ciou": 1.0}


def test_top_k_respects_k_and_ignore_pixels():
    gt = _box(6, 6, 0, 2, 0, 2, 1)
    gt[2:4, 0:2] = IGNORE
    exact_plus_ignore = _box(6, 6, 0, 4, 0, 2)  # covers target and ignore rows: ignore is excluded -> IoU 1
    wrong = _box(6, 6, 5, 6, 5, 6)
    s = score_query(_pred("q", [wrong, wrong, wrong, exact_plus_ignore]), gt, "", "q", k=3)
    assert s.iou("top1") == 0.0 and s.iou("top3") == 0.0 and s.iou("oracle") == 1.0
    assert aggregate([s])["by_category"].keys() == {"all"}


def test_missing_prediction_counts_as_failure_and_size_mismatch_is_clear():
    gt = _box(4, 4, 0, 2, 0, 2, 1)
    assert score_query(None, gt, "c", "q", k=3).iu["top1"] == (0, 4)
    with pytest.raises(ValueError, match="original image size"):
        score_query(_pred("q", [np.ones((5, 4), bool)]), gt, "c", "q")


def test_evaluation_streams_predictions_and_keeps_the_datasets_order(tmp_path):
    """Predictions are read file by file: a query predicted in a later file, one predicted twice (the last row
    wins), one never predicted (IoU 0) and a prediction for a query outside the dataset (ignored)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rea2seg_ray.eval.report import evaluate_predictions
    from rea2seg_ray.records import PREDICTIONS_SCHEMA

    gt = _box(10, 10, 0, 4, 0, 4)
    half = _box(10, 10, 0, 2, 0, 4)
    lines = [{"query_id": q, "image": "x.png", "question": "?", "category": "a", "gt_mask": encode_rle(gt)}
             for q in ("q1", "q2", "q3")]  # fmt: skip
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    preds = tmp_path / "predictions"
    preds.mkdir()

    def write(name, rows):
        pq.write_table(
            pa.Table.from_pylist([r.to_row() for r in rows], schema=PREDICTIONS_SCHEMA), preds / name
        )

    write("a.parquet", [_pred("q3", [half]), _pred("q1", [half]), _pred("other", [gt])])
    write("b.parquet", [_pred("q1", [gt])])  # q1 again: this row wins
    metrics, scores = evaluate_predictions(str(preds), str(tmp_path / "data.jsonl"), k=3)
    assert [(s.query_id, s.iou("top1"), s.ok) for s in scores] == [("q1", 1.0, True), ("q2", 0.0, False),
                                                                   ("q3", 0.5, True)]  # fmt: skip
    assert metrics["n"] == 3 and metrics["n_error"] == 1 and metrics["top1"]["giou"] == pytest.approx(0.5)


def test_an_input_without_ground_truth_is_refused_before_any_prediction_is_read(tmp_path):
    """The segmentation job evaluates by default: on ten million unannotated images it must stop at the first
    query, not read the whole output first (here the predictions do not even exist)."""
    from rea2seg_ray.datasets import DatasetError
    from rea2seg_ray.eval.report import evaluate_predictions

    (tmp_path / "data.jsonl").write_text('{"query_id": "q1", "image": "x.png", "question": "?"}\n')
    with pytest.raises(DatasetError, match="q1 .* has no ground truth"):
        evaluate_predictions(str(tmp_path / "missing"), str(tmp_path / "data.jsonl"))
