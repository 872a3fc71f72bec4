"""Mask-scoring data: annotated queries + candidates -> one example per (query, candidate) with its IoU to the
ground truth, a Yes/No label (ambiguous middle band dropped; negatives balanced per query) and the reasoning to
train on (the query's chain of thought, then what the candidate is when the manifest describes its given
candidates). Built with Ray Data on the same graph head as the segmentation job (sharded input, one row per image,
decode, discovery: ``runtime``), written as Parquet.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from ..datasets import load_ground_truth
from ..masks import decode_rle, intersection_union, iou_from_iu
from ..records import MASK_TYPE, TURN_TYPE, Candidate, Query
from ..scoring.facts import FACTS_TYPE, candidate_facts
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
        # The dialogue, roles kept, when the query was one (null for a question): training renders it as scoring does.
        ("conversation", pa.list_(TURN_TYPE)),
        # The candidate measured against every candidate of its query (before negatives were balanced away):
        # fine-tuning with scoring.candidate_facts says it after the candidate image, as scoring does.
        ("facts", FACTS_TYPE),
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
    examples: list[dict],
    max_neg_per_pos: float,
    keep_without_positive: bool,
    rng: np.random.Generator,
    named: set[str] | frozenset[str] = frozenset(),
) -> list[dict]:
    """Keep every positive and at most ``max_neg_per_pos`` negatives per positive (hardest first: highest IoU,
    then the ones the question names, ``named`` example ids; random among ties). 0 keeps all."""
    if max_neg_per_pos <= 0:
        return examples
    pos = [e for e in examples if e["label"] == "Yes"]
    neg = [e for e in examples if e["label"] == "No"]
    n = (
        int(np.ceil(max_neg_per_pos * len(pos)))
        if pos
        else (max(1, int(np.ceil(max_neg_per_pos))) if keep_without_positive else 0)
    )
    order = sorted(
        range(len(neg)), key=lambda i: (-neg[i]["iou"], neg[i]["example_id"] not in named, rng.random())
    )
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
    """Image rows with discovered candidates -> EXAMPLE rows. Queries that failed earlier, or have no ground
    truth, yield none."""
    out: list[dict] = []
    for r in batch.to_pylist():
        if r["error"] or r["image"] is None:
            continue
        shape = (r["height"], r["width"])
        for qs in r["queries"]:
            if qs["error"] or not qs["found"]:
                continue
            out += _examples(Query.from_struct(qs), qs["found"], shape, pos_iou, neg_iou, max_neg_per_pos,
                             keep_without_positive, seed)  # fmt: skip
    return pa.Table.from_pylist(out, schema=EXAMPLE_SCHEMA)


def _examples(
    q: Query, found: list[dict], shape: tuple[int, int], pos_iou: float, neg_iou: float, max_neg_per_pos: float,
    keep_without_positive: bool, seed: int,
) -> list[dict]:  # fmt: skip
    gt = load_ground_truth(q, shape)
    if gt is None:
        return []
    examples = []
    instances = [decode_rle(r).astype(np.uint8) for r in q.gt_instances] if q.gt_instances else [gt]
    described = _described(q, shape)
    cands = [Candidate.from_row(c).at_size(shape) for c in found]
    masks = [decode_rle(c.mask) for c in cands]
    names = [_description(m, described, pos_iou) for m in masks]
    facts = candidate_facts(masks, names)
    for k, (cand, m) in enumerate(zip(cands, masks, strict=True)):
        # Several objects answer the question: a candidate is right when it is one of them.
        iou = max(iou_from_iu(*intersection_union(m, g)) for g in instances) if instances else 0.0
        lab = label_for(iou, pos_iou, neg_iou)
        if lab is None:
            continue
        examples.append({
            "example_id": f"{q.query_id}#{k}", "query_id": q.query_id, "image_uri": q.image, "question": q.text(),
            "category": q.category, "mask": cand.mask, "source": cand.source, "iou": iou, "label": lab,
            "reasoning": example_reasoning(q, names[k]),
            "conversation": q.conversation or None, "facts": facts[k].to_struct(),
        })  # fmt: skip
    # A wrong candidate the question names ("First find the red star; then segment the object closest to it.") is
    # the negative that teaches reading the question past its nouns: kept before others of the same IoU.
    question = q.text().lower()
    named = {f"{q.query_id}#{k}" for k, n in enumerate(names) if n and n.lower() in question}
    return balance(examples, max_neg_per_pos, keep_without_positive, _rng(q.query_id, seed), named)


def build_scoring_data(cfg) -> dict:
    """Run the Ray Data job for ``MakeScoringDataConfig``; returns counts."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import ray

    from .. import storage
    from ..config import VLLMConfig
    from ..datasets import resolve_input
    from ..runtime import init_ray, worker_env
    from ..runtime.inputs import count_queries, image_dataset
    from ..runtime.stages import discovered_dataset

    existing = storage.list_files(cfg.output, recursive=True) if storage.exists(cfg.output) else []
    if any(f.endswith(".parquet") for f in existing):
        raise FileExistsError(f"{cfg.output} already holds Parquet files: choose a new output folder")
    spec = resolve_input(cfg.input, cfg.format, cfg.split, cfg.images)
    init_ray(cfg.ray)
    images = image_dataset(cfg, spec, None, rows_per_block=cfg.discover_pool.batch_size)
    ds = discovered_dataset(
        images, max_image_side=cfg.max_image_side, decode_num_cpus=cfg.decode_num_cpus, limits=cfg.limits,
        discovery=cfg.discovery, models=cfg.models, pool=cfg.discover_pool, env=worker_env(),
        max_question_tokens=cfg.limits.question_tokens(VLLMConfig().max_model_len),
    )  # fmt: skip
    ds = ds.map_batches(label_batch, batch_format="pyarrow", batch_size=16, num_cpus=0.25, fn_kwargs=dict(
        pos_iou=cfg.pos_iou, neg_iou=cfg.neg_iou, max_neg_per_pos=cfg.max_neg_per_pos,
        keep_without_positive=cfg.keep_without_positive, seed=cfg.seed))  # fmt: skip
    fs, path = storage.filesystem(cfg.output)
    if not storage.is_remote(cfg.output):
        fs.create_dir(path, recursive=True)
    ds.write_parquet(path, filesystem=fs)
    # Counted from the written examples' two small columns (labels and ids: not the masks), streaming: the driver
    # holds one batch of labels at a time, and the distinct query ids are counted by a Ray Data group-by, not in a
    # set here (ten million queries would not fit).
    counts = {"examples": 0, "yes": 0, "no": 0}
    for b in pads.dataset(path, filesystem=fs, format="parquet").to_batches(columns=["label"]):
        labels = b.column("label")
        counts["examples"] += len(labels)
        counts["yes"] += pc.sum(pc.equal(labels, "Yes")).as_py() or 0
        counts["no"] += pc.sum(pc.equal(labels, "No")).as_py() or 0
    ids = ray.data.read_parquet(path, filesystem=fs, columns=["query_id"], file_extensions=["parquet"])
    counts["queries_with_examples"] = ids.groupby("query_id").count().count() if counts["examples"] else 0
    counts["queries"] = count_queries(image_dataset(cfg, spec, None))["queries"]
    return counts
