"""The benchmark scripts run end to end on small inputs and print the ratios and shares the README quotes (their
numbers are not asserted: timings belong to the benchmarks, not to tests)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ.copy(),
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def test_discovery_benchmark_prints_both_paths_and_time_shares(model_cache):
    out = run_bench("discovery.py", "n=4")
    assert re.search(r"batched \(batch \d+\):\s+[\d.]+ queries/s", out), out
    assert re.search(r"one query at a time:\s+[\d.]+ queries/s", out), out
    assert re.search(r"mllm \d+%, sam \d+%", out), out


def test_scoring_benchmark_prints_ratio_breakdown_and_prefix_share(model_cache):
    out = run_bench("scoring.py", "queries=2", "k=3", "repeats=1")
    assert "2 queries x K=3 = 6 candidates" in out, out
    assert re.search(r"speed-up: [\d.]+x", out), out
    assert re.search(r"image processing \(HF processor\): [\d.]+", out), out
    # Two of each query's three prompts find its image-and-question prefix cached: (K-1)/K.
    assert "image-and-question prefixes served from cache: 66.7%" in out, out


def test_attention_benchmark_prints_both_paths_and_their_ratios(model_cache):
    out = run_bench("attention.py", "hidden=256", "heads=4", "image_tokens=64", "queries=1")
    assert re.search(r"eager in every layer:\s+[\d.]+ s a query, peak memory\s+[\d.]+ MiB", out), out
    assert re.search(r"sdpa \+ chosen layers:\s+[\d.]+ s a query, peak memory\s+[\d.]+ MiB", out), out
    assert re.search(r"ratios \(eager / fast\): time [\d.]+x, peak memory [\d.]+x", out), out
    diff = float(re.search(r"largest heat-map difference: (\S+)", out).group(1))
    assert diff <= 1e-4, out


def test_gpu_benchmark_code_paths_run_in_smoke_mode(model_cache):
    """bench/gpu.py is prepared for a lent GPU; smoke=true runs its three stages at tiny sizes on CPU."""
    out = run_bench("gpu.py", "smoke=true")
    assert "GPU benchmark on CPU (smoke" in out, out
    assert re.search(r"discovery \(.*\): [\d.]+ queries/s", out), out
    assert re.search(r"SAM tiny image encoder.*fp32 \(segment_anything\) [\d.]+ img/s.* [\d.]+x", out), out
    assert re.search(r"scorer \(.*vLLM\): [\d.]+ candidates/s", out), out


def test_context_benchmark_prints_both_discovery_modes(model_cache):
    out = run_bench("context.py", "n=2", "width=320", "height=240", "scoring.backend=hf")
    assert re.search(r"\| one pass \| [\d.]+ \| [\d.]+ \| [\d.]+ \| 0 \| 0 \|", out), out
    assert re.search(r"\| coarse-to-fine \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [12] \| \d+ \|", out), out
    assert re.search(
        r"coarse-to-fine / one pass: oracle gIoU \S+, top-1 gIoU \S+, discovery time [\d.]+x", out
    ), out
