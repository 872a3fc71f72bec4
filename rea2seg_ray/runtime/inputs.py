"""Sharded input as Ray datasets, read on the cluster and never collected on the driver.

``input=`` names a manifest file, a folder or prefix of shards, or a glob (JSONL and Parquet, mixed), or a ReasonSeg
folder; local or ``s3://``. The driver lists file paths only; Ray Data read tasks parse and validate the rows
(``QUERY_ROW_SCHEMA``: a bad row becomes an error row). Then two shuffles:

1. by query id (``resolve_block``, ``resolve_group``): the first row of a repeated id (by shard path, then row number) keeps it, the
   others become error rows naming the duplicate; ids already in the output (read from the ``query_id`` column
   alone) are dropped, which is the resume anti-join;
2. by image (``image_block``): one row per distinct image holding all of its queries (``IMAGE_ROW_SCHEMA``), so each
   image is fetched and decoded once however its queries are spread over shards. Error rows ride along in rows
   without an image, so one linear pipeline carries every input row to the writer: rows out == rows in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource.file_based_datasource import FileBasedDatasource

from .. import get_logger, storage
from ..datasets.manifest import manifest_rows, row_to_query
from ..datasets.reasonseg import IMAGE_EXTS, DatasetError, annotation_queries, parse_annotation
from ..datasets.refcoco import iter_refcoco
from ..datasets.shards import InputSpec, predictions_files, scheme_of
from ..records import QUERY_FIELDS, QUERY_TYPE

log = get_logger(__name__)

# The id a repeated query id's later rows are written under: the original id, this mark, where the row sits.
DUPLICATE_MARK = "#duplicate@"
# Rows without an image (errors; in a dry run also ids already done and torn output files) are gathered into this
# many carrier groups per kind, so the image shuffle never makes one group per error row.
CARRIER_BUCKETS = 64

# A query row between the readers and the image shuffle: QUERY_TYPE's fields plus the shuffle key and whether the
# id is already in the output (a resume marker read from the predictions, not an input row).
QUERY_ROW_SCHEMA = pa.schema([*QUERY_FIELDS, ("key", pa.string()), ("done", pa.bool_())])
# One row per image (or per carrier of rows without one): its queries, then what decode adds (original and
# processing size, pixels), and an image-level error that every one of its queries inherits.
# image_uri is null for a carrier of error rows (or, in a dry run, of done ids / torn files); an image with more than
# max_queries queries is split into parts (0 first); image holds the decoded RGB pixels (proc_h, proc_w, 3) uint8,
# raw: decoded once, never again.
IMAGE_ROW_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("part", pa.int32()),
        ("queries", pa.list_(QUERY_TYPE)),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("proc_h", pa.int32()),
        ("proc_w", pa.int32()),
        ("image", pa.binary()),
        ("error", pa.string()),
        ("error_stage", pa.string()),
    ]
)
CHUNK_ROWS = 4096  # rows per block a read task emits


# -- readers --------------------------------------------------------------------------------------------------------


def error_struct(query_id: str, image: str, error: str, source: str, row: int, stage: str = "read") -> dict:
    return {
        "query_id": query_id,
        "image": image,
        "error": error,
        "error_stage": stage,
        "source": source,
        "row": row,
    }


def query_table(structs: list[dict]) -> pa.Table:
    """Query structs -> a QUERY_ROW_SCHEMA table (key = query_id, not done). A row Arrow cannot hold (a field of
    the wrong type that validation let through) becomes an error row instead of failing its block."""
    for s in structs:
        s["key"], s["done"] = s["query_id"], False
    try:
        return pa.Table.from_pylist(structs, schema=QUERY_ROW_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        rows = []
        for s in structs:
            try:
                pa.Table.from_pylist([s], schema=QUERY_ROW_SCHEMA)
                rows.append(s)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
                row = s.get("row") if isinstance(s.get("row"), int) else 0
                bad = error_struct(str(s["query_id"]), str(s.get("image") or ""), f"row has a field of the wrong "
                                   f"type: {e}", str(s.get("source") or ""), row)  # fmt: skip
                bad["key"], bad["done"] = bad["query_id"], False
                rows.append(bad)
        return pa.Table.from_pylist(rows, schema=QUERY_ROW_SCHEMA)


class _RandomAccess(FileBasedDatasource):
    """A file-based Ray Data reader whose files open for random access (Parquet footers, ranged reads)."""

    def __init__(self, paths: list[str], scheme: str, **kwargs):
        super().__init__(paths, **kwargs)
        self.scheme = scheme

    def _open_input_source(self, filesystem, path: str, **open_args):
        return filesystem.open_input_file(path)


class ManifestDatasource(_RandomAccess):
    """Manifest shards (JSONL, JSON list, Parquet) -> QUERY_ROW_SCHEMA blocks, validated row by row."""

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        uri = self.scheme + path
        base = storage.parent(uri)
        chunk: list[dict] = []
        rowno = 0
        try:
            for rowno, row in manifest_rows(f.read, uri, lambda: f):
                where = f"{uri} row {rowno}"
                try:
                    if isinstance(row, Exception):
                        raise row
                    q = row_to_query(row, base, where)
                    if not q.text().strip():
                        raise DatasetError(f"{where}: empty question")
                    chunk.append(q.to_struct(uri, rowno))
                except DatasetError as e:
                    own = row.get("query_id") if isinstance(row, dict) else None
                    qid = str(own) if isinstance(own, str | int) and str(own) else f"{uri}#row{rowno}"
                    image = (
                        row.get("image")
                        if isinstance(row, dict) and isinstance(row.get("image"), str)
                        else ""
                    )
                    chunk.append(error_struct(qid, image, str(e), uri, rowno))
                if len(chunk) >= CHUNK_ROWS:
                    yield query_table(chunk)
                    chunk = []
        except DatasetError as e:
            # The file itself is unreadable: one error row stands for what it could not give.
            chunk.append(error_struct(f"{uri}#file", "", str(e), uri, rowno + 1))
        if chunk:
            yield query_table(chunk)


class ReasonSegDatasource(_RandomAccess):
    """ReasonSeg annotations (``<name>.json`` beside ``<name>.jpg``, LISA format) -> QUERY_ROW_SCHEMA blocks."""

    def __init__(self, paths: list[str], scheme: str, texts: str = "first", **kwargs):
        super().__init__(paths, scheme, **kwargs)
        if texts not in ("first", "all"):
            raise DatasetError(f"texts must be 'first' or 'all', got {texts!r}")
        self.texts = texts

    def _find_image(self, stem: str) -> str | None:
        cands = [stem + e for ext in IMAGE_EXTS for e in (ext, ext.upper())]
        infos = self._filesystem.get_file_info(cands)
        return next((i.path for i in infos if i.type == pafs.FileType.File), None)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        uri = self.scheme + path
        stem = path[: -len(".json")]
        name = PurePosixPath(stem).name
        image = self._find_image(stem)
        image_uri = self.scheme + (image or stem + ".jpg")
        try:
            anno = parse_annotation(f.read(), uri)
            if image is None:
                raise DatasetError(f"{self.scheme}{stem}.jpg: image not found (annotation {uri})")
        except DatasetError as e:
            s = error_struct(name, image_uri, str(e), uri, 1)
            s["gt_json"] = uri
            yield query_table([s])
            return
        queries = annotation_queries(anno, name, image_uri, uri, self.texts)
        yield query_table([q.to_struct(uri, i + 1) for i, q in enumerate(queries)])


class RefCOCODatasource(_RandomAccess):
    """A RefCOCO refs file (JSON or Parquet; instances.json beside it, or ``raw_*`` columns) -> QUERY_ROW_SCHEMA
    blocks, one query per referring sentence; a bad ref becomes an error row."""

    def __init__(self, paths: list[str], scheme: str, split: str = "", images: str = "", **kwargs):
        super().__init__(paths, scheme, **kwargs)
        self.split, self.images = split, images

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        uri = self.scheme + path
        chunk: list[dict] = []
        try:
            for n, q in enumerate(iter_refcoco(uri, self.split, self.images, strict=False, source=f)):
                chunk.append(q.to_struct(uri, n + 1))
                if len(chunk) >= CHUNK_ROWS:
                    yield query_table(chunk)
                    chunk = []
        except DatasetError as e:
            chunk.append(error_struct(f"{uri}#file", "", str(e), uri, len(chunk) + 1))
        if chunk:
            yield query_table(chunk)


class DoneIdsDatasource(_RandomAccess):
    """The ``query_id`` column of predictions files (Parquet column projection: the footer and that column's
    pages, nothing else) -> resume markers. A torn file (a run killed while writing) yields one marker naming it."""

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        try:
            pf = pq.ParquetFile(f)
            tables = [pf.read_row_group(i, columns=["query_id"]) for i in range(pf.num_row_groups)]
        except Exception as e:  # noqa: BLE001 - unreadable: not output; its rows will be redone
            marker = {"query_id": None, "key": f"#torn#{path}", "done": True, "source": self.scheme + path,
                      "error": f"unreadable predictions file: {e}", "error_stage": "torn"}  # fmt: skip
            yield pa.Table.from_pylist([marker], schema=QUERY_ROW_SCHEMA)
            return
        for t in tables:
            ids = t.column("query_id").combine_chunks()
            yield _done_markers(ids)


def _done_markers(ids: pa.Array) -> pa.Table:
    # A duplicate's output id carries its original id before DUPLICATE_MARK: its marker goes to that id's group.
    keys = pc.replace_substring_regex(ids, pattern=DUPLICATE_MARK + ".*$", replacement="")
    n = len(ids)
    cols = {f.name: pa.nulls(n, f.type) for f in QUERY_ROW_SCHEMA}
    cols.update(query_id=ids.cast(pa.string()), key=keys.cast(pa.string()), done=pa.array([True] * n))
    return pa.table(cols, schema=QUERY_ROW_SCHEMA)


def query_dataset(spec: InputSpec, texts: str = "first", limit: int = 0):
    """The input's query rows (QUERY_ROW_SCHEMA), read in parallel on the cluster."""
    import ray.data

    fs, _ = storage.filesystem(spec.files[0])
    paths = [storage.filesystem(u)[1] for u in spec.files]
    scheme = scheme_of(spec.files[0])
    if spec.kind == "reasonseg":
        source = ReasonSegDatasource(paths, scheme, texts=texts, filesystem=fs)
    elif spec.kind == "refcoco":
        source = RefCOCODatasource(paths, scheme, spec.split, spec.images, filesystem=fs)
    else:
        source = ManifestDatasource(paths, scheme, filesystem=fs)
    ds = ray.data.read_datasource(source, override_num_blocks=min(len(paths), 1024))
    return ds.limit(limit) if limit else ds


