"""The per-batch work both jobs share, on image rows (``IMAGE_ROW_SCHEMA``: one row per image, holding its queries):
fetch + decode each image once (CPU tasks), and the Discoverer actor. A failure marks the queries it touches with
``error`` / ``error_stage``; they flow on to the writer: rows out == rows in.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from .. import get_logger
from ..config import DiscoveryConfig, LimitsConfig, ModelsConfig
from ..images import DecodeError, decode, fetch
from ..masks import resize_rle
from ..records import Candidate, Query
from .guard import Guard, Isolated
from .inputs import IMAGE_ROW_SCHEMA

log = get_logger(__name__)


def decode_images(batch: pa.Table, max_side: int = 0, max_pixels: int = 0) -> pa.Table:
    """Image rows -> the same rows with pixels, original and processing size; or the image's error."""
    rows = batch.to_pylist()
    for r in rows:
        if r["image_uri"] is None or not any(q["error"] is None for q in r["queries"]):
            continue  # a carrier of error rows, or an image none of whose queries can run
        uri = r["image_uri"]
        try:
            pixels, (h, w) = decode(fetch(uri), uri, max_side, max_pixels)
        except DecodeError as e:
            r.update(error=str(e), error_stage=e.stage)
            continue
        except Exception as e:  # noqa: BLE001 - anything else about this file is still its own rows' error
            r.update(error=f"cannot decode image {uri}: {type(e).__name__}: {e}", error_stage="decode")
            continue
        r.update(height=h, width=w, image=pixels.tobytes(), proc_h=pixels.shape[0], proc_w=pixels.shape[1])
    return pa.Table.from_pylist(rows, schema=IMAGE_ROW_SCHEMA)


def pixels(r: dict) -> np.ndarray:
    """An image row's decoded pixels, (proc_h, proc_w, 3) uint8 (a view of the row's bytes)."""
    return np.frombuffer(r["image"], np.uint8).reshape(r["proc_h"], r["proc_w"], 3)


def runnable(rows: list[dict]) -> list[tuple[int, int]]:
    """(row, query) index pairs of the queries a model stage should run: decoded image, no error so far."""
    return [
        (ri, qi)
        for ri, r in enumerate(rows)
        if r["image"] is not None and not r["error"]
        for qi, q in enumerate(r["queries"])
        if q["error"] is None
    ]


def set_error(q: dict, message: str, stage: str) -> None:
    q["error"], q["error_stage"] = message, stage


def one_at_a_time(work: Callable[[list], list], what: str) -> Callable[[list], list]:
    """``work`` whose batch-wide exception is retried item by item, so only the item that raises gets it as its
    result (a backend failure on one query's requests fails that query's row only)."""

    def run(items: list) -> list:
        try:
            return work(items)
        except Exception as e:  # noqa: BLE001 - isolate below
            if len(items) == 1:
                return [e]
            log.warning(
                "%s failed for a batch of %d queries (%s); retrying them one at a time", what, len(items), e
            )
            return [r for item in items for r in run([item])]

    return run


def guarded_map(
    guard: Guard,
    rows: list[dict],
    todo: list[tuple[int, int]],
    work: Callable[[list[tuple[int, int]]], list],
) -> list:
    """Run ``work`` on the (row, query) pairs under the poison guard, a batch-wide exception retried query by query;
    isolated queries come back as errors."""
    units = [(rows[ri]["queries"][qi]["query_id"], (ri, qi)) for ri, qi in todo]
    results = guard.run(units, one_at_a_time(work, guard.stage))
    for (ri, qi), res in zip(todo, results, strict=True):
        if isinstance(res, Isolated):
            set_error(rows[ri]["queries"][qi], str(res), "isolated")
    return results


class DiscoverStage:
    """Ray Data actor UDF around ``Discoverer`` (one model load per actor): every runnable query of a batch of
    images in one ``discover`` call (MLLM batched over queries, SAM once per image)."""

    def __init__(
        self,
        discovery: DiscoveryConfig,
        models: ModelsConfig,
        limits: LimitsConfig,
        max_question_tokens: int,
        ledger: str | None = None,
    ):
        from .. import configure_logging
        from ..discovery.discoverer import Discoverer

        configure_logging()  # the driver's -v / -q, through the worker environment
        self.discoverer = Discoverer(discovery, models)
        self.discoverer.warmup()
        self.max_tokens = max_question_tokens
        self.guard = Guard("discover", ledger, limits.max_attempts, limits.batch_timeout_s)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = []
        for ri, qi in runnable(rows):
            q = rows[ri]["queries"][qi]
            n = self.discoverer.question_tokens(Query.from_struct(q).text())
            if n is not None and n > self.max_tokens:
                set_error(
                    q, f"question is {n} tokens, over limits.max_question_tokens={self.max_tokens}", "limit"
                )
            else:
                todo.append((ri, qi))
        results = guarded_map(self.guard, rows, todo, lambda pairs: self._discover(rows, pairs))
        for (ri, qi), res in zip(todo, results, strict=True):
            q = rows[ri]["queries"][qi]
            if q["error"] is not None:
                continue
            if isinstance(res, Exception):
                set_error(q, f"discovery failed: {res}", "discover")
            else:
                q["found"] = [c.to_row() for c in res]
        return pa.Table.from_pylist(rows, schema=IMAGE_ROW_SCHEMA)

    def _discover(self, rows: list[dict], pairs: list[tuple[int, int]]) -> list:
        images = {
            ri: pixels(rows[ri]) for ri in {ri for ri, _ in pairs}
        }  # one array (one SAM embedding) per image
        queries = []
        for ri, qi in pairs:
            q = Query.from_struct(rows[ri]["queries"][qi])
            if q.candidates:  # given candidates live at the original size; discovery sees the processing size
                q.candidates = [resize_rle(c, (rows[ri]["proc_h"], rows[ri]["proc_w"])) for c in q.candidates]
            queries.append(q)
        return self.discoverer.discover(queries, [images[ri] for ri, _ in pairs])


def found_candidates(q: dict) -> list[Candidate]:
    return [Candidate.from_row(c) for c in q["found"] or []]


def discovered_dataset(
    images,
    *,
    max_image_side: int,
    decode_num_cpus: float,
    limits: LimitsConfig,
    discovery: DiscoveryConfig,
    models: ModelsConfig,
    pool,
    max_question_tokens: int,
    env: dict[str, str],
    ledger: str | None = None,
):
    """The lazy head both jobs share: image rows -> decode tasks (each image once) -> the Discoverer actor pool;
    rows keep ``IMAGE_ROW_SCHEMA`` with each runnable query's ``found`` candidates filled in."""
    from . import pool_args

    ds = images.map_batches(
        decode_images, batch_format="pyarrow", batch_size=4, num_cpus=decode_num_cpus,
        fn_kwargs={"max_side": max_image_side, "max_pixels": limits.max_image_pixels}, runtime_env={"env_vars": env},
    )  # fmt: skip
    kwargs = dict(discovery=discovery, models=models, limits=limits, max_question_tokens=max_question_tokens,
                  ledger=ledger)  # fmt: skip
    return ds.map_batches(DiscoverStage, fn_constructor_kwargs=kwargs, **pool_args(pool, env))
