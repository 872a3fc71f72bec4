#!/usr/bin/env python3
"""Probe what a from-scratch tiny scorer can learn: train it in this process (no Ray) on a mask-scoring dataset
(`rea2seg make-scoring-data` output) with the real training collate, and print the loss every 25 steps.

`--labels` swaps the Yes/No targets for simpler ones, to tell "the model cannot see X" from "the model cannot combine
X and Y":

- real:         the dataset's labels (is this candidate what the question asks for?)
- area:         is the candidate larger than the median candidate (image only)
- question:     does the question name one of four colours (text only)
- image-colour: is the candidate one of four colours (image only)
- colour-match: does the candidate's colour match the colour the question names (text and image together)

    python scripts/scorer_probe.py --data DIR [--labels real] [--steps 400] [--lr 1e-3] [--batch 32] [--n 8000] \
        [train.init_range=0.06 scoring.render=overlay scoring.show_original=false ...]

`scoring.reasoning=true` trains as the proving ground does: the model first writes the example's reasoning (what
the question asks for, then what the highlighted region is), then answers; `--describe-only` keeps only the second.
The loss printed is always the Yes/No token's own. A loss that stays at ln 2 = 0.693 means the model answers the
same whatever it is shown.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import numpy as np
import pyarrow.dataset as pads
import torch

from rea2seg_ray.config import FinetuneConfig, load_config
from rea2seg_ray.datasets.synthetic import COLOURS
from rea2seg_ray.masks import decode_rle
from rea2seg_ray.models.loading import resolve_model
from rea2seg_ray.scoring.scorer import model_input_size_fn
from rea2seg_ray.train.loop import (
    ImageCache,
    answer_token_ids,
    collate,
    load_scorer_for_training,
    training_loss,
)

FOUR = ("green", "red", "blue", "white")


NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[c] for c in NAMES], float)


def candidate_colour(row: dict, images: ImageCache) -> str:
    """The scene colour nearest to the candidate's mean pixel (images decoded once, shared with training)."""
    m = decode_rle(row["mask"])
    img = images.get(row["image_uri"])
    return NAMES[int(np.argmin(((PALETTE - img[m].mean(0)) ** 2).sum(1)))]


def relabel(rows: list[dict], how: str, images: ImageCache) -> None:
    if how == "real":
        return
    if how == "area":
        areas = [int(decode_rle(r["mask"]).sum()) for r in rows]
        med = float(np.median(areas))
        for r, a in zip(rows, areas, strict=True):
            r["label"] = "Yes" if a > med else "No"
    elif how == "question":
        for r in rows:
            r["label"] = "Yes" if any(w in r["question"].split() for w in FOUR) else "No"
    elif how in ("image-colour", "colour-match"):
        for r in rows:
            c = candidate_colour(r, images)
            if how == "image-colour":
                r["label"] = "Yes" if c in FOUR else "No"
            else:
                named = [w for w in r["question"].replace("?", " ").split() if w in COLOURS]
                r["label"] = "Yes" if named and named[0] == c else "No"
    else:
        raise SystemExit(f"unknown --labels {how!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--labels", default="real")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n", type=int, default=8000, help="examples used (the first N of the dataset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--describe-only",
        action="store_true",
        help="with scoring.reasoning=true: drop the query's own reasoning (the scenes' 'The question asks for the X.'), "
        "keeping only what the candidate is",
    )
    a, overrides = ap.parse_known_args()
    cfg = load_config(
        FinetuneConfig,
        None,
        [f"data={a.data}", "output=unused", "train.reinit=true", "scoring.show_original=false", *overrides],
    )
    path = str(resolve_model(cfg.models.scorer, cfg.models.cache_dir or None, cfg.models.allow_hub))
    torch.manual_seed(a.seed)
    model, proc = load_scorer_for_training(path, cfg, "cpu")
    rows = pads.dataset(a.data).to_table().slice(0, a.n).to_pylist()
    images = ImageCache(capacity=len(rows))
    relabel(rows, a.labels, images)
    if a.describe_only:
        for r in rows:
            r["reasoning"] = r["reasoning"][max(0, r["reasoning"].find("The highlighted region")) :]
    tok = proc.tokenizer
    answer = answer_token_ids(tok, cfg.scoring)
    size_fn = model_input_size_fn(path) if cfg.scoring.image_max_side <= 0 else None
    params = sum(p.numel() for p in model.parameters())
    labels = collections.Counter(r["label"] for r in rows)
    print(f"{params} parameters; {len(rows)} examples, labels {dict(labels)} ({a.labels})", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    rng = np.random.default_rng(a.seed)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        batch = [rows[i] for i in rng.choice(len(rows), size=min(a.batch, len(rows)), replace=False)]
        inputs, target = collate(batch, proc, cfg.scoring, size_fn, images, answer)
        loss, yes_no = training_loss(model(**inputs).logits, target, cfg.train.answer_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(yes_no)  # the Yes/No token's own (what the score reads)
        if step % 25 == 0:
            dt = time.perf_counter() - t0
            print(
                f"step {step} loss {np.mean(losses[-25:]):.4f} ({dt:.0f} s, {a.batch * step / dt:.0f} examples/s)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
