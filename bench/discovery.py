"""Discovery throughput: queries/s, share of time in the MLLM and in SAM, and batched vs one-query-at-a-time in
the same run (same models, same inputs).

    python bench/discovery.py [n=32] [discovery.mllm_batch_size=8] [models.discovery=...] [models.sam=...]
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from rea2seg_ray.config import DiscoveryConfig, ModelsConfig, load_config
from rea2seg_ray.datasets import read_queries
from rea2seg_ray.datasets.synthetic import write_scenes
from rea2seg_ray.discovery.discoverer import Discoverer


@dataclass
class BenchConfig:
    n: int = 32
    seed: int = 7
    width: int = 320
    height: int = 240
    queries_per_image: int = 2  # several questions about one image: its SAM embedding is computed once
    discovery: DiscoveryConfig = field(
        default_factory=lambda: DiscoveryConfig(mllm_batch_size=8, sam_batch_size=8)
    )
    models: ModelsConfig = field(default_factory=ModelsConfig)


def run(d: Discoverer, queries, images, batch: int) -> float:
    d.timings.clear()
    t0 = time.perf_counter()
    for i in range(0, len(queries), batch):
        for r in d.discover(queries[i : i + batch], images[i : i + batch]):
            assert not isinstance(r, Exception), r
    return time.perf_counter() - t0


def main(argv: list[str]) -> None:
    cfg = load_config(BenchConfig, None, argv)
    with tempfile.TemporaryDirectory() as tmp:
        n_images = max(1, cfg.n // cfg.queries_per_image)
        write_scenes(tmp, n_images, seed=cfg.seed, width=cfg.width, height=cfg.height)
        base = list(read_queries(str(Path(tmp) / "scenes.jsonl")))
        decoded = {q.image: np.asarray(Image.open(q.image).convert("RGB")) for q in base}
    queries, images = [], []
    for rep in range(cfg.queries_per_image):
        for q in base:
            queries.append(
                q
                if rep == 0
                else type(q)(
                    **{**q.to_dict(), "query_id": f"{q.query_id}-{rep}", "question": f"{q.question} (again)"}
                )
            )
            images.append(decoded[q.image])
    queries, images = queries[: cfg.n], images[: cfg.n]
    # Group queries about the same image together, as the pipeline batches them.
    order = sorted(range(len(queries)), key=lambda i: queries[i].image)
    queries, images = [queries[i] for i in order], [images[i] for i in order]

    d = Discoverer(cfg.discovery, cfg.models)
    run(d, queries[:4], images[:4], 4)  # warm-up
    batch = max(cfg.discovery.mllm_batch_size, cfg.discovery.sam_batch_size)
    t_batched = run(d, queries, images, batch)
    shares = {k: v / t_batched for k, v in d.timings.items()}
    d.cfg.mllm_batch_size = d.cfg.sam_batch_size = 1
    t_single = run(d, queries, images, 1)
    n = len(queries)
    print(
        f"discovery benchmark: {n} queries on {len(decoded)} images ({cfg.width}x{cfg.height}), device {d.device}, "
        f"models {cfg.models.discovery} + {cfg.models.sam}"
    )
    print(f"  batched (batch {batch}):   {n / t_batched:7.2f} queries/s  ({t_batched:.2f} s)")
    print(f"  one query at a time:    {n / t_single:7.2f} queries/s  ({t_single:.2f} s)")
    print(f"  speed-up batched / single: {t_single / t_batched:.2f}x")
    print(
        "  share of batched wall time: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(shares.items()))
    )


if __name__ == "__main__":
    main(sys.argv[1:])
