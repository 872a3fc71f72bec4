"""Evaluation plots (PNG, matplotlib's Agg backend: no display needed), written beside ``report.md``:

- ``giou_by_category.png``: top-1 / top-k / oracle gIoU per category and overall (the report's table as bars);
- ``iou_histogram.png``: the distribution of per-query top-1 IoU (failed queries count as 0);
- ``score_vs_iou.png``: every kept candidate's scorer score against its IoU with the ground truth (calibration:
  a scorer worth its name puts high scores on high IoU), top-1 candidates marked;
- ``candidates_per_query.png``: how many candidates each query kept.
"""

from __future__ import annotations

import io

from .. import storage
from .metrics import QueryScore

PLOTS = {
    "giou_by_category.png": "gIoU by category: top-1, top-k, oracle",
    "iou_histogram.png": "top-1 IoU per query",
    "score_vs_iou.png": "scorer score against IoU (calibration)",
    "candidates_per_query.png": "candidates per query",
}
TOP1_COLOUR = "#0082c8"


def _figure(width: float = 6.4, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    ax.grid(axis="y", alpha=0.3)
    return plt, fig, ax


def _save(plt, fig, uri: str) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def write_plots(metrics: dict, scores: list[QueryScore], output: str, k: int = 3) -> dict[str, str]:
    """Write the four plots under ``<output>/plots/`` (local or s3://). Returns {file name: URI}."""
    import numpy as np

    from .report import category_order

    paths = {name: storage.join(output, "plots", name) for name in PLOTS}
    cats = category_order(metrics)
    groups = [*cats, "overall"]
    levels = [
        ("top1", "top-1", TOP1_COLOUR),
        (f"top{k}", f"top-{k}", "#3cb44b"),
        ("oracle", "oracle", "#aaaaaa"),
    ]
    plt, fig, ax = _figure(max(6.4, 1.1 * len(groups) + 2))
    x = np.arange(len(groups))
    for j, (lv, label, colour) in enumerate(levels):
        vals = [100 * metrics["by_category"][c][lv]["giou"] for c in cats] + [100 * metrics[lv]["giou"]]
        ax.bar(x + (j - 1) * 0.27, vals, 0.27, label=label, color=colour)
    ax.set_xticks(
        x, [f"{g}\n(n={metrics['by_category'][g]['n'] if g != 'overall' else metrics['n']})" for g in groups]
    )
    ax.set_ylabel("gIoU (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(PLOTS["giou_by_category.png"])
    _save(plt, fig, paths["giou_by_category.png"])

    plt, fig, ax = _figure()
    ax.hist([s.iou("top1") for s in scores], bins=np.linspace(0, 1, 21), color=TOP1_COLOUR)
    ax.set_xlabel("top-1 IoU")
    ax.set_ylabel("queries")
    ax.set_title(f"{PLOTS['iou_histogram.png']} ({len(scores)} queries)")
    _save(plt, fig, paths["iou_histogram.png"])

    plt, fig, ax = _figure()
    ious = [v for s in scores for v in s.candidate_ious]
    sc = [v for s in scores for v in s.candidate_scores]
    ax.scatter(sc, ious, s=10, alpha=0.5, color="#888888", label="candidate")
    top = [(s.candidate_scores[0], s.candidate_ious[0]) for s in scores if s.candidate_scores]
    if top:
        ax.scatter(*zip(*top, strict=True), s=14, color=TOP1_COLOUR, label="top-1")
    ax.set_xlabel("scorer score")
    ax.set_ylabel("IoU with ground truth")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(PLOTS["score_vs_iou.png"])
    _save(plt, fig, paths["score_vs_iou.png"])

    plt, fig, ax = _figure()
    counts = [len(s.candidate_ious) for s in scores]
    top = max(counts, default=0)
    ax.hist(counts, bins=np.arange(top + 2) - 0.5, color="#f58231")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("candidates kept")
    ax.set_ylabel("queries")
    ax.set_title(PLOTS["candidates_per_query.png"])
    _save(plt, fig, paths["candidates_per_query.png"])
    return paths


def markdown_section(paths: dict[str, str]) -> str:
    """The plots as Markdown images, relative to ``report.md``."""
    lines = ["## Plots", ""]
    lines += [f"![{PLOTS[name]}](plots/{name})" for name in paths]
    return "\n".join(lines) + "\n"
