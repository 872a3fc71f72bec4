#!/usr/bin/env python3
"""The proving ground: train a tiny scorer from scratch on synthetic scenes (20 minutes on this CPU), serve
it with vLLM in `rea2seg segment`, and compare top-1 gIoU per question kind with the untrained scorer on held-out
scenes. Every step goes through the user's entry points (`rea2seg ...`). `make proving-ground` runs it.

Training and held-out scenes cover every kind (colour-and-shape, geometric, spatial, multi-step, and multi-target,
whose held-out scenes are served with `scoring.select=threshold` so the answer may be several candidates); each
training scene's reasoning restates what its question asks for (the target by name, or the criterion: "the largest
object", "the object closest to the red star") and then what each candidate is. The scorer is trained and served
with candidate facts and two rounds of reasoning (`scoring.candidate_facts`, `scoring.facts_relations`): each
candidate's extremes among the scene's candidates, and whose closest candidate it is. Targets: >= 2x the untrained
scorer overall and >= 1.5x on each kind.

    python scripts/proving_ground.py [--out outputs/proving-ground] [--train-scenes 4000] [--minutes 20]
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
MULTI = "multi-target"


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
    from rea2seg_ray.scoring.prompts import parse_description

    scenes = {r["query_id"]: r for r in map(json.loads, manifest.read_text().splitlines())}
    colour = shape = n = 0
    for row in pads.dataset(str(predictions), format="parquet").to_table().to_pylist():
        scene = scenes[row["query_id"]]
        given = [decode_rle(m) for m in scene["candidates"]]
        for c in row["candidates"] or []:
            m = decode_rle(c["mask"])
            want = scene["candidate_descriptions"][max(range(len(given)), key=lambda i: (given[i] & m).sum())]
            said = parse_description(c["reasoning"]).split()
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
        "--minutes", type=float, default=20.0, help="training budget (the whole loop must fit in 30 minutes)"
    )
    ap.add_argument("--max-steps", type=int, default=4000, help="the cosine schedule's length")
    ap.add_argument(
        "--reasoning-tokens", type=int, default=40, help="scoring.max_reasoning_tokens when served"
    )
    ap.add_argument("--lr", default="1e-3")
    ap.add_argument("--init-range", default="0.06")
    ap.add_argument(
        "--kinds", default=",".join([*CATS, MULTI]), help="question kinds trained on (comma-separated)"
    )
    ap.add_argument(
        "--max-neg-per-pos",
        default="1",
        help="make-scoring-data's negatives kept per positive (the hardest: highest IoU, then the ones the question "
        "names, e.g. the X of 'closest to the X'; 0: every negative)",
    )
    ap.add_argument(
        "--select-threshold", default="0.5", help="scoring.select_threshold for multi-target scenes"
    )
    a = ap.parse_args()
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: remove it or pass --out")
    t_start = time.perf_counter()
    kinds = [k for k in a.kinds.split(",") if k]
    run(
        "make-scenes",
        f"output={out / 'train'}",
        f"n={a.train_scenes}",
        "seed=1000",
        f"categories=[{','.join(kinds)}]",
    )
    # Held-out: the four single-target kinds (top-1) and multi-target scenes (threshold selection), reported per kind.
    per_kind = max(1, a.heldout_scenes // 5)
    run("make-scenes", f"output={out / 'heldout'}", f"n={4 * per_kind}", "seed=2000")
    run(
        "make-scenes",
        f"output={out / 'heldout-multi'}",
        f"n={per_kind}",
        "seed=2001",
        f"categories=[{MULTI}]",
    )
    run(
        "make-scoring-data",
        f"input={out / 'train' / 'scenes.jsonl'}",
        f"output={out / 'data'}",
        "discovery.sources=[given]",
        f"max_neg_per_pos={a.max_neg_per_pos}",
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
        # Each candidate's extremes among the scene's candidates, said after its image ("... it is the largest and
        # the leftmost."): geometric and spatial questions become a comparison the scorer can read (scoring/facts.py).
        "scoring.candidate_facts=true",
        # ... and, named by a first round of reasoning, whose closest candidate it is ("It is the closest to the red
        # star."): multi-step "the object closest to the red star" becomes a comparison as well.
        "scoring.facts_relations=true",
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
        "scoring.candidate_facts=true",
        "scoring.facts_relations=true",
        f"scoring.max_reasoning_tokens={a.reasoning_tokens}",
        "ray.progress_bars=false",
        "evaluate=false",
        "gallery.enabled=false",
    ]
    sets = {"": (heldout, []),
            "-multi": (str(out / "heldout-multi" / "scenes.jsonl"),
                       ["scoring.select=threshold", f"scoring.select_threshold={a.select_threshold}"])}  # fmt: skip
    metrics: dict[str, dict] = {"before": {}, "after": {}}
    for name, scorer in (("before", "tiny-qwen2-vl-scorer"), ("after", out / "run" / "export")):
        for suffix, (manifest, extra) in sets.items():
            run("segment", *common, *extra, f"input={manifest}", f"output={out / (name + suffix)}",
                f"models.scorer={scorer}")  # fmt: skip
            run("evaluate", f"predictions={out / (name + suffix) / 'predictions'}", f"dataset={manifest}",
                f"output={out / (name + suffix) / 'eval'}", "gallery.enabled=false")  # fmt: skip
            m = json.loads((out / (name + suffix) / "eval" / "metrics.json").read_text())
            metrics[name].update(m["by_category"])
    before, after = metrics["before"], metrics["after"]
    lines = [
        "| kind | n | untrained top-1 gIoU | trained top-1 gIoU | ratio | trained top-3 gIoU | oracle gIoU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = {}
    for c in [*CATS, MULTI]:
        b, t = before[c], after[c]
        ratios[c] = t["top1"]["giou"] / b["top1"]["giou"] if b["top1"]["giou"] else float("inf")
        lines.append(
            f"| {c} | {t['n']} | {100 * b['top1']['giou']:.1f} | {100 * t['top1']['giou']:.1f} | "
            f"{ratios[c]:.2f}x | {100 * t['top3']['giou']:.1f} | {100 * t['oracle']['giou']:.1f} |"
        )
    n_all = sum(after[c]["n"] for c in [*CATS, MULTI])
    b = sum(before[c]["top1"]["giou"] * before[c]["n"] for c in [*CATS, MULTI]) / n_all
    t = sum(after[c]["top1"]["giou"] * after[c]["n"] for c in [*CATS, MULTI]) / n_all
    lines.append(
        f"| all | {n_all} | {100 * b:.1f} | {100 * t:.1f} | {t / b if b else float('inf'):.2f}x | | |"
    )
    inst_b, inst_a = before[MULTI]["instances"], after[MULTI]["instances"]
    lines += ["", f"multi-target instances (select=threshold {a.select_threshold}): untrained precision "
              f"{100 * inst_b['precision']:.1f} / recall {100 * inst_b['recall']:.1f}, trained precision "
              f"{100 * inst_a['precision']:.1f} / recall {100 * inst_a['recall']:.1f}"]  # fmt: skip
    met = t / b >= 2 if b else True
    weakest = min(ratios, key=ratios.get)
    named_colour, named_shape, named = naming_accuracy(
        out / "after" / "predictions", out / "heldout" / "scenes.jsonl"
    )
    summary = "\n".join([
        f"Proving ground: tiny scorer trained from scratch for {train_min:.1f} min (rea2seg finetune, 2 CPU workers), "
        f"served by vLLM; candidates are each held-out scene's own shapes; whole loop {(time.perf_counter() - t_start) / 60:.1f} min.",
        *[line.removeprefix("[rea2seg] ").split("; checkpoint")[0] for line in trained.splitlines() if "trained to step" in line],
        "", *lines, "",
        f"overall top-1 gIoU {t / b if b else float('inf'):.2f}x the untrained scorer (target 2x: "
        f"{'met' if met else 'not met'}); weakest kind {weakest} {ratios[weakest]:.2f}x (target 1.5x on each: "
        f"{'met' if ratios[weakest] >= 1.5 else 'not met'})",
        f"the trained scorer's reasoning names the candidate's colour right for {100 * named_colour:.0f}% and its "
        f"shape for {100 * named_shape:.0f}% of {named} held-out candidates",
    ])  # fmt: skip
    (out / "summary.md").write_text(summary + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
