"""Node loss on a simulated cluster (a script: ray.cluster_utils.Cluster needs its own driver process).

A head with 1 CPU and one worker node A offering {"discovery", "scorer"}: the segmentation job with both pools pinned
to those resources (configs/cluster.yaml's placement, on CPU).

1. Once the run has written rows, A (holding both pools' actors) is removed and no node takes its place: the run must
   stop with a message naming the pools (``unschedulable_timeout_s``), keeping what it wrote.
2. Node B (the same kind) is added and the same run started again: it resumes; once B holds both pools' actors and
   the run has written rows, node C is added and B removed: the run must finish on C, every query exactly once.

The input is large enough (the test uses 120 scenes) that discovery still has work when the scorer's vLLM engine is
up: with less, Ray Data retires the discovery actor before the first row is written.

Prints one JSON line with what happened; the test asserts on it.

    python tests/integration/node_loss_run.py SCENES_MANIFEST OUTPUT
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from rea2seg_ray.config import SegmentConfig, load_config  # noqa: E402
from rea2seg_ray.pipeline.graph import run_segment  # noqa: E402

KIND = {"num_cpus": 3, "resources": {"discovery": 1, "scorer": 1}, "node_ip_address": "127.0.0.1"}


def alive(kind: str) -> list:
    return [
        a for a in list_actors(detail=True, limit=1000) if kind in (a.class_name or "") and a.state == "ALIVE"
    ]


def run_until(cfg, lose) -> dict:
    """Run the job in a thread; once ``lose()`` returns a description of what it removed, stop looking. Returns the
    summary's numbers or the error the run stopped with, and how long it took after the loss."""
    result: dict = {}

    def job() -> None:
        try:
            s = run_segment(cfg)
            result.update(written=s.written, skipped=s.skipped, rows_in=s.rows_in, ok=s.ok, error=s.error)
        except Exception as e:  # noqa: BLE001 - reported to the test
            result.update(failed=type(e).__name__, message=str(e))

    th = threading.Thread(target=job)
    th.start()
    lost_at, deadline = None, time.time() + 600
    while th.is_alive() and time.time() < deadline:
        if lost_at is None:
            what = lose()
            if what:
                lost_at, result["removed"] = time.time(), what
        time.sleep(0.3)
    th.join(timeout=600)
    result["after_loss_s"] = round(time.time() - lost_at, 1) if lost_at else None
    return result


def main(manifest: str, output: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                            "node_ip_address": "127.0.0.1"})  # fmt: skip
    node_a = cluster.add_node(**KIND)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    cfg = load_config(SegmentConfig, "cluster.yaml", [
        f"input={manifest}", f"output={output}", "evaluate=false", "ray.progress_bars=false",
        f"ray.address={cluster.address}", "unschedulable_timeout_s=8",
        "discover_pool.size=1", "discover_pool.num_cpus=1", "discover_pool.num_gpus=0", "discover_pool.batch_size=2",
        "score_pool.num_cpus=1", "score_pool.num_gpus=0", "score_pool.batch_size=2",
        "discovery.mllm_batch_size=1", "discovery.sam_batch_size=1",
    ])  # fmt: skip
    out: dict = {}
    written = Path(output, "predictions")

    def actors_on(node_id: str) -> list[str]:
        return sorted(
            a.class_name for a in alive("DiscoverStage") + alive("ScoreStage") if a.node_id == node_id
        )

    def lose_a():
        # Both pools at work on A (discovery still has input left) and rows written: the loss cuts a run that has
        # made progress.
        held = actors_on(node_a.node_id)
        if len(held) == 2 and any(written.glob("*.parquet")):
            cluster.remove_node(node_a)
            return {"node": "A", "actors": held}
        return None

    out["first"] = run_until(cfg, lose_a)
    import pyarrow.parquet as pq

    kept = 0
    for f in written.glob("*.parquet"):
        try:
            kept += pq.read_metadata(f).num_rows
        except Exception:  # noqa: BLE001 - a file torn by the loss: the rerun sets it aside
            pass
    out["first"]["rows_kept"] = kept

    node_b = cluster.add_node(**KIND)
    cluster.wait_for_nodes()
    files_before = len(list(written.glob("*.parquet")))

    def swap_b_for_c():
        held = actors_on(node_b.node_id)
        if len(held) < 2 or len(list(written.glob("*.parquet"))) <= files_before:
            return None
        cluster.add_node(**KIND)
        cluster.wait_for_nodes()
        cluster.remove_node(node_b)
        return {"node": "B", "actors": held}

    out["second"] = run_until(cfg, swap_b_for_c)
    print(json.dumps(out))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
