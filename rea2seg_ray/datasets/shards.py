"""What an ``input=`` names: a manifest file, a folder or prefix of shards, a glob (JSONL and Parquet, mixed), a
ReasonSeg folder, or (``format=refcoco``) a RefCOCO refs file; local or ``s3://``. Only file paths are listed here (never rows), so the driver stays small.
"""

from __future__ import annotations

import fnmatch
import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs

from .. import storage
from .reasonseg import DatasetError
from .refcoco import check_split, images_folder, resolve_refs

MANIFEST_EXTS = (".jsonl", ".ndjson", ".json", ".parquet")
SHARD_EXTS = (".jsonl", ".ndjson", ".parquet")  # a folder holding any of these is a folder of manifest shards


@dataclass
class InputSpec:
    """The resolved input: its kind, its files (URIs, sorted) and their total size in bytes."""

    uri: str
    kind: str  # manifest | reasonseg | refcoco
    files: list[str]
    total_bytes: int
    split: str = ""  # refcoco: the split read ('' = all)
    images: str = ""  # refcoco: the folder of the COCO images


def scheme_of(uri: str) -> str:
    """The URI scheme prefix to put back on pyarrow paths: ``s3://`` or nothing (local)."""
    return "s3://" if uri.startswith("s3://") else ""


def listing(uri: str) -> list[pafs.FileInfo]:
    """Every file at or under ``uri`` (a file itself, a folder, a prefix), sorted by path; [] when nothing is there."""
    fs, path = storage.filesystem(uri)
    info = storage.with_retries(lambda: fs.get_file_info(path), f"stat {uri}")
    if info.type == pafs.FileType.File:
        return [info]
    if info.type == pafs.FileType.NotFound:
        return []
    infos = storage.with_retries(
        lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True)), f"list {uri}"
    )
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def predictions_files(uri: str) -> list[pafs.FileInfo]:
    """The Parquet files of a predictions folder (a file itself, a folder, a prefix; empty when there is none)."""
    return [i for i in listing(uri) if i.path.endswith(".parquet")]


def predictions_dataset(uri: str):
    """The predictions under ``uri`` as one ``pyarrow.dataset`` (read lazily, column by column), or None."""
    import pyarrow.dataset as pads

    files = [i.path for i in predictions_files(uri)]
    fs, _ = storage.filesystem(uri)
    return pads.dataset(files, filesystem=fs, format="parquet") if files else None


FORMATS = ("auto", "jsonl", "json", "parquet", "manifest", "reasonseg", "refcoco")


def resolve_input(uri: str, fmt: str = "auto", split: str = "", images: str = "") -> InputSpec:
    """Which files ``uri`` means and how to read them. Raises DatasetError when it names nothing readable.
    ``split`` and ``images`` apply to ``format=refcoco`` only (see ``datasets/refcoco.py``)."""
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r} ({', '.join(FORMATS)})")
    if fmt == "refcoco":
        refs = resolve_refs(uri)
        size = listing(refs)[0].size or 0
        return InputSpec(uri, "refcoco", [refs], size, check_split(split), images_folder(refs, images))
    prefix = scheme_of(uri)
    if any(ch in uri for ch in "*?["):
        # A glob: list from its longest literal folder, keep what matches the whole pattern.
        _, pattern = storage.filesystem(uri)
        literal = pattern
        while any(ch in literal for ch in "*?["):
            literal = posixpath.dirname(literal)
        base = prefix + literal if prefix else literal
        infos = [i for i in listing(base) if fnmatch.fnmatchcase(i.path, pattern)]
        infos = [i for i in infos if i.path.lower().endswith(MANIFEST_EXTS)]
        if not infos:
            raise DatasetError(f"{uri}: no manifest files (.jsonl/.ndjson/.json/.parquet) match")
        return InputSpec(uri, "manifest", [prefix + i.path for i in infos], sum(i.size or 0 for i in infos))
    infos = listing(uri)
    if not infos:
        raise DatasetError(f"{uri}: not found (no such file, folder or prefix)")
    fs, path = storage.filesystem(uri)
    single = len(infos) == 1 and infos[0].path.rstrip("/") == path.rstrip("/")
    if single:
        if fmt == "reasonseg" or not infos[0].path.lower().endswith(MANIFEST_EXTS):
            raise DatasetError(
                f"{uri}: cannot tell the dataset format (use a .jsonl/.parquet manifest, a folder of them, a glob, "
                "or a ReasonSeg folder)"
            )
        return InputSpec(uri, "manifest", [prefix + infos[0].path], infos[0].size or 0)
    shards = [i for i in infos if i.path.lower().endswith(SHARD_EXTS)]
    if fmt != "reasonseg" and (shards or fmt in ("jsonl", "json", "parquet", "manifest")):
        shards = shards or [i for i in infos if i.path.lower().endswith(MANIFEST_EXTS)]
        if not shards:
            raise DatasetError(f"{uri}: no manifest files (.jsonl/.ndjson/.json/.parquet) in this folder")
        return InputSpec(uri, "manifest", [prefix + i.path for i in shards], sum(i.size or 0 for i in shards))
    annos = [i for i in infos if i.path.lower().endswith(".json")]
    if not annos:
        raise DatasetError(f"{uri}: no manifest shards and no ReasonSeg annotations (*.json) found")
    return InputSpec(uri, "reasonseg", [prefix + i.path for i in annos], sum(i.size or 0 for i in annos))
