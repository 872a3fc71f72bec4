"""Predictions Parquet -> a COCO results file (``rea2seg export-coco``), the list ``COCO.loadRes`` takes:
``[{"image_id", "category_id", "segmentation": RLE, "score", "query_id"[, "rank"]}, ...]``.

Ids: the manifest's ``image_id`` / ``category_id`` when ``dataset=`` names an input that has them (a RefCOCO input
always does), so the file scores against the user's own COCO ground truth. Otherwise stable ids: a hash of the image
URI and of the category name (the same image or name gets the same id in every export), listed in a mapping file
beside the results (``<file>.ids.json``: COCO-style ``images`` [{id, file_name}] and ``categories`` [{id, name}]).
Error rows have no mask and are left out (counted). The predictions are read batch by batch and the results
written as a stream.
"""

from __future__ import annotations

import hashlib
import json
import zlib

from .. import get_logger, storage

log = get_logger(__name__)
COLUMNS = ["query_id", "image_uri", "category", "status", "mask", "score", "candidates"]


def stable_image_id(image_uri: str) -> int:
    """A positive id below 2**48 (exact in JSON doubles) from the image URI."""
    return int.from_bytes(hashlib.sha1(image_uri.encode()).digest()[:6], "big") or 1


def stable_category_id(name: str) -> int:
    return (zlib.crc32((name or "object").encode()) & 0x7FFFFFFF) or 1


def dataset_ids(dataset: str, **read_args) -> dict[str, tuple[int | None, int | None]]:
    """{query_id: (image_id, category_id)} from an input's rows (None where a row has none); ``read_args``: those
    of ``read_queries``."""
    from ..datasets import read_queries

    out = {}
    for q in read_queries(dataset, strict=False, **read_args):
        img, cat = q.meta.get("image_id"), q.meta.get("category_id")
        out[q.query_id] = (int(img) if img is not None else None, int(cat) if cat is not None else None)
    return out


def export_coco(predictions: str, output: str, all_candidates: bool = False, ids: dict | None = None) -> dict:
    """Write the results file ``output`` (local or s3://); returns counts: results, queries, errors (left out),
    stable_ids (results whose ids were made here, listed in ``<output>.ids.json``)."""
    from ..datasets.shards import predictions_dataset

    ds = predictions_dataset(predictions)
    if ds is None:
        raise FileNotFoundError(f"predictions not found: {predictions} (no *.parquet)")
    cols = [c for c in COLUMNS if c != "candidates" or all_candidates]
    images: dict[str, int] = {}
    categories: dict[str, int] = {}
    counts = {"results": 0, "queries": 0, "errors": 0, "stable_ids": 0}
    fs, path = storage.filesystem(output)
    if not storage.is_remote(output):
        fs.create_dir(storage.parent(path), recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(b"[")
        first = True
        for batch in ds.to_batches(columns=cols):
            for row in batch.to_pylist():
                counts["queries"] += 1
                if row["status"] != "ok" or row["mask"] is None:
                    counts["errors"] += 1
                    continue
                img_id, cat_id = (ids or {}).get(row["query_id"], (None, None))
                if img_id is None or cat_id is None:
                    counts["stable_ids"] += 1
                if img_id is None:
                    img_id = images.setdefault(row["image_uri"], stable_image_id(row["image_uri"]))
                if cat_id is None:
                    name = row["category"] or "object"
                    cat_id = categories.setdefault(name, stable_category_id(name))
                if all_candidates and row["candidates"]:
                    masks = [(c["mask"], c["score"], c["rank"]) for c in row["candidates"]]
                else:
                    masks = [(row["mask"], row["score"], 0)]
                for mask, score, rank in masks:
                    res = {"image_id": img_id, "category_id": cat_id,
                           "segmentation": {"size": list(mask["size"]), "counts": mask["counts"]},
                           "score": float(score if score is not None else 0.0), "query_id": row["query_id"]}  # fmt: skip
                    if all_candidates:
                        res["rank"] = int(rank)
                    out.write((b"" if first else b",\n") + json.dumps(res).encode())
                    first = False
                    counts["results"] += 1
        out.write(b"]\n")
    if images or categories:
        mapping = {
            "images": [{"id": i, "file_name": uri} for uri, i in sorted(images.items(), key=lambda t: t[1])],
            "categories": [{"id": i, "name": n} for n, i in sorted(categories.items(), key=lambda t: t[1])],
        }
        storage.write_bytes(output + ".ids.json", json.dumps(mapping, indent=1).encode())
    log.info("COCO results: %s (%d results from %d queries; %d error rows left out)", output, counts["results"],
             counts["queries"], counts["errors"])  # fmt: skip
    return counts
