"""ReasonSeg folders in LISA's format: ``<name>.jpg`` + ``<name>.json`` (``text`` list, ``is_sentence``, ``shapes``).

Query ids are ``<name>`` (first text only, the default) or ``<name>:<i>`` (one query per text, ``texts="all"``),
so they are stable across runs. The category is the JSON's ``category`` when present (SGDR-style), else ``long`` /
``short`` from ``is_sentence`` as in the ReasonSeg paper's table.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from pathlib import PurePosixPath

import numpy as np

from .. import storage
from ..masks import shapes_to_mask
from ..records import Query

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class DatasetError(ValueError):
    """Input data is malformed; the message names the file."""


def parse_annotation(raw: bytes, where: str) -> dict:
    """Parse and validate a LISA annotation. Raises DatasetError naming ``where``."""
    try:
        anno = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        try:  # LISA falls back to cp1252 for a few ReasonSeg files
            anno = json.loads(raw.decode("cp1252"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(f"{where}: malformed JSON annotation: {e}") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: malformed JSON annotation: {e}") from e
    if not isinstance(anno, dict):
        raise DatasetError(f"{where}: annotation must be a JSON object, got {type(anno).__name__}")
    texts = anno.get("text")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise DatasetError(f"{where}: 'text' must be a non-empty list of strings")
    shapes = anno.get("shapes", [])
    if not isinstance(shapes, list):
        raise DatasetError(f"{where}: 'shapes' must be a list")
    for i, s in enumerate(shapes):
        if not isinstance(s, dict) or "points" not in s:
            raise DatasetError(f"{where}: shape {i} has no 'points'")
        label = str(s.get("label", ""))
        if label.lower() == "flag":
            continue  # deprecated two-point markers; LISA skips them
        pts = s["points"]
        try:
            arr = np.asarray(pts, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{where}: shape {i} ('{label}') has non-numeric points") from e
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise DatasetError(f"{where}: shape {i} ('{label}') points must be [[x, y], ...]")
        if len(arr) < 3:
            raise DatasetError(
                f"{where}: shape {i} ('{label}') is a polygon with {len(arr)} point(s); needs at least 3"
            )
    anno["text"] = texts
    return anno


def load_annotation(uri: str) -> dict:
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise DatasetError(f"{uri}: annotation file not found") from e
    return parse_annotation(raw, uri)


def gt_mask_from_annotation(anno: dict, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 ground truth (1 target, 255 ignore) exactly as LISA's loader draws it."""
    return shapes_to_mask(anno.get("shapes", []), height, width)


def _find_image(stem_uri: str, files: set[str]) -> str | None:
    for ext in IMAGE_EXTS:
        for cand in (stem_uri + ext, stem_uri + ext.upper()):
            if cand in files:
                return cand
    return None


def annotation_queries(anno: dict, name: str, image: str, gt_json: str, texts: str = "first") -> list[Query]:
    """The queries of one parsed annotation: ``<name>`` (first text) or ``<name>:<i>`` (every text, ``texts="all"``);
    the category is the JSON's ``category`` when present, else ``long`` / ``short`` from ``is_sentence``."""
    category = str(anno.get("category") or ("long" if anno.get("is_sentence") else "short"))
    chosen = list(enumerate(anno["text"]))[: 1 if texts == "first" else None]
    return [
        Query(query_id=name if texts == "first" else f"{name}:{i}", image=image, question=text, category=category,
              gt_json=gt_json)
        for i, text in chosen
    ]  # fmt: skip


def iter_reasonseg(folder: str, texts: str = "first", strict: bool = True) -> Iterator[Query]:
    """Yield one Query per annotation (or per text with ``texts="all"``), sorted by file name.

    strict: raise DatasetError on a malformed annotation or missing image; otherwise yield a Query whose
    ``meta["error"]`` says what is wrong (the pipeline turns it into an error row).
    """
    if texts not in ("first", "all"):
        raise DatasetError(f"texts must be 'first' or 'all', got {texts!r}")
    files = list(storage.list_files(folder))
    fileset = set(files)
    jsons = [f for f in files if f.lower().endswith(".json")]
    if not jsons:
        raise DatasetError(f"{folder}: no ReasonSeg annotations (*.json) found")
    for jpath in jsons:
        stem_uri = jpath[: -len(".json")]
        name = PurePosixPath(stem_uri).name if storage.is_remote(jpath) else posixpath.basename(stem_uri)
        image = _find_image(stem_uri, fileset)
        try:
            anno = load_annotation(jpath)
            if image is None:
                raise DatasetError(f"{stem_uri}.jpg: image not found (annotation {jpath})")
        except DatasetError as e:
            if strict:
                raise
            yield Query(
                query_id=name,
                image=image or stem_uri + ".jpg",
                gt_json=jpath,
                meta={"error": str(e), "error_stage": "read"},
            )
            continue
        yield from annotation_queries(anno, name, image, jpath, texts)
