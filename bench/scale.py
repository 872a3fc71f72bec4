"""The data path at scale: the driver's peak RSS and wall time of a dry run (read + validate + de-duplicate + group
by image + count, on the cluster) and of the resume check against an existing output of the same size, for 10k,
100k and 1M queries, in one run. No image is decoded and no model runs.

For each size N the benchmark writes a manifest of 8 JSONL shards (N queries over N/2 images) and a synthetic
predictions output of N rows in the contract schema (top-1 mask and 8 candidates per row, RLEs of random blobs at
640x480), then measures each case in a fresh driver process (its peak RSS is that process's high-water mark) running
``pipeline.graph.plan``, the code ``rea2seg segment dry_run=true`` runs (peak RSS: the process's VmHWM). The resume check reads the output through a
filesystem that counts the bytes it returns: bytes read / bytes stored shows the column projection at work.

    python bench/scale.py [sizes=[10000,100000,1000000]] [shards=8]
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rea2seg_ray.config import load_config


@dataclass
class BenchConfig:
    sizes: list[int] = field(default_factory=lambda: [10_000, 100_000, 1_000_000])
    shards: int = 8
    rows_per_file: int = 50_000  # predictions rows per Parquet file (a write task's block)
    seed: int = 0
    keep: bool = False  # keep the generated data under the temp folder


# -- synthetic data -------------------------------------------------------------------------------------------------


def write_manifest(folder: Path, n: int, shards: int) -> None:
    folder.mkdir(parents=True)
    per = -(-n // shards)
    for s in range(shards):
        with open(folder / f"part-{s:03d}.jsonl", "w") as f:
            for i in range(s * per, min(n, (s + 1) * per)):
                f.write(json.dumps({"query_id": f"q{i:08d}", "image": f"images/{i // 2:08d}.jpg",
                                    "question": f"Which object would you use to open bottle number {i}?",
                                    "category": "bench"}) + "\n")  # fmt: skip


def _mask_pool(rng: np.random.Generator, k: int) -> pa.Array:
    from rea2seg_ray.masks import encode_rle

    yy, xx = np.mgrid[0:480, 0:640]
    out = []
    for _ in range(k):
        cy, cx = rng.uniform(40, 440), rng.uniform(40, 600)
        ry, rx = rng.uniform(10, 120), rng.uniform(10, 160)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1 + 0.3 * np.sin(xx / rng.uniform(3, 15))
        out.append(encode_rle(blob))
    from rea2seg_ray.records import MASK_TYPE

    return pa.array(out, MASK_TYPE)


def write_predictions(folder: Path, n: int, rows_per_file: int, rng: np.random.Generator) -> int:
    """N contract rows in files of ``rows_per_file``; returns the bytes stored."""
    from rea2seg_ray.records import CANDIDATE_TYPE, PREDICTIONS_SCHEMA

    folder.mkdir(parents=True)
    pool = _mask_pool(rng, 2000)
    k = 8
    for start in range(0, n, rows_per_file):
        m = min(rows_per_file, n - start)
        ids = pa.array([f"q{i:08d}" for i in range(start, start + m)])
        cand_masks = pool.take(pa.array(rng.integers(0, len(pool), m * k)))
        bbox = pa.ListArray.from_arrays(pa.array(np.arange(0, m * k * 4 + 1, 4), pa.int32()),
                                        pa.array(rng.uniform(0, 400, m * k * 4).astype(np.float32)))  # fmt: skip
        cands = pa.StructArray.from_arrays(
            [pa.array(np.tile(np.arange(k, dtype=np.int32), m)), pa.array(rng.random(m * k).astype(np.float32)),
             cand_masks, bbox, pa.array(rng.integers(100, 50_000, m * k)), pa.array(["attention_point"] * (m * k)),
             pa.array(rng.random(m * k).astype(np.float32)), pa.array([""] * (m * k))],
            fields=list(CANDIDATE_TYPE),
        )  # fmt: skip
        cols = {
            "query_id": ids, "image_uri": pa.array([f"images/{i // 2:08d}.jpg" for i in range(start, start + m)]),
            "question": pa.array([f"Which object would you use to open bottle number {i}?" for i in range(start, start + m)]),
            "category": pa.array(["bench"] * m), "status": pa.array(["ok"] * m), "error": pa.nulls(m, pa.string()),
            "error_stage": pa.nulls(m, pa.string()), "height": pa.array([480] * m, pa.int32()),
            "width": pa.array([640] * m, pa.int32()), "mask": pool.take(pa.array(rng.integers(0, len(pool), m))),
            "score": pa.array(rng.random(m).astype(np.float32)),
            "candidates": pa.ListArray.from_arrays(pa.array(np.arange(0, m * k + 1, k), pa.int32()), cands),
            "scorer_model": pa.array(["scorer"] * m), "discovery_model": pa.array(["discovery"] * m),
            "run_id": pa.array(["bench"] * m),
            "selected": pa.ListArray.from_arrays(pa.array(np.arange(m + 1), pa.int32()), pa.array(np.zeros(m, np.int32))),
        }  # fmt: skip
        # Real masks are all distinct, so Parquet's dictionary would overflow into plain pages: write them plain
        # (the pool here repeats masks, which a dictionary would shrink to an unrealistically small file).
        pq.write_table(pa.table(cols, schema=PREDICTIONS_SCHEMA), folder / f"bench-{start:09d}.parquet",
                       use_dictionary=["category", "status", "scorer_model", "discovery_model", "run_id"])  # fmt: skip
    return sum(p.stat().st_size for p in folder.iterdir())


# -- a filesystem that counts what it returns ------------------------------------------------------------------------


class _CountingFile:
    def __init__(self, f, log: str):
        self._f, self._log, self.n = f, log, 0

    def read(self, nbytes=None):
        data = self._f.read() if nbytes is None or nbytes < 0 else self._f.read(nbytes)
        self.n += len(data)
        return data

    def seek(self, offset, whence=0):
        return self._f.seek(offset, whence)

    def tell(self):
        return self._f.tell()

    def size(self):
        return self._f.size()

    @property
    def closed(self):
        return self._f.closed

    def readable(self):
        return True

    def seekable(self):
        return True

    def close(self):
        if not self._f.closed:
            with open(self._log, "a") as out:
                out.write(f"{self.n}\n")
        self._f.close()


class CountingHandler(pafs.FileSystemHandler):
    """A local filesystem whose input files append the bytes they returned to ``log`` when closed (one line each;
    read tasks in any worker process of this machine write to the same log)."""

    def __init__(self, log: str):
        self.log, self.fs = log, pafs.LocalFileSystem()

    def __eq__(self, other):
        return isinstance(other, CountingHandler) and other.log == self.log

    def __ne__(self, other):
        return not self == other

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def open_input_file(self, path):
        return pa.PythonFile(_CountingFile(self.fs.open_input_file(path), self.log), mode="r")

    def open_input_stream(self, path):
        return self.open_input_file(path)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("not supported")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path)


# -- one measurement in a fresh driver ------------------------------------------------------------------------------


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM of its own address space (``ru_maxrss`` would carry the peak of the
    parent it was forked from across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(manifest: str, output: str, log: str) -> None:
    """Child process: the dry run's plan (resume against ``output``), printed as one JSON line."""
    from rea2seg_ray.config import SegmentConfig
    from rea2seg_ray.datasets import resolve_input
    from rea2seg_ray.pipeline.graph import plan, predictions_uri
    from rea2seg_ray.runtime import init_ray

    cfg = load_config(SegmentConfig, None, [f"input={manifest}", f"output={output}", "ray.progress_bars=false",
                                            "ray.log_to_driver=false"])  # fmt: skip
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    spec = resolve_input(cfg.input)
    p = plan(cfg, spec, predictions_uri(cfg), filesystem=pafs.PyFileSystem(CountingHandler(log)))
    wall = time.perf_counter() - t0
    peak = peak_rss()
    print(
        json.dumps(
            {"wall_s": wall, "peak_rss": peak, "queries": p.queries, "images": p.images, "done": p.done}
        )
    )


