"""``rea2seg`` console script. Every command takes ``--config FILE`` and ``key=value`` overrides (OmegaConf dotlist).

rea2seg build-tiny-models [output=DIR]
rea2seg make-scenes output=DIR [n=32 seed=0]
rea2seg evaluate predictions=URI dataset=URI output=DIR
rea2seg export-coco predictions=URI output=FILE.json [dataset=URI] [--all-candidates]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

from .config import (
    COMMAND_CONFIGS,
    BuildTinyModelsConfig,
    ConfigError,
    EvaluateConfig,
    MakeScenesConfig,
    SegmentConfig,
    load_config,
    to_yaml,
)

log = logging.getLogger("rea2seg.cli")


def setup_logging(verbosity: int) -> None:
    """INFO by default (the plan, files written, what was moved aside), DEBUG with ``-v`` (prompts too), WARNING
    with ``-q``; exported to the Ray workers the command starts. The command's report goes to stdout."""
    import os

    from . import LOG_LEVEL_ENV, configure_logging

    level = {-1: "WARNING", 0: "INFO"}.get(max(-1, min(verbosity, 1)), "DEBUG")
    os.environ[LOG_LEVEL_ENV] = level
    configure_logging(level)


def read_args(cfg) -> dict:
    """How a command's config says to read its dataset: ``read_queries``' arguments."""
    return dict(format=cfg.format, texts=cfg.texts, split=cfg.split, images=cfg.images)


def cmd_build_tiny_models(cfg: BuildTinyModelsConfig) -> int:
    from .models.loading import tiny_model_dir
    from .models.tiny import build_tiny_models

    out = cfg.output or str(tiny_model_dir())
    t0 = time.perf_counter()
    built = build_tiny_models(out, seed=cfg.seed, force=cfg.force)
    for name, path in built.items():
        print(f"{name}: {path}")
    print(f"tiny models ready in {time.perf_counter() - t0:.1f}s under {out}")
    return 0


def cmd_make_scenes(cfg: MakeScenesConfig) -> int:
    from .datasets.synthetic import write_scenes

    manifest = write_scenes(
        cfg.output,
        cfg.n,
        seed=cfg.seed,
        width=cfg.width,
        height=cfg.height,
        categories=list(cfg.categories),
        name=cfg.name,
    )
    print(f"wrote {cfg.n} scenes to {cfg.output} (manifest: {manifest})")
    return 0


def cmd_evaluate(cfg: EvaluateConfig) -> int:
    from .eval.plots import PLOTS
    from .eval.report import evaluate_predictions, render_markdown, write_gallery, write_report

    metrics, scores = evaluate_predictions(cfg.predictions, cfg.dataset, k=cfg.k, **read_args(cfg))
    paths = write_report(metrics, scores, cfg.output, k=cfg.k, title=cfg.title)
    gallery = write_gallery(
        cfg.gallery, cfg.predictions, cfg.output, scores, cfg.dataset, [f"../plots/{n}" for n in PLOTS],
        cfg.title, **read_args(cfg),
    )  # fmt: skip
    print(render_markdown(metrics, k=cfg.k, title=cfg.title))
    print(f"metrics: {paths['metrics.json']}\nreport:  {paths['report.md']}")
    if gallery:
        print(f"gallery: {gallery}")
    return 0


def cmd_segment(cfg: SegmentConfig) -> int:
    from . import storage
    from .datasets import DatasetError
    from .eval.plots import PLOTS
    from .eval.report import evaluate_predictions, render_markdown, write_gallery, write_report
    from .pipeline.graph import predictions_uri, run_segment

    summary = run_segment(cfg)
    for line in summary.lines():
        print(f"[rea2seg] {line}")
    if cfg.dry_run:
        return 0
    pred_uri = predictions_uri(cfg)
    scores, plots = None, None
    if cfg.evaluate:
        try:
            metrics, scores = evaluate_predictions(pred_uri, summary.input, limit=cfg.limit, **read_args(cfg))
        except DatasetError as e:
            log.info("no evaluation: %s", e)
        else:
            paths = write_report(metrics, scores, storage.join(cfg.output, "eval"))
            plots = [f"../eval/plots/{n}" for n in PLOTS]
            print(render_markdown(metrics))
            print(f"[rea2seg] metrics: {paths['metrics.json']}")
    gallery = write_gallery(
        cfg.gallery, pred_uri, cfg.output, scores, summary.input if scores else "", plots, **read_args(cfg)
    )
    if gallery:
        print(f"[rea2seg] gallery: {gallery}")
    return 0


