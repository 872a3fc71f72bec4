"""Mask-scoring data: annotated queries + candidates -> one example per (query, candidate) with its IoU to the
ground truth, a Yes/No label (ambiguous middle band dropped; negatives balanced per query) and the reasoning to
train on (the query's chain of thought, then what the candidate is when the manifest describes its given
candidates). Built with Ray Data, reusing the pipeline's decode and discovery stages, written as Parquet.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa

from ..datasets import gt_mask_from_annotation, load_annotation
from ..masks import decode_rle, intersection_union, iou_from_iu
from ..pipeline.stages import _to_original
from ..records import MASK_TYPE, Candidate, Query
from ..scoring.prompts import TEMPLATES

EXAMPLE_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("query_id", pa.string()),
        ("image_uri", pa.string()),
        ("question", pa.string()),
        ("category", pa.string()),
        ("mask", MASK_TYPE),
        ("source", pa.string()),
        ("iou", pa.float32()),
        ("label", pa.string()),  # "Yes" | "No"
        ("reasoning", pa.string()),
    ]
)


def label_for(iou: float, pos_iou: float, neg_iou: float) -> str | None:
    if iou >= pos_iou:
        return "Yes"
    if iou <= neg_iou:
        return "No"
    return None


def _rng(query_id: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(hashlib.sha1(query_id.encode()).hexdigest()[:8], 16)])


def balance(
    examples: list[dict], max_neg_per_pos: float, keep_without_positive: bool, rng: np.random.Generator
) -> list[dict]:
    """Keep every positive and at most ``max_neg_per_pos`` negatives per positive (hardest, i.e. highest IoU,
    first; random among ties). 0 keeps all."""
    if max_neg_per_pos <= 0:
        return examples
    pos = [e for e in examples if e["label"] == "Yes"]
    neg = [e for e in examples if e["label"] == "No"]
    n = (
        int(np.ceil(max_neg_per_pos * len(pos)))
        if pos
        else (max(1, int(np.ceil(max_neg_per_pos))) if keep_without_positive else 0)
    )
    order = sorted(range(len(neg)), key=lambda i: (-neg[i]["iou"], rng.random()))
    return pos + [neg[i] for i in order[:n]]


def _described(q: Query, shape: tuple[int, int]) -> list[tuple[np.ndarray, str]]:
    """The query's given candidates that carry a description (manifest ``candidate_descriptions``), as masks."""
    names = q.meta.get("candidate_descriptions") or []
    out = []
    for rle, name in zip(q.candidates or [], names, strict=False):
        m = decode_rle(rle)
        if name and m.shape == shape:
            out.append((m, str(name)))
    return out


def _description(mask: np.ndarray, described: list[tuple[np.ndarray, str]], min_iou: float) -> str:
    """The description of the given candidate this mask is (best IoU, at least ``min_iou``: the same bar that makes
    a candidate count as the ground truth), or ""."""
    best, name = min_iou, ""
    for m, n in described:
        iou = iou_from_iu(*intersection_union(mask, m))
        if iou >= best:
            best, name = iou, n
    return name


def example_reasoning(q: Query, description: str) -> str:
    """The reasoning a scorer is trained to write for one candidate: the query's own (``reasoning`` / ``cot``),
    then what the highlighted region is, when the candidate has a description."""
    parts = [str(q.meta.get("reasoning") or q.meta.get("cot") or "").strip()]
    if description:
        parts.append(TEMPLATES["describe"].format(description=description))
    return " ".join(p for p in parts if p)


def label_batch(
    batch: pa.Table,
    pos_iou: float,
    neg_iou: float,
    max_neg_per_pos: float,
    keep_without_positive: bool,
    seed: int,
) -> pa.Table:
    """STAGE rows with candidates -> EXAMPLE rows. Rows that failed earlier, or have no ground truth, yield none."""
    out: list[dict] = []
    for r in batch.to_pylist():
        if r["error"] or not r["candidates_json"]:
            continue
        q = Query(**json.loads(r["query_json"]))
        shape = (r["height"], r["width"])
        if q.gt_mask:
            gt = decode_rle(q.gt_mask).astype(np.uint8)
        elif q.gt_json:
            gt = gt_mask_from_annotation(load_annotation(q.gt_json), *shape)
        else:
            continue
        examples = []
        described = _described(q, shape)
        for k, c in enumerate(json.loads(r["candidates_json"])):
            cand = _to_original(Candidate.from_row(c), shape)
            m = decode_rle(cand.mask)
            iou = iou_from_iu(*intersection_union(m, gt))
            lab = label_for(iou, pos_iou, neg_iou)
            if lab is None:
                continue
            examples.append({
                "example_id": f"{q.query_id}#{k}", "query_id": q.query_id, "image_uri": q.image, "question": q.text(),
                "category": q.category, "mask": cand.mask, "source": cand.source, "iou": iou, "label": lab,
                "reasoning": example_reasoning(q, _description(m, described, pos_iou)),
            })  # fmt: skip
        out += balance(examples, max_neg_per_pos, keep_without_positive, _rng(q.query_id, seed))
    return pa.Table.from_pylist(out, schema=EXAMPLE_SCHEMA)


def build_scoring_data(cfg) -> dict:
    """Run the Ray Data job for ``MakeScoringDataConfig``; returns counts."""
    import ray

    from .. import storage
    from ..config import SegmentConfig
    from ..datasets import read_queries
    from ..pipeline.graph import discovered_dataset, init_ray, worker_env

    existing = storage.list_files(cfg.output, recursive=True) if storage.exists(cfg.output) else []
    if any(f.endswith(".parquet") for f in existing):
        raise FileExistsError(f"{cfg.output} already holds Parquet files: choose a new output folder")
    queries = list(read_queries(cfg.input, format=cfg.format, texts=cfg.texts, limit=cfg.limit, strict=False))
    seg = SegmentConfig(
        models=cfg.models,
        discovery=cfg.discovery,
        discover_pool=cfg.discover_pool,
        ray=cfg.ray,
        max_image_side=cfg.max_image_side,
    )
    init_ray(seg)
    ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress_bars
    ds = discovered_dataset(seg, queries, worker_env())
    ds = ds.map_batches(label_batch, batch_format="pyarrow", batch_size=16, num_cpus=0.25, fn_kwargs=dict(
        pos_iou=cfg.pos_iou, neg_iou=cfg.neg_iou, max_neg_per_pos=cfg.max_neg_per_pos,
        keep_without_positive=cfg.keep_without_positive, seed=cfg.seed))  # fmt: skip
    fs, path = storage.filesystem(cfg.output)
    if not storage.is_remote(cfg.output):
        fs.create_dir(path, recursive=True)
    ds.write_parquet(path, filesystem=fs)
    import pyarrow.dataset as pads

    t = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["label", "query_id"])
    labels = t.column("label").to_pylist()
    counts = {"queries": len(queries), "queries_with_examples": len(set(t.column("query_id").to_pylist())),
              "examples": len(labels), "yes": labels.count("Yes"), "no": labels.count("No")}  # fmt: skip
    return counts
