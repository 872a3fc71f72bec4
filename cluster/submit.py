"""Submit a rea2seg job to a running Ray cluster, print its submission id, and follow its logs.

    RAY_AUTH_MODE=token python cluster/submit.py --address http://HEAD:8265 segment \\
        --config configs/cluster.yaml input=s3://bucket/manifest.jsonl output=s3://bucket/runs/r1

Everything after the job name goes to the job's command line (config file and key=value overrides). Exit status:
0 when the job succeeded (or with --no-follow once submitted), 1 when it failed or was stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
JOBS = {"segment": "jobs/segment.py", "finetune": "jobs/finetune_scorer.py"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
        help="the cluster's dashboard / job server URL",
    )
    p.add_argument("--runtime-env", default=str(REPO / "cluster" / "runtime_env.yaml"))
    p.add_argument("--working-dir", default=str(REPO))
    p.add_argument("--python", default="python", help="interpreter on the cluster nodes")
    p.add_argument("--no-follow", action="store_true", help="return once submitted")
    p.add_argument("job", choices=sorted(JOBS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="config and key=value overrides for the job")
    a = p.parse_args(argv)

    from ray.job_submission import JobStatus, JobSubmissionClient

    runtime_env = yaml.safe_load(Path(a.runtime_env).read_text()) or {}
    runtime_env["working_dir"] = a.working_dir
    entrypoint = " ".join([a.python, JOBS[a.job], *(shlex.quote(x) for x in a.args)])
    client = JobSubmissionClient(a.address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"submitted {job_id}: {entrypoint}", flush=True)
    if a.no_follow:
        return 0

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
