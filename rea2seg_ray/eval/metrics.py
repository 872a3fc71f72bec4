"""gIoU / cIoU with LISA's semantics, at top-1, top-k and oracle, overall and per category.

Per query: I and U of the predicted mask against ground truth, ignore (255) pixels excluded from both; an empty
union scores 1. gIoU = mean per-query IoU; cIoU = sum(I) / sum(U). Top-k: the best of the k highest-ranked
candidates; oracle: the best of all candidates. A failed (or missing) query scores I = 0, U = |GT|.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ..masks import decode_rle, intersection_union, iou_from_iu
from ..records import Prediction


@dataclass
class QueryScore:
    """I and U of one query at top-1, top-k and oracle."""

    query_id: str
    category: str
    ok: bool
    iu: dict[str, tuple[int, int]] = field(default_factory=dict)  # level -> (I, U)
    score: float | None = None  # the top-1 candidate's scorer score (None for a failed query)
    candidate_ious: list[float] = field(default_factory=list)  # each kept candidate's IoU, by rank
    candidate_scores: list[float] = field(default_factory=list)  # and its score, same order

    def iou(self, level: str) -> float:
        return iou_from_iu(*self.iu[level])


def _check_size(mask: np.ndarray, gt: np.ndarray, query_id: str) -> None:
    if mask.shape != gt.shape:
        raise ValueError(
            f"query {query_id}: predicted mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but the ground truth is "
            f"{gt.shape[1]}x{gt.shape[0]}; predictions must be at the original image size"
        )


def score_query(
    pred: Prediction | None, gt: np.ndarray, category: str, query_id: str, k: int = 3
) -> QueryScore:
    """Score one query. ``pred`` None or with status != ok counts as a failure (IoU 0)."""
    levels = ("top1", f"top{k}", "oracle")
    gt_area = int(np.count_nonzero(gt == 1))
    if pred is None or pred.status != "ok" or pred.mask is None:
        return QueryScore(query_id, category, False, {lv: (0, gt_area) for lv in levels})
    top1 = decode_rle(pred.mask)
    _check_size(top1, gt, query_id)
    iu1 = intersection_union(top1, gt)
    ranked = sorted(pred.candidates, key=lambda c: c.rank) if pred.candidates else []
    cand_iu = []
    for c in ranked:
        m = decode_rle(c.mask)
        _check_size(m, gt, query_id)
        cand_iu.append(intersection_union(m, gt))
    cand_ious = [iou_from_iu(*t) for t in cand_iu]
    cand_scores = [float(c.score) for c in ranked]
    if not cand_iu:
        cand_iu = [iu1]

    def best(ius: list[tuple[int, int]]) -> tuple[int, int]:
        return max(ius, key=lambda t: iou_from_iu(*t))

    return QueryScore(
        query_id, category, True, {"top1": iu1, f"top{k}": best(cand_iu[:k]), "oracle": best(cand_iu)},
        score=None if pred.score is None else float(pred.score), candidate_ious=cand_ious,
        candidate_scores=cand_scores,
    )  # fmt: skip


def _summary(scores: list[QueryScore], level: str) -> dict[str, float]:
    if not scores:
        return {"giou": 0.0, "ciou": 0.0}
    inter = sum(s.iu[level][0] for s in scores)
    union = sum(s.iu[level][1] for s in scores)
    return {
        "giou": float(np.mean([s.iou(level) for s in scores])),
        "ciou": float(inter / union) if union else 1.0,
    }


def aggregate(scores: Iterable[QueryScore], k: int = 3) -> dict:
    """Per-query scores -> the metrics.json dict of the contract."""
    scores = list(scores)
    levels = ("top1", f"top{k}", "oracle")
    out: dict = {"n": len(scores), "n_error": sum(not s.ok for s in scores)}
    for lv in levels:
        out[lv] = _summary(scores, lv)
    by_cat: dict[str, dict] = {}
    for cat in sorted({s.category or "all" for s in scores}):
        sub = [s for s in scores if (s.category or "all") == cat]
        by_cat[cat] = {"n": len(sub), **{lv: _summary(sub, lv) for lv in levels}}
    out["by_category"] = by_cat
    return out
