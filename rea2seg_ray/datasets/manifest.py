"""JSONL / JSON / Parquet manifests (one row per query; local or s3://) -> Query rows.

Relative ``image`` / ``gt_json`` paths are relative to the manifest's folder. ``query_id`` is derived from the image
reference and question when absent, so it is stable across runs.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pyarrow.parquet as pq

from .. import storage
from ..records import Query, make_query_id
from .reasonseg import DatasetError

KNOWN = {"query_id", "image", "question", "conversation", "category", "gt_json", "gt_mask", "candidates"}


def _rows(uri: str) -> Iterator[tuple[int, dict | Exception]]:
    lower = uri.lower()
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise DatasetError(f"{uri}: manifest not found") from e
    if lower.endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(raw))
        except Exception as e:
            raise DatasetError(f"{uri}: not a readable Parquet file: {e}") from e
        for i, row in enumerate(table.to_pylist()):
            yield i + 1, row
        return
    text = raw.decode("utf-8", errors="replace")
    if lower.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{uri}: malformed JSON manifest: {e}") from e
        if not isinstance(data, list):
            raise DatasetError(f"{uri}: a .json manifest must be a list of rows")
        for i, row in enumerate(data):
            yield i + 1, row
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, DatasetError(f"{uri} line {lineno}: malformed JSON: {e}")


def _to_query(row: dict, base: str, where: str) -> Query:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: row must be an object")
    image = row.get("image")
    if not image or not isinstance(image, str):
        raise DatasetError(f"{where}: missing 'image'")
    conversation = row.get("conversation")
    question = row.get("question") or ""
    if conversation is not None:
        if not isinstance(conversation, list) or not all(isinstance(t, dict) for t in conversation):
            raise DatasetError(f"{where}: 'conversation' must be a list of {{role, content}} objects")
    image_uri = storage.resolve_relative(image, base)
    text = question or "\n".join(str(t.get("content", "")) for t in conversation or [])
    qid = row.get("query_id") or make_query_id(image, text)
    gt_json = row.get("gt_json")
    names = row.get("candidate_descriptions")
    if names is not None and (
        not isinstance(names, list)
        or not all(isinstance(n, str | None) for n in names)
        or len(names) != len(row.get("candidates") or [])
    ):
        raise DatasetError(
            f"{where}: 'candidate_descriptions' must be a list of strings, one per entry of 'candidates'"
        )
    return Query(
        query_id=str(qid),
        image=image_uri,
        question=question,
        conversation=conversation,
        category=str(row.get("category") or ""),
        gt_json=storage.resolve_relative(gt_json, base) if gt_json else None,
        gt_mask=row.get("gt_mask"),
        candidates=row.get("candidates"),
        meta={k: v for k, v in row.items() if k not in KNOWN},
    )


def iter_manifest(uri: str, strict: bool = True) -> Iterator[Query]:
    """Yield Query rows. strict: raise DatasetError naming file and line on a bad row; else an error Query."""
    base = storage.parent(uri)
    seen: set[str] = set()
    for lineno, row in _rows(uri):
        where = f"{uri} row {lineno}"
        try:
            if isinstance(row, Exception):
                raise row
            q = _to_query(row, base, where)
            if q.query_id in seen:
                raise DatasetError(f"{where}: duplicate query_id {q.query_id!r}")
            seen.add(q.query_id)
        except DatasetError as e:
            if strict:
                raise
            # The row keeps its own id unless that id is what is wrong (a duplicate): ids stay unique either way.
            own = row.get("query_id") if isinstance(row, dict) else None
            qid = own if own and own not in seen else f"{uri}#row{lineno}"
            seen.add(str(qid))
            yield Query(
                query_id=str(qid),
                image=str(row.get("image", "")) if isinstance(row, dict) else "",
                meta={"error": str(e), "error_stage": "read"},
            )
            continue
        yield q
