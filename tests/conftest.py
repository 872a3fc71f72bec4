"""Shared fixtures: a tiny-model cache per test session, synthetic scenes, and a real S3 API server (moto) on
127.0.0.1 reached through boto3 and pyarrow.fs."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# A real ReasonSeg annotation (format sample) kept in the repository, so the tests need nothing outside it.
REASONSEG_SAMPLES = REPO / "tests" / "assets" / "reasonseg-samples"

# Ray reads these when it is first imported: set them before any test module can import ray. Without
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 a driver rewrites 127.0.0.1 to the host's own address and leaves loopback.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
os.environ.update(RAY_ENV)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One tiny-model cache for the session (REA2SEG_CACHE), built once through the real builder."""
    cache = Path(os.environ.get("REA2SEG_TEST_CACHE") or tmp_path_factory.mktemp("rea2seg-cache"))
    os.environ["REA2SEG_CACHE"] = str(cache)
    from rea2seg_ray.models.loading import tiny_model_dir
    from rea2seg_ray.models.tiny import build_tiny_models

    build_tiny_models(tiny_model_dir(str(cache)))
    return cache


@pytest.fixture(scope="session")
def scenes_dir(tmp_path_factory) -> Path:
    from rea2seg_ray.datasets.synthetic import write_scenes

    out = tmp_path_factory.mktemp("scenes")
    write_scenes(out, 12, seed=3)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1; sets the standard AWS variables so boto3 and pyarrow.fs reach it."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test; returns its name."""
    import boto3

    name = (
        "t-"
        + request.node.name.lower().replace("_", "-")[:40].strip("-")
        + f"-{int(time.time() * 1000) % 100000}"
    )
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def bench_module(name: str):
    """A module of bench/ (not a package), imported from its file."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def fault_proxy_process(s3_server):
    """One fault-injecting proxy (bench/s3_fault_proxy.py) in front of the session's S3 server, stopped by its pid."""
    proxy = bench_module("s3_fault_proxy").ProxyProcess(s3_server)
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def s3_faults(fault_proxy_process):
    """The fault proxy with faults off and counts zeroed; a test sets its faults (``configure``) and points a job at
    ``endpoint`` (AWS_ENDPOINT_URL). Faults are off again after the test."""
    off = dict(rate=0.0, match="", always="", once="", kinds="500,503,reset,delay", delay_s=1.0, seed=0)
    fault_proxy_process.configure(**off)
    try:
        yield fault_proxy_process
    finally:
        fault_proxy_process.configure(**off)


def upload_tree(local: Path, bucket: str, prefix: str) -> None:
    import boto3

    s3 = boto3.client("s3")
    for p in sorted(local.rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}")


@pytest.fixture(scope="session")
def ray_cluster(s3_server, model_cache, tmp_path_factory):
    """One Ray cluster for the test session: `ray start --head` on 127.0.0.1 (with the job server), started after
    the S3 server and model cache so its workers inherit their environment. Stopped by its own process group, never
    by `ray stop` (which would kill every Ray on the host). Yields {"address", "dashboard"}."""
    import signal

    os.environ.update(RAY_ENV)
    port, dash = _free_port(), _free_port()
    log = open(tmp_path_factory.mktemp("ray") / "ray-start.log", "w")  # noqa: SIM115 - closed at teardown
    ray_bin = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=4", "--include-dashboard=true", "--disable-usage-stats", "--block"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ),
    )  # fmt: skip
    address, dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    import urllib.error
    import urllib.request

    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{dashboard}/api/version", timeout=1)
            break
        except urllib.error.HTTPError:  # 401 without the token: the server is up
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: see {log.name}") from None
            time.sleep(0.5)
    else:
        raise RuntimeError("Ray head did not come up")
    try:
        yield {"address": address, "dashboard": dashboard}
    finally:
        import ray

        ray.shutdown()
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers left behind in the group
        except ProcessLookupError:
            pass
        log.close()


@pytest.fixture(scope="session")
def ray_driver(ray_cluster):
    """This pytest process joined to the session cluster as a Ray driver."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"], _node_ip_address="127.0.0.1", log_to_driver=False)
    return ray_cluster


@pytest.fixture(scope="session")
def scoring_data(ray_driver, tmp_path_factory):
    """Mask-scoring examples (`rea2seg make-scoring-data`, given candidates) from 16 synthetic scenes:
    (root with data/ and scenes/, the scenes' manifest, the label counts)."""
    from rea2seg_ray.config import MakeScoringDataConfig, load_config
    from rea2seg_ray.datasets.synthetic import write_scenes
    from rea2seg_ray.train.data import build_scoring_data

    root = tmp_path_factory.mktemp("ft")
    manifest = write_scenes(root / "scenes", 16, seed=80, categories=["discriminative"])
    cfg = load_config(MakeScoringDataConfig, None, [
        f"input={manifest}", f"output={root / 'data'}", "discovery.sources=[given]", "ray.progress_bars=false",
        f"ray.address={ray_driver['address']}"])  # fmt: skip
    counts = build_scoring_data(cfg)
    return root, manifest, counts


def run_cli(
    command: str, *args: str, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``rea2seg <command> args...`` as a user runs it (a new process, this environment updated with ``env``),
    output captured."""
    return subprocess.run(
        [sys.executable, "-m", "rea2seg_ray.cli", command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
