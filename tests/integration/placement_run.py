"""Simulated two-node cluster run (a script: ray.cluster_utils.Cluster needs its own driver process).

A head with 1 CPU, a "discovery" node and a "scorer" node (custom resources), the segmentation job with
configs/cluster.yaml-style placement; while the first discovery call runs the discovery node is removed and another added. Prints one JSON line
with what happened; the test asserts on it.

    python tests/integration/placement_run.py SCENES_MANIFEST OUTPUT
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.state import list_actors, list_tasks  # noqa: E402

from rea2seg_ray.config import SegmentConfig, load_config  # noqa: E402
from rea2seg_ray.pipeline.graph import run_segment  # noqa: E402


def actors(kind: str) -> list:
    return [a for a in list_actors(detail=True, limit=1000) if kind in (a.class_name or "")]


def first_discovery_call() -> bool:
    """The first discovery call is running and none has finished: rows flow (the input shuffles, a barrier, are
    over) and the node holds no finished discovery block yet. Losing a node that holds blocks an actor made and
    nobody consumed yet (or the shuffles' aggregator output) is issue K's: Ray does not rebuild them reliably."""
    name = "MapWorker(MapBatches(DiscoverStage)).submit"
    disc = list_tasks(filters=[("name", "=", name)], limit=1000, raise_on_missing_output=False)
    return any(t.state == "RUNNING" for t in disc) and not any(t.state == "FINISHED" for t in disc)


def main(manifest: str, output: str) -> None:
    loop = {"node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True, **loop})
    node_a = cluster.add_node(num_cpus=3, resources={"discovery": 1}, **loop)
    node_b = cluster.add_node(num_cpus=3, resources={"scorer": 1}, **loop)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    cfg = load_config(SegmentConfig, "cluster.yaml", [
        f"input={manifest}", f"output={output}", "evaluate=false", "ray.progress_bars=false",
        f"ray.address={cluster.address}",
        "discover_pool.size=1", "discover_pool.num_cpus=1", "discover_pool.num_gpus=0", "discover_pool.batch_size=8",
        "score_pool.num_cpus=1", "score_pool.num_gpus=0", "score_pool.batch_size=2",
        "discovery.mllm_batch_size=1", "discovery.sam_batch_size=1", "scoring.vllm.gpu_memory_utilization=0.85",
    ])  # fmt: skip
    result: dict = {}
    th = threading.Thread(target=lambda: result.update(summary=run_segment(cfg)))
    th.start()
    seen: set = set()  # every (actor class, node) observed: a restarted actor shows up on its new node too
    node_c = None
    deadline = time.time() + 600
    while th.is_alive() and time.time() < deadline:
        alive_d = [a for a in actors("DiscoverStage") if a.state == "ALIVE"]
        alive_s = [a for a in actors("ScoreStage") if a.state == "ALIVE"]
        for a in alive_d + alive_s:
            seen.add((a.class_name, a.node_id))
        if node_c is None and alive_d and first_discovery_call():  # discovery under way: swap its node
            cluster.remove_node(node_a)
            node_c = cluster.add_node(num_cpus=3, resources={"discovery": 1}, **loop)
        time.sleep(0.3)
    th.join(timeout=600)
    s = result.get("summary")
    print(json.dumps({
        "node_a": node_a.node_id, "node_b": node_b.node_id, "node_c": node_c.node_id if node_c else None,
        "actors": sorted([cls, node] for cls, node in seen),
        "written": s.written if s else None, "ok": s.ok if s else None, "rows_in": s.rows_in if s else None,
    }))  # fmt: skip
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
