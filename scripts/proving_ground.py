#!/usr/bin/env python3
"""The proving ground: train a tiny scorer from scratch on synthetic scenes (at most 15 minutes on this CPU), serve
it with vLLM in `rea2seg segment`, and compare top-1 gIoU per category with the untrained scorer on held-out scenes.
Every step goes through the user's entry points (`rea2seg ...`). `make proving-ground` runs it.

    python scripts/proving_ground.py [--out outputs/proving-ground] [--train-scenes 4000] [--minutes 13]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REA2SEG = [sys.executable, "-m", "rea2seg_ray.cli"]
CATS = ["discriminative", "geometric", "spatial", "multi-step"]


def run(*args: str) -> str:
    print("$ rea2seg " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run([*REA2SEG, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-5000:])
        raise SystemExit(f"step failed: rea2seg {args[0]}")
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return r.stdout


def naming_accuracy(predictions: Path, manifest: Path) -> tuple[float, float, int]:
    """How often the served scorer's reasoning names a held-out candidate's colour and shape right: (colour, shape,
    candidates). Each output candidate is matched to the given shape it overlaps most."""
    import pyarrow.dataset as pads

    from rea2seg_ray.masks import decode_rle
    from rea2seg_ray.scoring.prompts import TEMPLATES

    scenes = {r["query_id"]: r for r in map(json.loads, manifest.read_text().splitlines())}
    prefix, suffix = TEMPLATES["describe"].split("{description}")
    colour = shape = n = 0
    for row in pads.dataset(str(predictions), format="parquet").to_table().to_pylist():
        scene = scenes[row["query_id"]]
        given = [decode_rle(m) for m in scene["candidates"]]
        for c in row["candidates"] or []:
            m = decode_rle(c["mask"])
            want = scene["candidate_descriptions"][max(range(len(given)), key=lambda i: (given[i] & m).sum())]
            text = c["reasoning"] or ""
            said = text[text.find(prefix) + len(prefix) :].split(suffix)[0].split() if prefix in text else []
            n += 1
            colour += said[:1] == want.split()[:1]
            shape += said[-1:] == want.split()[-1:]
    return colour / max(1, n), shape / max(1, n), n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/proving-ground")
    ap.add_argument("--train-scenes", type=int, default=4000)
    ap.add_argument("--heldout-scenes", type=int, default=400)
    ap.add_argument(
        "--minutes", type=float, default=13.0, help="training budget (the proving ground allows 15)"
    )
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument(
        "--reasoning-tokens", type=int, default=24, help="scoring.max_reasoning_tokens when served"
    )
    ap.add_argument("--lr", default="1e-3")
    ap.add_argument("--init-range", default="0.06")
    a = ap.parse_args()
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: remove it or pass --out")
    t_start = time.perf_counter()
    # Training scenes ask colour-and-shape questions; held-out scenes ask all four kinds (reported per category).
    run(
        "make-scenes",
        f"output={out / 'train'}",
        f"n={a.train_scenes}",
        "seed=1000",
        "categories=[discriminative]",
    )
    run("make-scenes", f"output={out / 'heldout'}", f"n={a.heldout_scenes}", "seed=2000")
    run(
        "make-scoring-data",
        f"input={out / 'train' / 'scenes.jsonl'}",
        f"output={out / 'data'}",
        "discovery.sources=[given]",
        "ray.progress_bars=false",
    )
    t0 = time.perf_counter()
    trained = run(
        "finetune",
        f"data={out / 'data'}",
        f"output={out / 'run'}",
        "train.reinit=true",
        f"train.init_range={a.init_range}",
        f"train.max_steps={a.max_steps}",
        f"train.max_minutes={a.minutes}",
        "train.num_workers=2",
        "train.cpus_per_worker=1",
        "train.batch_size=16",
        f"train.lr={a.lr}",
        "train.warmup_steps=50",
        # One image per prompt (the dimmed overlay shows the whole picture): a 0.6M-parameter model learns this
        # from scratch in minutes; with the original shown beside it, it stayed at chance for 13 minutes.
        "scoring.show_original=false",
        # Think, then answer: the scorer learns to say what the highlighted region is (the training data describes
        # each given shape) and then to judge it; a Yes/No token alone stayed at chance (README, Proving ground).
        "scoring.reasoning=true",
        "train.checkpoint_every=250",
        "train.log_every=50",
        "ray.progress_bars=false",
    )
    train_min = (time.perf_counter() - t0) / 60
    heldout = str(out / "heldout" / "scenes.jsonl")
    common = [
        "discovery.sources=[given]",
        "scoring.show_original=false",
        "scoring.reasoning=true",
        f"scoring.max_reasoning_tokens={a.reasoning_tokens}",
        "ray.progress_bars=false",
        f"input={heldout}",
    ]
    metrics = {}
    for name, scorer in (("before", "tiny-qwen2-vl-scorer"), ("after", out / "run" / "export")):
        run("segment", *common, f"output={out / name}", f"models.scorer={scorer}", "evaluate=false")
        run(
            "evaluate",
            f"predictions={out / name / 'predictions'}",
            f"dataset={heldout}",
            f"output={out / name / 'eval'}",
        )
        metrics[name] = json.loads((out / name / "eval" / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    lines = [
        "| category | n | untrained top-1 gIoU | trained top-1 gIoU | ratio | trained top-3 gIoU | oracle gIoU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in CATS:
        b, t = before["by_category"][c], after["by_category"][c]
        ratio = t["top1"]["giou"] / b["top1"]["giou"] if b["top1"]["giou"] else float("inf")
        lines.append(
            f"| {c} | {t['n']} | {100 * b['top1']['giou']:.1f} | {100 * t['top1']['giou']:.1f} | "
            f"{ratio:.2f}x | {100 * t['top3']['giou']:.1f} | {100 * t['oracle']['giou']:.1f} |"
        )
    b, t = before["top1"]["giou"], after["top1"]["giou"]
    lines.append(
        f"| all | {after['n']} | {100 * b:.1f} | {100 * t:.1f} | {t / b if b else float('inf'):.2f}x | "
        f"{100 * after['top3']['giou']:.1f} | {100 * after['oracle']['giou']:.1f} |"
    )
    disc = after["by_category"]["discriminative"]["top1"]["giou"] / max(
        1e-9, before["by_category"]["discriminative"]["top1"]["giou"]
    )
    named_colour, named_shape, named = naming_accuracy(
        out / "after" / "predictions", out / "heldout" / "scenes.jsonl"
    )
    summary = "\n".join([
        f"Proving ground: tiny scorer trained from scratch for {train_min:.1f} min (rea2seg finetune, 2 CPU workers), "
        f"served by vLLM; candidates are each held-out scene's own shapes; whole loop {(time.perf_counter() - t_start) / 60:.1f} min.",
        *[line.removeprefix("[rea2seg] ").split("; checkpoint")[0] for line in trained.splitlines() if "trained to step" in line],
        "", *lines, "",
        f"colour-and-shape (discriminative) top-1 gIoU: {disc:.2f}x the untrained scorer (target: at least 2x)",
        f"the trained scorer's reasoning names the candidate's colour right for {100 * named_colour:.0f}% and its "
        f"shape for {100 * named_shape:.0f}% of {named} held-out candidates",
    ])  # fmt: skip
    (out / "summary.md").write_text(summary + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
