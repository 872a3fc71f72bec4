"""The pipeline's per-batch work, as plain functions and classes (Ray Data calls them; they do not import Ray).

Rows between stages follow ``STAGE_SCHEMA``; the last stage emits ``PREDICTIONS_SCHEMA`` rows. A failure marks the
rows it touches with ``error`` and ``error_stage`` and they flow on to the output: rows out == rows in.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import cv2
import numpy as np
import pyarrow as pa
from omegaconf import OmegaConf

from ..config import SegmentConfig
from ..masks import decode_rle, encode_rle, mask_bbox
from ..records import Candidate, Prediction, Query, predictions_table
from .decode import DecodeError, decode, fetch

STAGE_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("query_json", pa.string()),
        ("image_uri", pa.string()),
        ("question", pa.string()),
        ("category", pa.string()),
        ("error", pa.string()),
        ("error_stage", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        (
            "image",
            pa.binary(),
        ),  # decoded RGB pixels (proc_h, proc_w, 3) uint8, raw: decoded once, never again
        ("proc_h", pa.int32()),
        ("proc_w", pa.int32()),
        ("candidates_json", pa.string()),
    ]
)
IMAGE_GROUP_SCHEMA = pa.schema([("image_uri", pa.string()), ("queries_json", pa.string())])


def record_busy(stage: str, seconds: float, rows: int) -> None:
    """Append one batch's busy time to ``$REA2SEG_STAGE_TIMINGS`` (benchmarks read it; off when unset)."""
    path = os.environ.get("REA2SEG_STAGE_TIMINGS")
    if path:
        with open(path, "a") as f:
            f.write(
                json.dumps(
                    {"stage": stage, "pid": os.getpid(), "busy_s": seconds, "rows": rows, "t": time.time()}
                )
                + "\n"
            )


def config_from_dict(d: dict) -> SegmentConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SegmentConfig), d))


def _row(q: Query, error: str | None = None, stage: str | None = None) -> dict:
    return {
        "query_id": q.query_id, "query_json": json.dumps(q.to_dict()), "image_uri": q.image, "question": q.text(),
        "category": q.category, "error": error, "error_stage": stage if error else None, "height": 0, "width": 0,
        "image": None, "proc_h": 0, "proc_w": 0, "candidates_json": None,
    }  # fmt: skip


def validate(q: Query) -> tuple[str, str] | None:
    """(error, stage) for a query that cannot be processed, before any image is read."""
    if q.meta.get("error"):
        return str(q.meta["error"]), str(q.meta.get("error_stage") or "read")
    if not q.image:
        return "no image given", "read"
    if not q.text().strip():
        return "empty question", "read"
    return None


def group_by_image(queries: list[Query]) -> list[dict]:
    """One item per distinct image (first-seen order) holding its queries: each image is fetched and decoded once."""
    groups: dict[str, list[dict]] = {}
    for q in queries:
        groups.setdefault(q.image, []).append(q.to_dict())
    return [{"image_uri": uri, "queries_json": json.dumps(qs)} for uri, qs in groups.items()]


def decode_batch(batch: pa.Table, max_side: int = 0) -> pa.Table:
    """Image groups -> one STAGE row per query, with the image decoded once per group (or an error)."""
    rows: list[dict] = []
    for item in batch.to_pylist():
        queries = [Query(**d) for d in json.loads(item["queries_json"])]
        pending = []
        for q in queries:
            bad = validate(q)
            if bad:
                rows.append(_row(q, *bad))
            else:
                pending.append(q)
        if not pending:
            continue
        try:
            pixels, (h, w) = decode(fetch(item["image_uri"]), item["image_uri"], max_side)
        except DecodeError as e:
            rows += [_row(q, str(e), e.stage) for q in pending]
            continue
        except Exception as e:  # noqa: BLE001 - anything else about this file is still its own row's error
            rows += [
                _row(q, f"cannot decode image {item['image_uri']}: {type(e).__name__}: {e}", "decode")
                for q in pending
            ]
            continue
        data = pixels.tobytes()
        for q in pending:
            r = _row(q)
            r.update(height=h, width=w, image=data, proc_h=pixels.shape[0], proc_w=pixels.shape[1])
            rows.append(r)
    return pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)


def _resize_nearest(rle: dict, shape: tuple[int, int]) -> np.ndarray:
    """Decode an RLE and resample it to ``shape`` (H, W), nearest neighbour."""
    m = decode_rle(rle).astype(np.uint8)
    return cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)


def _resize_rle(rle: dict, shape: tuple[int, int]) -> dict:
    if tuple(rle["size"]) == shape:
        return rle
    return encode_rle(_resize_nearest(rle, shape))