def done_dataset(pred_uri: str, filesystem: pafs.FileSystem | None = None):
    """Resume markers for every id already in the predictions under ``pred_uri`` (None when there are none).
    ``filesystem`` overrides the one the URI implies (the scale benchmark counts the bytes read through it)."""
    import ray.data

    infos = predictions_files(pred_uri)
    if not infos:
        return None
    fs = filesystem or storage.filesystem(pred_uri)[0]
    source = DoneIdsDatasource([i.path for i in infos], scheme_of(pred_uri), filesystem=fs)
    return ray.data.read_datasource(source, override_num_blocks=min(len(infos), 1024))


# -- the two shuffles -----------------------------------------------------------------------------------------------


def _bucket(text: str) -> int:
    return int(hashlib.blake2b(text.encode(), digest_size=4).hexdigest(), 16) % CARRIER_BUCKETS


def resolve_group(group: pa.Table, keep_done: bool = False) -> pa.Table:
    """All rows of one query id (input rows and resume markers) -> the rows to process: the first input row (by
    source path, then row number) keeps the id; later rows become error rows under ``<id>#duplicate@<where>``;
    rows whose final id is already in the output are dropped (``keep_done``: kept, marked done, for counting).
    Each row's ``key`` becomes its image shuffle key."""
    rows = group.to_pylist()
    done = {r["query_id"] for r in rows if r["done"] and r["query_id"] is not None}
    # Torn-file markers are counted in a dry run (and the files moved aside before a real run writes).
    out = [r for r in rows if r["done"] and r["query_id"] is None] if keep_done else []
    inputs = sorted((r for r in rows if not r["done"]), key=lambda r: (r["source"] or "", r["row"] or 0))
    for i, r in enumerate(inputs):
        if i:
            first = inputs[0]
            dup = f"{r['query_id']}{DUPLICATE_MARK}{r['source']}#row{r['row']}"
            r = error_struct(dup, r["image"] or "", f"{r['source']} row {r['row']}: duplicate query_id "
                             f"{r['query_id']!r} (first at {first['source']} row {first['row']})", r["source"], r["row"])  # fmt: skip
        if r["query_id"] in done:
            if not keep_done:
                continue
            r = dict(r, error_stage="done")
        out.append(r)
    for r in out:
        if r.get("error_stage") == "torn":
            r["key"] = f"#torn#{_bucket(r['source'])}"
        elif r.get("error_stage") == "done":
            r["key"] = f"#done#{_bucket(r['query_id'])}"
        elif r.get("error"):
            r["key"] = f"#error#{_bucket(r['query_id'])}"
        else:
            r["key"] = r["image"]
        r["done"] = False
    return pa.Table.from_pylist(out, schema=QUERY_ROW_SCHEMA)


