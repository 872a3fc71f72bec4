"""gIoU / cIoU with LISA's semantics, at top-1, top-k and oracle, overall and per category; instance precision and
recall of the selected candidates; cumulative pixel precision, recall and F1.

Per query: I and U of the predicted mask against ground truth, ignore (255) pixels excluded from both; an empty
union scores 1. gIoU = mean per-query IoU; cIoU = sum(I) / sum(U). Top-k: the best of the k highest-ranked
candidates; oracle: the best of all candidates. A failed (or missing) query scores I = 0, U = |GT|.

"top1" is the prediction's ``mask``: with ``scoring.select`` other than top1, the union of the selected candidates.
Instances: each selected candidate matches at most one unmatched ground-truth instance at IoU >= 0.5 (pairs taken by
IoU, highest first); precision = matched / selected, recall = matched / instances, summed over queries. Pixels (as
MIRAS reports them): precision = sum(I) / sum(|prediction|), recall = sum(I) / sum(|GT|), F1 their harmonic mean,
cumulative over queries (ignore pixels excluded).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ..masks import IGNORE, decode_rle, intersection_union, iou_from_iu, mask_iou
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
    instances: tuple[int, int, int] = (0, 0, 0)  # (matched, selected, ground-truth instances)
    pixels: tuple[int, int, int] = (0, 0, 0)  # top-1 (I, |prediction|, |GT|), ignore pixels excluded

    def iou(self, level: str) -> float:
        return iou_from_iu(*self.iu[level])


def _check_size(mask: np.ndarray, gt: np.ndarray, query_id: str) -> None:
    if mask.shape != gt.shape:
        raise ValueError(
            f"query {query_id}: predicted mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but the ground truth is "
            f"{gt.shape[1]}x{gt.shape[0]}; predictions must be at the original image size"
        )


def match_instances(selected: list[np.ndarray], instances: list[np.ndarray], threshold: float = 0.5) -> int:
    """How many selected masks match a distinct instance at IoU >= ``threshold`` (greedy, highest IoU first)."""
    pairs = sorted(
        (
            (mask_iou(m, g.astype(np.uint8)), i, j)
            for i, m in enumerate(selected)
            for j, g in enumerate(instances)
        ),
        reverse=True,
    )
    used_s, used_g = set(), set()
    for iou, i, j in pairs:
        if iou < threshold:
            break
        if i not in used_s and j not in used_g:
            used_s.add(i)
            used_g.add(j)
    return len(used_s)


def score_query(
    pred: Prediction | None,
    gt: np.ndarray,
    category: str,
    query_id: str,
    k: int = 3,
    instances: list[np.ndarray] | None = None,
) -> QueryScore:
    """Score one query. ``pred`` None or with status != ok counts as a failure (IoU 0). ``instances``: the ground
    truth's instances (default: the whole target as one)."""
    levels = ("top1", f"top{k}", "oracle")
    gt_area = int(np.count_nonzero(gt == 1))
    if instances is None:
        instances = [gt == 1] if gt_area else []
    if pred is None or pred.status != "ok" or pred.mask is None:
        return QueryScore(query_id, category, False, {lv: (0, gt_area) for lv in levels},
                          instances=(0, 0, len(instances)), pixels=(0, 0, gt_area))  # fmt: skip
    top1 = decode_rle(pred.mask)
    _check_size(top1, gt, query_id)
    iu1 = intersection_union(top1, gt)
    pred_area = int(np.count_nonzero(top1 & (gt != IGNORE)))
    ranked = sorted(pred.candidates, key=lambda c: c.rank) if pred.candidates else []
    cand_iu = []
    for c in ranked:
        m = decode_rle(c.mask)
        _check_size(m, gt, query_id)
        cand_iu.append(intersection_union(m, gt))
    cand_ious = [iou_from_iu(*t) for t in cand_iu]
    cand_scores = [float(c.score) for c in ranked]
    by_rank = {c.rank: c for c in ranked}
    chosen = [decode_rle(by_rank[r].mask) for r in (pred.selected or [0]) if r in by_rank] or [top1]
    matched = match_instances(chosen, instances)
    if not cand_iu:
        cand_iu = [iu1]

    def best(ius: list[tuple[int, int]]) -> tuple[int, int]:
        return max(ius, key=lambda t: iou_from_iu(*t))

    return QueryScore(
        query_id, category, True, {"top1": iu1, f"top{k}": best(cand_iu[:k]), "oracle": best(cand_iu)},
        score=None if pred.score is None else float(pred.score), candidate_ious=cand_ious,
        candidate_scores=cand_scores, instances=(matched, len(chosen), len(instances)),
        pixels=(iu1[0], pred_area, gt_area),
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


def _ratio(a: int, b: int) -> float:
    return float(a / b) if b else 0.0


def _instances(scores: list[QueryScore]) -> dict:
    m, s, g = (sum(x.instances[i] for x in scores) for i in range(3))
    return {"precision": _ratio(m, s), "recall": _ratio(m, g), "matched": m, "selected": s, "instances": g}


def _pixels(scores: list[QueryScore]) -> dict:
    i, p, g = (sum(x.pixels[j] for x in scores) for j in range(3))
    prec, rec = _ratio(i, p), _ratio(i, g)
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0}


def aggregate(scores: Iterable[QueryScore], k: int = 3) -> dict:
    """Per-query scores -> the metrics.json dict of the contract."""
    scores = list(scores)
    levels = ("top1", f"top{k}", "oracle")
    out: dict = {"n": len(scores), "n_error": sum(not s.ok for s in scores)}
    for lv in levels:
        out[lv] = _summary(scores, lv)
    out["instances"] = _instances(scores)
    out["pixels"] = _pixels(scores)
    by_cat: dict[str, dict] = {}
    for cat in sorted({s.category or "all" for s in scores}):
        sub = [s for s in scores if (s.category or "all") == cat]
        by_cat[cat] = {"n": len(sub), **{lv: _summary(sub, lv) for lv in levels},
                       "instances": _instances(sub), "pixels": _pixels(sub)}  # fmt: skip
    out["by_category"] = by_cat
    return out
