"""Coarse-to-fine context (discovery.context): oracle and top-1 gIoU on small-target scenes with and without the
second pass inside the context region, in one run (same scenes, same models, same scorer).

    python bench/context.py [n=32] [width=640] [height=480] [models.discovery=...] [models.sam=...] [models.scorer=...]

Oracle gIoU (the best candidate) measures what discovery found; top-1 what the scorer then chose. With the tiny
random-init models the attention maps are noise, so this prints what the machinery does (crops taken, candidates
from inside them, time), not a quality gain: run it with real checkpoints for that.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from rea2seg_ray.config import DiscoveryConfig, ModelsConfig, ScoringConfig, load_config
from rea2seg_ray.datasets import load_ground_truth, read_queries
from rea2seg_ray.datasets.synthetic import SMALL_TARGET, write_scenes
from rea2seg_ray.discovery.discoverer import Discoverer
from rea2seg_ray.eval.metrics import aggregate, score_query
from rea2seg_ray.records import Prediction
from rea2seg_ray.scoring.scorer import Scorer


@dataclass
class BenchConfig:
    n: int = 32
    seed: int = 11
    width: int = 640
    height: int = 480
    batch: int = 8  # queries per discover / score call
    discovery: DiscoveryConfig = field(
        default_factory=lambda: DiscoveryConfig(mllm_batch_size=8, sam_batch_size=8)
    )
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)


def run(d: Discoverer, scorer: Scorer, queries, images, gts, batch: int) -> tuple[dict, float, int]:
    """(metrics, seconds of discovery, candidates from inside a context crop)."""
    scores, t_disc, inside = [], 0.0, 0
    for i in range(0, len(queries), batch):
        qs, ims = queries[i : i + batch], images[i : i + batch]
        t0 = time.perf_counter()
        found = d.discover(qs, ims)
        t_disc += time.perf_counter() - t0
        ranked = scorer.score(qs, ims, [f if isinstance(f, list) else [] for f in found])
        for q, im, r, gt in zip(qs, ims, ranked, gts[i : i + batch], strict=True):
            if isinstance(r, Exception) or not r:
                scores.append(score_query(None, gt, q.category, q.query_id))
                continue
            inside += sum(c.source.startswith("context_") for c in r)
            p = Prediction(query_id=q.query_id, height=im.shape[0], width=im.shape[1], mask=r[0].mask,
                           score=r[0].score, candidates=r, selected=[0])  # fmt: skip
            scores.append(score_query(p, gt, q.category, q.query_id))
    return aggregate(scores), t_disc, inside


def main(argv: list[str]) -> None:
    cfg = load_config(BenchConfig, None, argv)
    with tempfile.TemporaryDirectory() as tmp:
        write_scenes(tmp, cfg.n, seed=cfg.seed, width=cfg.width, height=cfg.height, categories=[SMALL_TARGET])
        queries = list(read_queries(str(Path(tmp) / "scenes.jsonl")))
        images = [np.asarray(Image.open(q.image).convert("RGB")) for q in queries]
        gts = [load_ground_truth(q) for q in queries]
    share = np.mean([g.mean() for g in gts])
    print(f"{len(queries)} small-target scenes at {cfg.width}x{cfg.height} (targets cover {100 * share:.2f}% of "
          f"an image on average); discovery sources {list(cfg.discovery.sources)}")  # fmt: skip
    scorer = Scorer(cfg.scoring, cfg.models)
    scorer.warmup()
    rows = {}
    for name, context in (("one pass", False), ("coarse-to-fine", True)):
        d = Discoverer(dataclasses.replace(copy.deepcopy(cfg.discovery), context=context), cfg.models)
        d.warmup()
        m, secs, inside = run(d, scorer, queries, images, gts, cfg.batch)
        rows[name] = (m, secs, inside, d.counts.get("context_crops", 0))
    print(
        "| discovery | oracle gIoU | top-1 gIoU | discovery s/query | context crops | candidates from a crop |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, (m, secs, inside, crops) in rows.items():
        print(f"| {name} | {100 * m['oracle']['giou']:.1f} | {100 * m['top1']['giou']:.1f} | "
              f"{secs / len(queries):.3f} | {crops} | {inside} |")  # fmt: skip
    (a, ta, _, _), (b, tb, _, _) = rows["one pass"], rows["coarse-to-fine"]

    def ratio(x: float, y: float) -> str:
        return f"{x / y:.2f}x" if y > 0 else "n/a"

    print(f"coarse-to-fine / one pass: oracle gIoU {ratio(b['oracle']['giou'], a['oracle']['giou'])}, top-1 gIoU "
          f"{ratio(b['top1']['giou'], a['top1']['giou'])}, discovery time {ratio(tb, ta)}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
