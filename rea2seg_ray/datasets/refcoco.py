"""RefCOCO / RefCOCO+ / RefCOCOg (``format=refcoco``): one query per referring sentence, the referred instance's mask
as ground truth, the split as the query's category (so evaluation reports each split's gIoU / cIoU).

Two published forms are read, never the pickles:

- JSON (the refer API's data converted, as the GRES / SEEM releases ship it): ``refs(<split_by>).json`` (a list of
  refs: ``ref_id``, ``ann_id``, ``image_id``, ``split``, ``sentences`` [{``sent_id``, ``sent``}], ``category_id``)
  beside ``instances.json`` (COCO: ``images`` with ``file_name`` / ``height`` / ``width``, ``annotations`` with the
  ``segmentation`` polygons or RLE);
- Parquet: the same refs, one row per ref, with the annotation and image record either in ``instances.json`` beside
  it or in each row as ``raw_anns`` / ``raw_image_info`` (JSON strings, the jxu124/refcoco layout).

``input=`` names the refs file, or a folder holding exactly one refs file. Images are ``<images>/<file_name>``:
``images=`` when given, else the ``images/`` folder beside the refs file. Query ids are ``ref<ref_id>:<sent_id>``,
stable across runs; ``image_id`` and ``category_id`` (COCO's) ride in the query's ``meta`` for ``export-coco``.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterator

import numpy as np
from pycocotools import mask as mask_utils

from .. import storage
from ..records import Query
from .manifest import manifest_rows
from .reasonseg import DatasetError

REFS_EXTS = (".json", ".parquet")
SPLITS = ("", "train", "val", "test", "testA", "testB", "testC")


def is_refs_file(path: str) -> bool:
    name = posixpath.basename(path)
    return name.startswith("refs") and name.lower().endswith(REFS_EXTS)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {', '.join(s or repr(s) for s in SPLITS)}; got {split!r}")
    return split


def segmentation_rle(segm, height: int, width: int, where: str) -> dict:
    """A COCO ``segmentation`` (polygons [[x, y, ...], ...], uncompressed or compressed RLE) -> our RLE
    ``{"size": [h, w], "counts": str}``, rasterised by pycocotools exactly as COCO's own tools do."""
    try:
        if isinstance(segm, list):
            polys = [p for p in segm if isinstance(p, list) and len(p) >= 6]
            if not polys:
                raise ValueError("no polygon with at least 3 points")
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
            rle = mask_utils.frPyObjects(segm, height, width)
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), str | bytes):
            rle = {"size": segm["size"], "counts": segm["counts"]}
            rle["counts"] = rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]
        else:
            raise ValueError(f"unknown segmentation {type(segm).__name__}")
    except (ValueError, TypeError, KeyError) as e:
        raise DatasetError(f"{where}: bad segmentation: {e}") from e
    counts = rle["counts"]
    return {
        "size": [int(height), int(width)],
        "counts": counts.decode() if isinstance(counts, bytes) else counts,
    }


def load_instances(uri: str) -> tuple[dict[int, dict], dict[int, dict]]:
    """``instances.json`` -> ({ann_id: annotation}, {image_id: image record})."""
    try:
        data = json.loads(storage.read_bytes(uri))
    except FileNotFoundError as e:
        raise DatasetError(f"{uri}: not found (RefCOCO refs need instances.json beside them)") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{uri}: malformed JSON: {e}") from e
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise DatasetError(f"{uri}: not a COCO instances file (needs 'images' and 'annotations')")
    return {int(a["id"]): a for a in data["annotations"]}, {int(i["id"]): i for i in data["images"]}


def iter_refs(uri: str, source=None) -> Iterator[dict]:
    """The ref records of a refs file (a JSON list, or Parquet row group by row group), read as manifests are
    (``manifest_rows``). ``source``: the file, open and seekable (default: read through storage)."""
    f = source if source is not None else io.BytesIO(storage.read_bytes(uri))
    for _, ref in manifest_rows(f.read, uri, lambda: f):
        if isinstance(ref, Exception):
            raise ref
        yield ref