def cmd_export_coco(cfg) -> int:
    from .eval.coco import dataset_ids, export_coco

    ids = None
    if cfg.dataset:
        ids = dataset_ids(cfg.dataset, **read_args(cfg))
    c = export_coco(cfg.predictions, cfg.output, all_candidates=cfg.all_candidates, ids=ids)
    print(
        f"[rea2seg] COCO results: {cfg.output}: {c['results']} results from {c['queries']} queries "
        f"({c['errors']} error rows left out)"
        + (f"; {c['stable_ids']} with stable ids (mapping: {cfg.output}.ids.json)" if c["stable_ids"] else "")
    )
    return 0


def cmd_make_scoring_data(cfg) -> int:
    from .train.data import build_scoring_data

    counts = build_scoring_data(cfg)
    print(
        f"[rea2seg] mask-scoring data: {counts['examples']} examples ({counts['yes']} Yes, {counts['no']} No) from "
        f"{counts['queries_with_examples']} of {counts['queries']} queries -> {cfg.output}"
    )
    return 0


def cmd_finetune(cfg) -> int:
    from .train.trainer import run_finetune

    out = run_finetune(cfg)
    print(
        f"[rea2seg] trained to step {out['step']} (loss {out['loss']:.4f}, Yes/No token {out['answer_loss']:.4f}); "
        f"checkpoint: {out['checkpoint']}"
    )
    print(f"[rea2seg] exported scorer: {out['export']}")
    same = " ".join(
        f"scoring.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in out["serve_with"].items()
    )
    print(f"[rea2seg] use it with: rea2seg segment models.scorer={out['export']} {same}".rstrip())
    return 0


COMMANDS: dict[str, tuple[Callable, str]] = {
    "make-scoring-data": (
        cmd_make_scoring_data,
        "annotated queries + candidates -> Yes/No mask-scoring examples (Parquet)",
    ),
    "finetune": (cmd_finetune, "fine-tune the scorer with Ray Train; export a folder vLLM loads"),
    "segment": (
        cmd_segment,
        "run the Rea2Seg job (discover -> score -> Parquet) on Ray; then evaluate if there is ground truth",
    ),
    "build-tiny-models": (
        cmd_build_tiny_models,
        "write the offline random-init tiny models (five VLM families, four mask decoders)",
    ),
    "make-scenes": (
        cmd_make_scenes,
        "write synthetic scenes with exact ground truth (ReasonSeg folder + manifest)",
    ),
    "evaluate": (
        cmd_evaluate,
        "gIoU/cIoU at top-1/top-k/oracle, per category -> metrics.json, report.md, plots, gallery",
    ),
    "export-coco": (cmd_export_coco, "predictions -> a COCO results file (pycocotools COCO.loadRes)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rea2seg", description="Rea2Seg reasoning segmentation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", help="YAML config file (path, or a name under configs/)")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("-v", "--verbose", action="count", default=0, help="more log detail (debug)")
        p.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
        if name == "export-coco":
            p.add_argument(
                "--all-candidates", action="store_true", help="every kept candidate, not only top-1"
            )
        p.add_argument(
            "overrides", nargs="*", metavar="key=value", help="config overrides (OmegaConf dotlist)"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn, _ = COMMANDS[args.command]
    setup_logging(args.verbose - args.quiet)
    from .datasets import DatasetError
    from .models.loading import ModelNotFound
    from .pipeline.lease import LeaseHeld
    from .pipeline.watch import ClusterLost, Unschedulable

    try:
        overrides = [
            *args.overrides,
            *(["all_candidates=true"] if getattr(args, "all_candidates", False) else []),
        ]
        cfg = load_config(COMMAND_CONFIGS[args.command], args.config, overrides)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        return int(fn(cfg) or 0)
    except (ConfigError, DatasetError, ModelNotFound, FileNotFoundError, ValueError, LeaseHeld) as e:
        print(f"rea2seg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (Unschedulable, ClusterLost) as e:  # the run stopped on a cluster fault: a rerun resumes it
        print(f"rea2seg {args.command}: stopped: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
