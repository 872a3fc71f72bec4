"""A driver whose job's workers run ``crash_hook.install`` (a query asking crash_hook.CRASH kills its worker), then
the segmentation job; prints the summary as one JSON line.

    python tests/integration/crash_run.py RAY_ADDRESS key=value ...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

from rea2seg_ray.config import SegmentConfig, load_config  # noqa: E402
from rea2seg_ray.pipeline.graph import run_segment  # noqa: E402

HERE = str(Path(__file__).resolve().parent)


def main(address: str, overrides: list[str]) -> None:
    hook = {"worker_process_setup_hook": "crash_hook.install", "env_vars": {"PYTHONPATH": HERE}}
    ray.init(address=address, _node_ip_address="127.0.0.1", log_to_driver=False, runtime_env=hook)
    s = run_segment(load_config(SegmentConfig, None, [f"ray.address={address}", *overrides]))
    print(json.dumps({"rows_in": s.rows_in, "written": s.written, "ok": s.ok, "error": s.error}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