def _record(ref: dict, key: str, raw_key: str, table: dict[int, dict] | None, where: str) -> dict:
    """The annotation (or image record) of a ref: its ``raw_*`` JSON column, else instances.json's entry."""
    raw = ref.get(raw_key)
    if raw:
        rec = json.loads(raw) if isinstance(raw, str) else raw
        return rec[0] if isinstance(rec, list) else rec
    if table is None:
        raise DatasetError(f"{where}: no {raw_key} column and no instances.json beside the refs file")
    try:
        return table[int(ref[key])]
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{where}: {key} {ref.get(key)!r} is not in instances.json") from e


def ref_queries(
    ref: dict, where: str, images: str, anns: dict | None, imgs: dict | None, split: str = ""
) -> list[Query]:
    """One ref -> one Query per referring sentence (none when its split is not ``split``). Raises DatasetError."""
    if not isinstance(ref, dict) or "ref_id" not in ref:
        raise DatasetError(f"{where}: a ref needs 'ref_id'")
    if split and ref.get("split") != split:
        return []
    sentences = ref.get("sentences")
    if isinstance(sentences, np.ndarray):
        sentences = sentences.tolist()
    if not isinstance(sentences, list) or not sentences:
        raise DatasetError(f"{where}: ref {ref['ref_id']} has no sentences")
    ann = _record(ref, "ann_id", "raw_anns", anns, where)
    img = _record(ref, "image_id", "raw_image_info", imgs, where)
    h, w = int(img.get("height") or 0), int(img.get("width") or 0)
    if h <= 0 or w <= 0 or not img.get("file_name"):
        raise DatasetError(f"{where}: image {ref.get('image_id')} needs file_name, height and width")
    gt = segmentation_rle(ann.get("segmentation"), h, w, f"{where} (ann {ann.get('id', ref.get('ann_id'))})")
    image = storage.join(images, str(img["file_name"]))
    meta = {"image_id": int(ref.get("image_id", img.get("id", 0))),
            "category_id": int(ref.get("category_id", ann.get("category_id", 0)))}  # fmt: skip
    out = []
    for i, s in enumerate(sentences):
        text = s.get("sent") or s.get("raw") if isinstance(s, dict) else s
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{where}: ref {ref['ref_id']} sentence {i} is empty")
        sent_id = s.get("sent_id", i) if isinstance(s, dict) else i
        out.append(Query(query_id=f"ref{ref['ref_id']}:{sent_id}", image=image, question=text.strip(),
                         category=str(ref.get("split") or ""), gt_mask=gt, meta=dict(meta)))  # fmt: skip
    return out


def resolve_refs(uri: str) -> str:
    """The refs file an ``input=`` means: itself, or the one refs file in the folder."""
    if is_refs_file(uri) and storage.exists(uri):
        return uri
    refs = [f for f in storage.list_files(uri) if is_refs_file(f)]
    if len(refs) != 1:
        found = ", ".join(posixpath.basename(f) for f in refs) or "none"
        raise DatasetError(
            f"{uri}: name one RefCOCO refs file (refs(<split_by>).json or .parquet); found {found}"
        )
    return refs[0]


def images_folder(refs_uri: str, images: str = "") -> str:
    return images or storage.join(storage.parent(refs_uri), "images")


def instances_beside(refs_uri: str) -> str | None:
    uri = storage.join(storage.parent(refs_uri), "instances.json")
    return uri if storage.exists(uri) else None


def iter_refcoco(
    refs_uri: str, split: str = "", images: str = "", strict: bool = True, source=None
) -> Iterator[Query]:
    """Yield the queries of a refs file (see the module docstring). ``strict``: raise on a bad ref; else yield an
    error Query for it (the pipeline turns it into an error row)."""
    check_split(split)
    inst = instances_beside(refs_uri)
    anns, imgs = load_instances(inst) if inst else (None, None)
    root = images_folder(refs_uri, images)
    for n, ref in enumerate(iter_refs(refs_uri, source)):
        where = f"{refs_uri} ref {n + 1}"
        try:
            yield from ref_queries(ref, where, root, anns, imgs, split)
        except DatasetError as e:
            if strict:
                raise
            rid = ref.get("ref_id") if isinstance(ref, dict) else None
            yield Query(query_id=f"ref{rid}" if rid is not None else f"{refs_uri}#ref{n + 1}", image="",
                        meta={"error": str(e), "error_stage": "read"})  # fmt: skip