def _images(rows: list[dict]) -> dict[str, np.ndarray]:
    """Pixels per image URI for a batch: rows about the same image share one array (one SAM embedding)."""
    out: dict[str, np.ndarray] = {}
    for r in rows:
        if r["image_uri"] not in out:
            out[r["image_uri"]] = np.frombuffer(r["image"], np.uint8).reshape(r["proc_h"], r["proc_w"], 3)
    return out


class DiscoverStage:
    """Ray Data actor UDF around ``Discoverer`` (one model load per actor)."""

    def __init__(self, cfg: dict):
        from ..discovery.discoverer import Discoverer

        self.cfg = config_from_dict(cfg)
        self.discoverer = Discoverer(self.cfg.discovery, self.cfg.models)
        self.discoverer.warmup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        rows = batch.to_pylist()
        todo = [r for r in rows if not r["error"]]
        if todo:
            images = _images(todo)
            queries = []
            for r in todo:
                q = Query(**json.loads(r["query_json"]))
                if (
                    q.candidates
                ):  # given candidates live at the original size; discovery sees the processing size
                    q.candidates = [_resize_rle(c, (r["proc_h"], r["proc_w"])) for c in q.candidates]
                queries.append(q)
            try:
                results = self.discoverer.discover(queries, [images[r["image_uri"]] for r in todo])
            except Exception as e:  # noqa: BLE001 - the batch's rows become error rows; the job goes on
                results = [e] * len(todo)
            for r, res in zip(todo, results, strict=True):
                if isinstance(res, Exception):
                    r.update(error=f"discovery failed: {res}", error_stage="discover", image=None)
                else:
                    r["candidates_json"] = json.dumps([c.to_row() for c in res])
        record_busy("discover", time.perf_counter() - t0, len(rows))
        return pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)


def _to_original(c: Candidate, shape: tuple[int, int]) -> Candidate:
    if tuple(c.mask["size"]) == shape:
        return c
    m = _resize_nearest(c.mask, shape)
    c.mask, c.bbox, c.area = encode_rle(m), mask_bbox(m), int(m.sum())
    return c


class ScoreStage:
    """Ray Data actor UDF around ``Scorer``: all candidates of the batch's queries in one backend call; emits the
    contract's Parquet rows."""

    def __init__(self, cfg: dict, run_id: str):
        from ..scoring.scorer import Scorer

        self.cfg = config_from_dict(cfg)
        self.run_id = run_id
        self.scorer = Scorer(self.cfg.scoring, self.cfg.models)
        self.scorer.warmup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        rows = batch.to_pylist()
        todo = [r for r in rows if not r["error"]]
        results: list = []
        if todo:
            images = _images(todo)
            queries = [Query(**json.loads(r["query_json"])) for r in todo]
            cands = [[Candidate.from_row(c) for c in json.loads(r["candidates_json"])] for r in todo]
            try:
                results = self.scorer.score(queries, [images[r["image_uri"]] for r in todo], cands)
            except Exception as e:  # noqa: BLE001
                results = [e] * len(todo)
        by_id = {r["query_id"]: res for r, res in zip(todo, results, strict=True)}
        preds = [self._prediction(r, by_id.get(r["query_id"])) for r in rows]
        record_busy("score", time.perf_counter() - t0, len(rows))
        return predictions_table(preds)

    def _prediction(self, r: dict, res) -> Prediction:
        base = dict(
            query_id=r["query_id"], image_uri=r["image_uri"], question=r["question"], category=r["category"] or "",
            height=r["height"] or 0, width=r["width"] or 0, scorer_model=self.cfg.models.scorer,
            discovery_model=self.cfg.models.discovery, run_id=self.run_id,
        )  # fmt: skip
        if r["error"]:
            return Prediction(status="error", error=r["error"], error_stage=r["error_stage"], **base)
        if isinstance(res, Exception) or not res:
            msg = f"scoring failed: {res}" if isinstance(res, Exception) else "no candidates to score"
            return Prediction(status="error", error=msg, error_stage="score", **base)
        shape = (r["height"], r["width"])
        cands = [_to_original(c, shape) for c in res]
        top = cands[0]
        score = top.score if top.score == top.score else None  # NaN (unparseable) -> null
        return Prediction(mask=top.mask, score=score, candidates=cands, **base)


def summarize(table: pa.Table) -> dict:
    """Counts per status and per error stage of a predictions table."""
    rows = table.select(["status", "error_stage"]).to_pylist()
    c = Counter(r["status"] for r in rows)
    stages = Counter(r["error_stage"] for r in rows if r["status"] == "error")
    return {"ok": c.get("ok", 0), "error": c.get("error", 0), "error_stages": dict(stages)}
