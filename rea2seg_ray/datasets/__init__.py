"""Dataset readers: manifests (JSONL/JSON/Parquet), ReasonSeg folders (LISA format), synthetic scenes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .. import storage
from ..masks import decode_rle
from ..records import Query
from .manifest import iter_manifest
from .reasonseg import DatasetError, gt_mask_from_annotation, iter_reasonseg, load_annotation
from .refcoco import iter_refcoco
from .shards import InputSpec, resolve_input

SAMPLE_SCENES = Path(__file__).resolve().parent.parent / "sample_data" / "scenes"
# Progressive dialogues (MIRAS-style) over four scenes: `conversation` rows (rea2seg make-scenes categories=[dialogue]).
DIALOGUE_SAMPLE = SAMPLE_SCENES.parent / "dialogues"

__all__ = [
    "DIALOGUE_SAMPLE",
    "DatasetError",
    "InputSpec",
    "SAMPLE_SCENES",
    "detect_format",
    "iter_manifest",
    "iter_reasonseg",
    "load_ground_truth",
    "read_queries",
    "resolve_input",
]


def detect_format(uri: str) -> str:
    """manifest | reasonseg, for the same inputs the segmentation job reads (see ``shards.resolve_input``)."""
    return resolve_input(uri).kind


def read_queries(
    uri: str,
    format: str = "auto",
    texts: str = "first",
    limit: int = 0,
    strict: bool = True,
    split: str = "",
    images: str = "",
) -> Iterator[Query]:
    """All queries of a dataset, on this process (for evaluation and small inputs; the segmentation job reads on the
    cluster instead). ``format``: auto | jsonl | parquet | manifest | reasonseg | refcoco (``split``, ``images``).
    Shards are read in path order; a query id repeated across them is an error like one repeated within a file."""
    spec = resolve_input(uri, format, split, images)
    if spec.kind == "reasonseg":
        it = iter_reasonseg(uri, texts=texts, strict=strict)
    elif spec.kind == "refcoco":
        it = iter_refcoco(spec.files[0], split=spec.split, images=spec.images, strict=strict)
    else:
        seen: set[str] = set()
        it = (q for f in spec.files for q in iter_manifest(f, strict=strict, seen=seen))
    for n, q in enumerate(it):
        if limit and n >= limit:
            return
        yield q


def image_size(uri: str) -> tuple[int, int]:
    """(height, width) of an image, reading only what PIL needs to know the size."""
    import io

    from PIL import Image

    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise DatasetError(f"{uri}: image not found") from e
    try:
        with Image.open(io.BytesIO(raw)) as im:
            # LISA reads images with cv2, which applies EXIF orientation; so does our decode stage. Orientations
            # 5-8 turn the image by 90 degrees: the header's width and height swap, no decode needed.
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
    except Exception as e:
        raise DatasetError(f"{uri}: not a readable image: {e}") from e
    return h, w


def has_ground_truth(q: Query) -> bool:
    """Whether the query names a ground truth (``gt_mask``, ``gt_instances`` or ``gt_json``), without loading it."""
    return bool(q.gt_mask or q.gt_instances or q.gt_json)


def load_ground_truth(q: Query, shape: tuple[int, int] | None = None) -> np.ndarray | None:
    """(H, W) uint8 ground truth {0, 1, 255} for a query, or None when it has none. With only ``gt_instances``,
    their union. ``shape`` (H, W): the image's size when the caller knows it (a LISA JSON's polygons are drawn at
    it without reading the image's header)."""
    if q.gt_mask:
        return decode_rle(q.gt_mask).astype(np.uint8)
    if q.gt_instances:
        return np.logical_or.reduce([decode_rle(r) for r in q.gt_instances]).astype(np.uint8)
    if q.gt_json:
        anno = load_annotation(q.gt_json)
        h, w = shape or image_size(q.image)
        return gt_mask_from_annotation(anno, h, w)
    return None


def ground_truth_instances(q: Query, gt: np.ndarray) -> list[np.ndarray]:
    """The target's instances as (H, W) bool masks: the manifest's ``gt_instances``, else the whole target as one
    instance (none when the target is empty)."""
    if q.gt_instances:
        return [decode_rle(r) for r in q.gt_instances]
    target = gt == 1
    return [target] if target.any() else []
