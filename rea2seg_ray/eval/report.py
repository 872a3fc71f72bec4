"""Evaluation driver and report: predictions + dataset -> metrics.json, report.md (a table laid out like the paper's),
per_query.jsonl.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pyarrow.parquet as pq

from .. import storage
from ..datasets import DatasetError, ground_truth_instances, has_ground_truth, load_ground_truth, read_queries
from ..datasets.shards import predictions_files, scheme_of
from ..records import Prediction, Query
from .metrics import QueryScore, aggregate, score_query

CATEGORY_ORDER = ["short", "long", "discriminative", "geometric", "spatial", "multi-step"]


def iter_predictions(uri: str, batch_rows: int = 256) -> Iterator[Prediction]:
    """Every prediction row under ``uri`` (a file, or a folder/prefix of *.parquet parts), one file and
    ``batch_rows`` rows at a time (never the whole output); each file read with its own schema."""
    files = predictions_files(uri)
    if not files:
        raise FileNotFoundError(f"predictions not found: {uri} (no *.parquet)")
    for info in files:
        data = storage.read_bytes(scheme_of(uri) + info.path)
        for batch in pq.ParquetFile(io.BytesIO(data)).iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                yield Prediction.from_row(row)


def evaluate_predictions(
    predictions: str,
    dataset: str,
    k: int = 3,
    **read_args,
) -> tuple[dict, list[QueryScore]]:
    """Score every ground-truth query of ``dataset`` (read with ``read_queries``' ``read_args``: format, texts,
    limit, split, images) against the predictions Parquet at ``predictions``; a query with no (or a failed)
    prediction scores 0. Returns the metrics and one QueryScore per query, in the dataset's order.

    Memory: the dataset's queries (ids and ground-truth references) and one small score per query; the predictions,
    with every candidate's mask, are streamed a batch at a time. A dataset without ground truth is refused at its
    first query, before any prediction is read (the segmentation job's default evaluation of an unannotated input)."""
    queries: dict[str, Query] = {}
    for q in read_queries(dataset, strict=True, **read_args):
        if not has_ground_truth(q):
            raise DatasetError(f"query {q.query_id} in {dataset} has no ground truth (gt_json or gt_mask)")
        queries[q.query_id] = q
    if not queries:
        raise DatasetError(f"{dataset}: no queries")

    def score(q: Query, pred: Prediction | None) -> QueryScore:
        gt = load_ground_truth(q)
        return score_query(pred, gt, q.category, q.query_id, k=k, instances=ground_truth_instances(q, gt))

    scored: dict[str, QueryScore] = {}
    for p in iter_predictions(predictions):
        if p.query_id in queries:  # a resumed run never duplicates ids; if a file did, the last row wins
            scored[p.query_id] = score(queries[p.query_id], p)
    scores = [scored.get(qid) or score(q, None) for qid, q in queries.items()]
    return aggregate(scores, k=k), scores


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def category_order(metrics: dict) -> list[str]:
    """The categories of a metrics dict in the paper's order (others after, by name)."""
    return sorted(
        metrics["by_category"], key=lambda c: (CATEGORY_ORDER.index(c) if c in CATEGORY_ORDER else 99, c)
    )


def render_markdown(metrics: dict, k: int = 3, title: str = "Rea2Seg") -> str:
    """Rows: top-1, top-k, oracle; columns: gIoU and cIoU per category, then overall (percent)."""
    cats = category_order(metrics)
    head = (
        "| method | " + " | ".join(f"{c} gIoU | {c} cIoU" for c in cats) + " | overall gIoU | overall cIoU |"
    )
    sep = "|---|" + "---:|" * (2 * len(cats) + 2)
    rows = []
    for level, name in (
        ("top1", f"{title} (top-1)"),
        (f"top{k}", f"{title} (top-{k})"),
        ("oracle", "oracle (best candidate)"),
    ):
        cells = []
        for c in cats:
            cells += [
                _pct(metrics["by_category"][c][level]["giou"]),
                _pct(metrics["by_category"][c][level]["ciou"]),
            ]
        cells += [_pct(metrics[level]["giou"]), _pct(metrics[level]["ciou"])]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{c}: {metrics['by_category'][c]['n']}" for c in cats)
    return "\n".join(
        [
            f"# {title}: evaluation",
            "",
            f"{metrics['n']} queries ({counts}); {metrics['n_error']} failed or missing (scored as IoU 0).",
            "",
            head,
            sep,
            *rows,
            "",
            f"Instances (selected candidates matching a ground-truth instance at IoU >= 0.5): precision "
            f"{_pct(metrics['instances']['precision'])}, recall {_pct(metrics['instances']['recall'])} "
            f"({metrics['instances']['matched']} of {metrics['instances']['selected']} selected, "
            f"{metrics['instances']['instances']} instances). Pixels (cumulative): precision "
            f"{_pct(metrics['pixels']['precision'])}, recall {_pct(metrics['pixels']['recall'])}, F1 "
            f"{_pct(metrics['pixels']['f1'])}.",
            "",
            "gIoU: mean per-query IoU; cIoU: cumulative intersection over cumulative union (LISA semantics, ignore "
            "pixels excluded). Values in percent.",
            "",
        ]
    )


def write_report(
    metrics: dict, scores: list[QueryScore], output: str, k: int = 3, title: str = "Rea2Seg"
) -> dict[str, str]:
    """Write metrics.json, report.md (with the plots), per_query.jsonl and plots/*.png under ``output`` (local or
    s3://). Returns their URIs (the plots under ``plots/<name>``)."""
    from .plots import markdown_section, write_plots

    paths = {name: storage.join(output, name) for name in ("metrics.json", "report.md", "per_query.jsonl")}
    plots = write_plots(metrics, scores, output, k=k)
    storage.write_bytes(paths["metrics.json"], (json.dumps(metrics, indent=2) + "\n").encode())
    report = render_markdown(metrics, k=k, title=title) + "\n" + markdown_section(plots)
    storage.write_bytes(paths["report.md"], report.encode())
    lines = [
        json.dumps(
            {
                "query_id": s.query_id,
                "category": s.category,
                "ok": s.ok,
                **{f"iou_{lv}": round(s.iou(lv), 6) for lv in s.iu},
            }
        )
        for s in scores
    ]
    storage.write_bytes(paths["per_query.jsonl"], ("\n".join(lines) + "\n").encode())
    paths.update({f"plots/{name}": uri for name, uri in plots.items()})
    return paths


def write_gallery(
    gallery,
    predictions: str,
    output: str,
    scores: list[QueryScore] | None = None,
    dataset: str = "",
    plots: list[str] | None = None,
    title: str = "Rea2Seg",
    **read_args,
) -> str | None:
    """``<output>/gallery/index.html`` for ``GalleryConfig`` ``gallery`` (None when disabled). With ``scores`` and
    ``dataset`` (read with ``read_queries``' ``read_args``) the page shows IoU and ground-truth outlines."""
    from .gallery import build_gallery

    if not gallery.enabled:
        return None

    def ground_truth(ids: set[str]) -> dict:
        return {
            q.query_id: load_ground_truth(q) for q in read_queries(dataset, **read_args) if q.query_id in ids
        }

    return build_gallery(
        predictions, output, max_queries=gallery.max_queries, thumbs=gallery.candidates,
        image_side=gallery.image_side, seed=gallery.seed, scores={s.query_id: s for s in scores or []} or None,
        ground_truth=ground_truth if dataset else None, plots=plots, title=title,
    )  # fmt: skip
