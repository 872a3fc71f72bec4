"""JSONL / JSON / Parquet manifests (one row per query; local or s3://) -> Query rows.

Relative ``image`` / ``gt_json`` paths are relative to the manifest's folder. ``query_id`` is derived from the image
reference and question when absent, so it is stable across runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .. import storage
from ..records import Query, make_query_id
from .reasonseg import DatasetError

KNOWN = {"query_id", "image", "question", "conversation", "category", "gt_json", "gt_mask", "gt_instances",
         "candidates"}  # fmt: skip


def _lines(read: Callable[[int], bytes], chunk: int = 8 << 20) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) of a byte stream read ``chunk`` bytes at a time: a shard of any size is parsed
    with bounded memory."""
    rest, lineno = b"", 0
    while True:
        data = read(chunk)
        if not data:
            break
        parts = (rest + data).split(b"\n")
        rest = parts.pop()
        for line in parts:
            lineno += 1
            yield lineno, line
    if rest:
        yield lineno + 1, rest


def manifest_rows(
    read: Callable[[int], bytes], uri: str, open_parquet=None
) -> Iterator[tuple[int, dict | Exception]]:
    """(row number, row or the error that row is) of one manifest file, streamed. ``read(n)`` reads the file's next
    ``n`` bytes; a Parquet file is read through ``open_parquet()`` (a seekable file, row group by row group)."""
    lower = uri.lower()
    if lower.endswith(".parquet"):
        try:
            pf = pq.ParquetFile(open_parquet())
            n = 0
            for batch in pf.iter_batches(batch_size=8192):
                for row in batch.to_pylist():
                    n += 1
                    yield n, row
        except Exception as e:
            raise DatasetError(f"{uri}: not a readable Parquet file: {e}") from e
        return
    if lower.endswith(".json"):
        text = b"".join(iter(lambda: read(8 << 20), b"")).decode("utf-8", errors="replace")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{uri}: malformed JSON: {e}") from e
        if not isinstance(data, list):
            raise DatasetError(f"{uri}: a .json file must be a list of rows")
        for i, row in enumerate(data):
            yield i + 1, row
        return
    for lineno, raw in _lines(read):
        line = raw.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, DatasetError(f"{uri} line {lineno}: malformed JSON: {e}")


def _rows(uri: str) -> Iterator[tuple[int, dict | Exception]]:
    fs, path = storage.filesystem(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise DatasetError(f"{uri}: cannot read manifest: {e}") from e
    if info.type == pafs.FileType.NotFound:
        raise DatasetError(f"{uri}: manifest not found")
    with fs.open_input_stream(path) as f:
        yield from manifest_rows(f.read, uri, lambda: fs.open_input_file(path))


def row_to_query(row: dict, base: str, where: str) -> Query:
    """A manifest row -> Query, or DatasetError naming ``where`` and the field that is wrong."""
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
    for key in ("question", "category", "gt_json", "reasoning", "cot"):
        if row.get(key) is not None and not isinstance(row.get(key), str):
            raise DatasetError(f"{where}: '{key}' must be a string")
    gt_mask = row.get("gt_mask")
    if gt_mask is not None and not _is_rle(gt_mask):
        raise DatasetError(f"{where}: 'gt_mask' must be a COCO RLE {{size: [h, w], counts: str}}")
    instances = row.get("gt_instances")
    if instances is not None and (not isinstance(instances, list) or not instances
                                  or not all(_is_rle(c) for c in instances)):  # fmt: skip
        raise DatasetError(
            f"{where}: 'gt_instances' must be a non-empty list of COCO RLEs {{size: [h, w], counts: str}}, one per "
            "target instance"
        )
    cands = row.get("candidates")
    if cands is not None and (not isinstance(cands, list) or not all(_is_rle(c) for c in cands)):
        raise DatasetError(f"{where}: 'candidates' must be a list of COCO RLEs {{size: [h, w], counts: str}}")
    return Query(
        query_id=str(qid),
        image=image_uri,
        question=question,
        conversation=conversation,
        category=str(row.get("category") or ""),
        gt_json=storage.resolve_relative(gt_json, base) if gt_json else None,
        gt_mask=row.get("gt_mask"),
        gt_instances=instances,
        candidates=row.get("candidates"),
        meta={k: v for k, v in row.items() if k not in KNOWN},
    )


def _is_rle(v) -> bool:
    return (
        isinstance(v, dict)
        and isinstance(v.get("counts"), str)
        and isinstance(v.get("size"), list | tuple)
        and len(v["size"]) == 2
        and all(isinstance(x, int) and x >= 0 for x in v["size"])
    )


def iter_manifest(uri: str, strict: bool = True, seen: set[str] | None = None) -> Iterator[Query]:
    """Yield Query rows. strict: raise DatasetError naming file and line on a bad row; else an error Query.
    ``seen``: ids of earlier shards (a repeated id is a duplicate across shards too)."""
    base = storage.parent(uri)
    seen = set() if seen is None else seen
    for lineno, row in _rows(uri):
        where = f"{uri} row {lineno}"
        try:
            if isinstance(row, Exception):
                raise row
            q = row_to_query(row, base, where)
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