def partitions_for(spec: InputSpec, configured: int = 0) -> int:
    """Shuffle partitions: as configured, else one per 32 MiB of input, between 1 and 200."""
    return configured or max(1, min(200, spec.total_bytes // (32 << 20) + 1))


def _runs(keys: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Start offsets of the runs of equal values in a sorted key column, plus its length at the end."""
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    n = len(keys)
    if n == 0:
        return np.array([0])
    change = pc.not_equal(keys[1:], keys[:-1]).to_numpy(zero_copy_only=False)
    return np.concatenate([[0], np.flatnonzero(change) + 1, [n]])


def resolve_block(block: pa.Table, keep_done: bool = False) -> pa.Table:
    """``resolve_group`` over a block sorted by key (the output of a keyed hash repartition: every row of a key is
    in one block). The overwhelming cases are done in vectorized steps: an id seen once and valid (keyed by its
    image), an id seen once and already written (dropped, or counted with ``keep_done``), markers of written ids
    that are not in the input (dropped). Other groups (repeated ids, read errors, torn files) go through
    ``resolve_group`` one by one."""
    if block.num_rows == 0:
        return block
    starts = _runs(block.column("key"))
    sizes = np.diff(starts)
    gid = np.repeat(np.arange(len(sizes)), sizes)
    done = block.column("done").to_numpy(zero_copy_only=False)
    valid = block.column("error").is_null().to_numpy(zero_copy_only=False)
    written = done & pc.fill_null(pc.equal(block.column("query_id"), block.column("key")), False).to_numpy(
        zero_copy_only=False
    )
    inputs = np.bincount(gid, weights=~done, minlength=len(sizes)).astype(int)
    markers = np.bincount(gid, weights=done, minlength=len(sizes)).astype(int)
    good_markers = np.bincount(gid, weights=written, minlength=len(sizes)).astype(int)
    key_written = good_markers > 0
    # Per group: 0 = drop, 1 = one valid input to key by its image, 2 = one input already written, 3 = slow path.
    kind = np.full(len(sizes), 3)
    kind[(inputs == 0) & (markers == good_markers)] = 0
    single_input = (inputs == 1) & (markers == good_markers)
    row_valid = np.bincount(gid, weights=valid & ~done, minlength=len(sizes)) > 0
    kind[single_input & ~key_written & row_valid] = 1
    kind[single_input & key_written] = 2
    row_kind = kind[gid]
    out = []
    fast = block.filter(pa.array((row_kind == 1) & ~done))
    out.append(fast.set_column(fast.schema.get_field_index("key"), "key", fast.column("image")))
    if keep_done:
        skipped = block.filter(pa.array((row_kind == 2) & ~done))
        keys = [f"#done#{_bucket(q)}" for q in skipped.column("query_id").to_pylist()]
        skipped = skipped.set_column(
            skipped.schema.get_field_index("key"), "key", pa.array(keys, pa.string())
        )
        out.append(skipped.set_column(skipped.schema.get_field_index("error_stage"), "error_stage",
                                      pa.array(["done"] * skipped.num_rows, pa.string())))  # fmt: skip
    for g in np.flatnonzero(kind == 3):
        out.append(resolve_group(block.slice(int(starts[g]), int(sizes[g])), keep_done=keep_done))
    return pa.concat_tables(out).cast(QUERY_ROW_SCHEMA)


def image_block(block: pa.Table, max_queries: int = 256) -> pa.Table:
    """Query rows keyed by image (or carrier bucket), every row of a key in this block -> one IMAGE_ROW_SCHEMA row
    per image (per ``max_queries`` of its queries: the image is decoded once per row), queries in input order,
    built with Arrow list offsets rather than Python rows."""
    if block.num_rows == 0:
        return pa.table({f.name: pa.array([], f.type) for f in IMAGE_ROW_SCHEMA}, schema=IMAGE_ROW_SCHEMA)
    g = block.take(pc.sort_indices(block, sort_keys=[("key", "ascending"), ("source", "ascending"),
                                                     ("row", "ascending")]))  # fmt: skip
    starts = _runs(g.column("key"))
    offsets, parts, keys = [], [], g.column("key").combine_chunks()
    for s, e in zip(starts[:-1], starts[1:], strict=True):
        for p, o in enumerate(range(int(s), int(e), max_queries)):
            offsets.append(o)
            parts.append(p)
    offsets.append(g.num_rows)
    n = g.num_rows
    cols = [pa.concat_arrays(g.column(name).chunks) for name, _ in QUERY_FIELDS]
    later = [pa.nulls(n, f.type) for f in list(QUERY_TYPE)[len(QUERY_FIELDS) :]]  # filled by the stages
    queries = pa.StructArray.from_arrays([*cols, *later], fields=list(QUERY_TYPE))
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), queries)
    m = len(parts)
    uri = keys.take(pa.array(offsets[:-1]))
    uri = pc.if_else(pc.starts_with(uri, "#"), pa.nulls(m, pa.string()), uri)
    columns = {f.name: pa.nulls(m, f.type) for f in IMAGE_ROW_SCHEMA}
    columns.update(image_uri=uri, part=pa.array(parts, pa.int32()), queries=lists)
    return pa.table(columns, schema=IMAGE_ROW_SCHEMA)


def image_dataset(
    cfg,
    spec: InputSpec,
    pred_uri: str | None,
    keep_done: bool = False,
    filesystem=None,
    rows_per_block: int = 0,
):
    """Input -> one row per image (IMAGE_ROW_SCHEMA, queries not yet decoded), resume applied against the
    predictions under ``pred_uri`` (None: no resume). ``cfg`` has ``texts``, ``limit``, ``shuffle_partitions``.
    ``rows_per_block`` > 0: blocks of at most that many images (a shuffle's output is a few large blocks; an actor
    pool only streams and spreads work when each block is about one call's worth).

    Each shuffle is what ``groupby(key).map_groups`` does (a keyed hash repartition, sorted, then whole blocks),
    with the per-group work vectorized over the block: Ray Data's per-group calls cost more than the work here."""
    ds = query_dataset(spec, texts=cfg.texts, limit=cfg.limit)
    done = done_dataset(pred_uri, filesystem) if pred_uri else None
    if done is not None:
        ds = ds.union(done)
    n = partitions_for(spec, cfg.shuffle_partitions)
    ds = ds.repartition(n, keys=["key"], sort=True).map_batches(
        resolve_block, batch_size=None, batch_format="pyarrow", fn_kwargs={"keep_done": keep_done}
    )
    ds = ds.repartition(n, keys=["key"], sort=True).map_batches(
        image_block, batch_size=None, batch_format="pyarrow"
    )
    return ds.repartition(target_num_rows_per_block=rows_per_block) if rows_per_block else ds


def _count_block(batch: pa.Table, max_messages: int) -> pa.Table:
    """Image rows -> one row of counts (and the first few invalid-row messages, torn output files)."""
    c = {"images": 0, "todo": 0, "done": 0, "invalid": 0}
    messages, torn = [], []
    for r in batch.to_pylist():
        if r["image_uri"] is not None:
            c["images"] += r["part"] == 0
            c["todo"] += len(r["queries"])
            continue
        for q in r["queries"]:
            if q["error_stage"] == "done":
                c["done"] += 1
            elif q["error_stage"] == "torn":
                torn.append(q["source"])
            else:
                c["invalid"] += 1
                if len(messages) < max_messages:
                    messages.append(q["error"])
    return pa.table({**{k: [v] for k, v in c.items()}, "messages": [messages], "torn": [torn]})


def count_queries(images, max_messages: int = 5) -> dict:
    """Counts over an image dataset (``image_dataset(..., keep_done=True)``), computed on the cluster, one small row
    per block back to the driver: {queries, images, done, invalid, messages, torn}."""
    out = {"queries": 0, "images": 0, "done": 0, "invalid": 0, "messages": [], "torn": []}
    blocks = images.map_batches(_count_block, batch_format="pyarrow", batch_size=None,
                                fn_kwargs={"max_messages": max_messages})  # fmt: skip
    for r in blocks.iter_rows():  # streamed: one small row per block
        for k in ("images", "done", "invalid"):
            out[k] += r[k]
        out["queries"] += r["todo"] + r["done"] + r["invalid"]
        out["messages"] += r["messages"][: max_messages - len(out["messages"])]
        out["torn"] += r["torn"]
    return out
