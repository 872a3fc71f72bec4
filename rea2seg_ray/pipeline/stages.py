"""The segmentation job's last stage: the Scorer actor on image rows, then one ``PREDICTIONS_SCHEMA`` row per query
for the writer (error rows included: rows out == rows in).
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from ..config import LimitsConfig, ModelsConfig, ScoringConfig
from ..masks import union_rle
from ..records import Prediction, Query, predictions_table
from ..runtime.guard import Guard
from ..runtime.stages import found_candidates, guarded_map, pixels, runnable, set_error


class ScoreStage:
    """Ray Data actor UDF around ``Scorer``: every candidate of every runnable query of a batch of images in one
    backend call (``guarded_map`` retries a failed call query by query, so only the failing query's row errs)."""

    def __init__(
        self,
        scoring: ScoringConfig,
        models: ModelsConfig,
        limits: LimitsConfig,
        run_id: str,
        ledger: str | None = None,
    ):
        from .. import configure_logging
        from ..scoring.scorer import Scorer

        configure_logging()  # the driver's -v / -q, through the worker environment
        self.models, self.run_id = models, run_id
        self.scorer = Scorer(scoring, models)
        self.scorer.warmup()
        self.guard = Guard("score", ledger, limits.max_attempts, limits.batch_timeout_s)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [(ri, qi) for ri, qi in runnable(rows) if rows[ri]["queries"][qi]["found"]]
        results = guarded_map(self.guard, rows, todo, lambda pairs: self._score(rows, pairs))
        for (ri, qi), res in zip(todo, results, strict=True):
            q = rows[ri]["queries"][qi]
            if q["error"] is not None:
                continue
            if isinstance(res, Exception) or not res:
                msg = f"scoring failed: {res}" if isinstance(res, Exception) else "no candidates to score"
                set_error(q, msg, "score")
            else:
                q["found"] = [c.to_row() for c in res[0]]
                q["selected"] = res[1]
        return predictions_table(to_predictions(rows, self.models, self.run_id))

    def _score(self, rows: list[dict], pairs: list[tuple[int, int]]) -> list:
        images = {ri: pixels(rows[ri]) for ri in {ri for ri, _ in pairs}}
        queries = [Query.from_struct(rows[ri]["queries"][qi]) for ri, qi in pairs]
        cands = [found_candidates(rows[ri]["queries"][qi]) for ri, qi in pairs]
        ims = [images[ri] for ri, _ in pairs]
        ranked = self.scorer.score(queries, ims, cands)
        chosen = self.scorer.select(queries, ims, ranked)
        # (ranked candidates, chosen ranks) per query; a falsy value or an exception fails that query's row
        return [(r, c) if isinstance(r, list) and r else r for r, c in zip(ranked, chosen, strict=True)]


def to_predictions(rows: list[dict], models: ModelsConfig, run_id: str) -> list[Prediction]:
    """Image rows -> one Prediction per query: the image's or the query's error, or its ranked candidates at the
    original image size."""
    preds = []
    for r in rows:
        for q in r["queries"]:
            query = Query.from_struct(q)
            base = dict(
                query_id=query.query_id, image_uri=query.image, question=query.text(), category=query.category,
                height=r["height"] or 0, width=r["width"] or 0, scorer_model=models.scorer,
                discovery_model=models.discovery, run_id=run_id,
            )  # fmt: skip
            error, stage = (
                (q["error"], q["error_stage"]) if q["error"] is not None else (r["error"], r["error_stage"])
            )
            if error is None and not q["found"]:
                error, stage = "not processed: no candidates reached the writer", "score"
            if error is not None:
                preds.append(Prediction(status="error", error=error, error_stage=stage, **base))
                continue
            shape = (r["height"], r["width"])
            cands = [c.at_size(shape) for c in found_candidates(q)]
            selected = [int(i) for i in q.get("selected") or [0] if 0 <= int(i) < len(cands)] or [0]
            top = cands[selected[0]]
            score = top.score if top.score == top.score else None  # NaN (unparseable) -> null
            mask = top.mask if len(selected) == 1 else union_rle([cands[i].mask for i in selected])
            preds.append(Prediction(mask=mask, score=score, candidates=cands, selected=selected, **base))
    return preds


def summarize(table: pa.Table) -> dict:
    """Counts per status and per error stage of a predictions table (or its status/error_stage columns)."""
    rows = table.select(["status", "error_stage"]).to_pylist()
    c = Counter(r["status"] for r in rows)
    stages = Counter(r["error_stage"] for r in rows if r["status"] == "error")
    return {"ok": c.get("ok", 0), "error": c.get("error", 0), "error_stages": dict(stages)}