def run_case(manifest: Path, output: Path, log: Path) -> dict:
    log.write_text("")
    r = subprocess.run([sys.executable, __file__, "--measure", str(manifest), str(output), str(log)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(r.stdout[-2000:] + r.stderr[-4000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["bytes_read"] = sum(int(x) for x in log.read_text().split())
    return out


def main(argv: list[str]) -> None:
    cfg = load_config(BenchConfig, None, argv)
    rng = np.random.default_rng(cfg.seed)
    tmp = Path(tempfile.mkdtemp(prefix="rea2seg-scale-"))
    results = []
    try:
        for n in cfg.sizes:
            root = tmp / f"n{n}"
            t0 = time.perf_counter()
            write_manifest(root / "manifest", n, cfg.shards)
            stored = write_predictions(root / "resumed" / "predictions", n, cfg.rows_per_file, rng)
            made = time.perf_counter() - t0
            dry = run_case(root / "manifest", root / "fresh", root / "dry.log")
            resume = run_case(root / "manifest", root / "resumed", root / "resume.log")
            assert dry["queries"] == n and dry["images"] == n // 2 and dry["done"] == 0, dry
            assert resume["done"] == n and resume["images"] == 0, resume
            results.append((n, dry, resume, stored))
            print(f"n={n}: data written in {made:.0f} s; dry run {dry['wall_s']:.1f} s, driver peak RSS "
                  f"{dry['peak_rss'] / 2**20:.0f} MiB; resume check {resume['wall_s']:.1f} s, driver peak RSS "
                  f"{resume['peak_rss'] / 2**20:.0f} MiB, read {resume['bytes_read'] / 2**20:.1f} of "
                  f"{stored / 2**20:.0f} MiB stored ({100 * resume['bytes_read'] / stored:.2f}%)", flush=True)  # fmt: skip
    finally:
        if not cfg.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    base = results[0]
    print(f"\nscale benchmark ({os.cpu_count()} cores), {cfg.shards} JSONL shards per input, queries over half as many "
          "images; driver = the process that plans (Ray's own processes excluded)")  # fmt: skip
    print("| queries | dry run s | dry run driver peak RSS MiB | x smallest | resume s | resume driver peak RSS MiB "
          "| x smallest | output read / stored |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, dry, resume, stored in results:
        print(f"| {n} | {dry['wall_s']:.1f} | {dry['peak_rss'] / 2**20:.0f} | {dry['peak_rss'] / base[1]['peak_rss']:.2f} "
              f"| {resume['wall_s']:.1f} | {resume['peak_rss'] / 2**20:.0f} | "
              f"{resume['peak_rss'] / base[2]['peak_rss']:.2f} | {100 * resume['bytes_read'] / stored:.2f}% |")  # fmt: skip
    big = results[-1]
    print(f"targets: driver peak RSS at the largest size <= 1 GiB ({max(big[1]['peak_rss'], big[2]['peak_rss']) / 2**30:.2f} "
          f"GiB) and <= 1.5x the smallest ({max(big[1]['peak_rss'] / base[1]['peak_rss'], big[2]['peak_rss'] / base[2]['peak_rss']):.2f}x); "
          f"resume reads <= 5% of the output ({100 * big[2]['bytes_read'] / big[3]:.2f}%)")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        measure(*sys.argv[2:5])
    else:
        main(sys.argv[1:])
