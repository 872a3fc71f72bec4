"""The segmentation job under S3 faults, against a clean run of the same job, in one run.

An S3 API server (moto's, on 127.0.0.1) holds the bundled scenes (manifest and images) and the tiny scorer's weights;
every request of the job goes through the fault proxy (bench/s3_fault_proxy.py). The job runs twice on one local Ray,
reading everything from S3 and writing its predictions there: once with the proxy passing everything (the clean run),
once with ``rate`` of the requests failing (500 InternalError, 503 SlowDown, reset connection, ``delay_s`` late
answer). Printed: faults injected by kind, the failed requests the retries repeated, requests in all against the clean
run, error rows, rows lost and rows duplicated (both must be 0), and the extra wall time against the clean run.

    python bench/faults.py [rate=0.05] [kinds=[500,503,reset,delay]] [delay_s=1.0] [repeat=3] [seed=0]

Needs the dev extras (moto's server): ``make setup``. Everything it starts (S3 server, proxy, Ray) is stopped by pid.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.fs as pafs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3_fault_proxy import ProxyProcess  # noqa: E402

from rea2seg_ray.config import SegmentConfig, load_config  # noqa: E402
from rea2seg_ray.datasets import SAMPLE_SCENES  # noqa: E402


@dataclass
class BenchConfig:
    rate: float = 0.05  # share of S3 requests that fail
    kinds: list[str] = field(default_factory=lambda: ["500", "503", "reset", "delay"])
    delay_s: float = 1.0  # how late a 'delay' fault answers
    repeat: int = 3  # faulty runs (each on its own output, each with its own seed)
    seed: int = 0
    scenes: str = ""  # a manifest on local disk (empty: the bundled scenes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server on 127.0.0.1 in its own session, stopped by its pid."""

    def __init__(self):
        port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("moto server did not start (is moto[server] installed? make setup)")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def upload(fs: pafs.S3FileSystem, local: Path, dest: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            with fs.open_output_stream(f"{dest}/{p.relative_to(local).as_posix()}") as f:
                f.write(p.read_bytes())


def output_rows(fs: pafs.S3FileSystem, path: str) -> list[dict]:
    return (
        pads.dataset(path, format="parquet", filesystem=fs)
        .to_table(columns=["query_id", "status"])
        .to_pylist()
    )


def main(argv: list[str]) -> int:
    cfg = load_config(BenchConfig, None, argv)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                      AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    scenes = Path(cfg.scenes).parent if cfg.scenes else SAMPLE_SCENES
    manifest = Path(cfg.scenes).name if cfg.scenes else "manifest.jsonl"
    server = S3Server()
    proxy = None
    try:
        direct = pafs.S3FileSystem(endpoint_override=server.endpoint.split("://")[1], scheme="http",
                                   region="us-east-1", access_key="bench", secret_key="bench",
                                   allow_bucket_creation=True)  # fmt: skip
        direct.create_dir("bench")
        upload(direct, scenes, "bench/scenes")
        from rea2seg_ray.models.loading import resolve_model

        upload(direct, Path(resolve_model("tiny-qwen2-vl-scorer")), "bench/models/scorer")
        want = {
            json.loads(line)["query_id"]
            for line in (scenes / manifest).read_text().splitlines()
            if line.strip()
        }
        n_in = len(want)
        proxy = ProxyProcess(server.endpoint, kinds=",".join(cfg.kinds), delay_s=cfg.delay_s)
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint  # the job and its workers reach S3 through the proxy

        from rea2seg_ray.pipeline.graph import run_segment

        def run(name: str) -> tuple[float, dict]:
            seg = load_config(SegmentConfig, None, [
                f"input=s3://bench/scenes/{manifest}", f"output=s3://bench/runs/{name}",
                "models.scorer=s3://bench/models/scorer", "evaluate=false", "gallery.enabled=false",
                "ray.progress_bars=false", "ray.log_to_driver=false",
            ])  # fmt: skip
            t0 = time.perf_counter()
            run_segment(seg)
            return time.perf_counter() - t0, proxy.stats()

        # A first run loads what every later one reuses from the node's cache (the scorer downloaded from S3,
        # Ray and vLLM warmed): not timed, so the clean and faulty runs start from the same state.
        run("warm-up")
        proxy.configure(rate=0.0)  # zero the counts
        clean_s, clean = run("clean")
        print(f"S3 faults over {n_in} queries (the {'bundled scenes' if not cfg.scenes else cfg.scenes}), "
              f"all reads and writes through the fault proxy on 127.0.0.1:")  # fmt: skip
        print(f"  clean run: {clean_s:.1f} s, {clean['requests']} S3 requests")
        total = Counter()
        for i in range(cfg.repeat):
            proxy.configure(rate=cfg.rate, seed=cfg.seed + i)
            faulty_s, st = run(f"faults-{i}")
            proxy.configure(rate=0.0)
            rows = output_rows(direct, f"bench/runs/faults-{i}/predictions")
            got = Counter(r["query_id"] for r in rows)
            lost = len(want - set(got))
            dup = sum(c - 1 for c in got.values())
            errors = sum(r["status"] != "ok" for r in rows)
            f = st["faults"]
            total.update(f)
            total.update(requests=st["requests"], seconds=faulty_s, lost=lost, dup=dup, errors=errors)
            print(f"  run {i + 1} with {100 * cfg.rate:.1f}% faults (seed {cfg.seed + i}): {st['requests']} S3 requests, "
                  f"{st['faulted']} faulted: " + ", ".join(f"{k} {f[k]}" for k in cfg.kinds))  # fmt: skip
            print(f"    failed requests repeated by the retries: {f['500'] + f['503'] + f['reset']}; rows in {n_in}, "
                  f"rows out {len(rows)}: error rows {errors}, rows lost {lost}, rows duplicated {dup}; wall time "
                  f"{faulty_s:.1f} s, {faulty_s / clean_s:.2f}x the clean run")  # fmt: skip
        n = cfg.repeat
        faulted = sum(total[k] for k in cfg.kinds)
        print(f"  all {n} runs: {faulted} faults in {total['requests']} requests "
              f"({100 * faulted / max(1, total['requests']):.1f}%: " + ", ".join(f"{k} {total[k]}" for k in cfg.kinds)
              + f"), {total['500'] + total['503'] + total['reset']} failed requests retried, error rows "
              f"{total['errors']}, rows lost {total['lost']}, rows duplicated {total['dup']}; mean wall time "
              f"{total['seconds'] / n:.1f} s = {total['seconds'] / n / clean_s:.2f}x the clean run "
              f"(+{total['seconds'] / n - clean_s:.1f} s)")  # fmt: skip
        if total["lost"] or total["dup"]:
            print("  FAILED: rows lost or duplicated")
            return 1
        return 0
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
        import ray

        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
