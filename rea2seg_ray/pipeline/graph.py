"""The segmentation job as a Ray Data graph: read -> decode (CPU tasks) -> Discoverer actor pool -> Scorer actor
pool -> Parquet (local or s3://). Resumable: query ids already in the output are skipped, so a rerun or a resumed
run adds exactly the missing rows and never duplicates one.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage
from ..config import PoolConfig, SegmentConfig
from ..datasets import SAMPLE_SCENES, read_queries
from ..records import PREDICTIONS_SCHEMA
from .stages import DiscoverStage, ScoreStage, decode_batch, group_by_image, summarize

# Environment every worker needs (no secrets: credentials come from the nodes' own environment or roles).
WORKER_ENV = (
    "REA2SEG_CACHE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE",
    "REA2SEG_STAGE_TIMINGS",
)  # fmt: skip


@dataclass
class RunSummary:
    run_id: str
    input: str
    predictions: str
    rows_in: int
    skipped: int
    written: int
    ok: int
    error: int
    error_stages: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def queries_per_s(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        return [
            f"run {self.run_id}: {self.rows_in} queries in, {self.skipped} skipped (already in the output), "
            f"{self.written} written: {self.ok} ok, {self.error} error"
            + (
                f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.error_stages.items()))})"
                if self.error
                else ""
            ),
            f"throughput: {self.queries_per_s:.2f} queries/s over {self.seconds:.1f} s",
            f"predictions: {self.predictions}",
        ]


def predictions_uri(cfg: SegmentConfig) -> str:
    return storage.join(cfg.output, "predictions")


def _parquet_files(uri: str) -> list[str]:
    if not storage.exists(uri):
        return []
    return [f for f in storage.list_files(uri, recursive=True) if f.endswith(".parquet")]


def _read_columns(uri: str, columns: list[str]) -> pa.Table | None:
    try:
        return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)
    except Exception:  # noqa: BLE001 - a torn file (a run killed while writing) is not output
        return None


def existing_output(uri: str, columns: list[str]) -> pa.Table:
    """The given columns of every readable predictions file under ``uri``. Unreadable (torn) files are moved aside
    to ``*.parquet.torn`` so no reader ever trips on them; their rows are simply redone."""
    tables = []
    for f in _parquet_files(uri):
        t = _read_columns(f, columns)
        if t is None:
            fs, path = storage.filesystem(f)
            fs.move(path, path + ".torn")
            print(f"[rea2seg] moved unreadable output file aside: {f}.torn (its rows will be redone)")
            continue
        tables.append(t)
    if not tables:
        return pa.table({c: pa.array([], PREDICTIONS_SCHEMA.field(c).type) for c in columns})
    return pa.concat_tables(tables)


def init_ray(cfg: SegmentConfig) -> None:
    """Start a private local Ray (no address) or join ``ray.address`` / ``$RAY_ADDRESS``."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
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
        ray.init(address=address, log_to_driver=cfg.ray.log_to_driver, **kwargs)
    else:
        ray.init(
            address="local",  # a private local Ray; never join some other cluster left on this machine
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=False,
            log_to_driver=cfg.ray.log_to_driver,
            _node_ip_address="127.0.0.1",
        )


def _remote_args(pool: PoolConfig, env: dict) -> dict:
    # Ray Data already gives pool actors unlimited restarts and batch retries (-1); only a
    # non-default choice is passed on, through the (deprecated in 2.60) free-form remote args.
    args: dict = {"runtime_env": {"env_vars": env}}
    for name in ("max_restarts", "max_task_retries"):
        if getattr(pool, name) != -1:
            args[name] = getattr(pool, name)
    return args


def worker_env() -> dict[str, str]:
    """Environment variables every stage's workers get: the node cache, S3 endpoint settings, vLLM-cpu settings."""
    from ..scoring.backends import cpu_vllm_env

    env = {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}
    env.update({k: os.environ.get(k, v) for k, v in cpu_vllm_env().items()})
    return env


def discovered_dataset(cfg: SegmentConfig, queries, env: dict[str, str]):
    """The lazy head shared by the segmentation job and the mask-scoring data job: image groups -> decode tasks
    (each image once) -> the Discoverer actor pool; rows follow ``STAGE_SCHEMA`` with candidates filled in."""
    import ray
    from omegaconf import OmegaConf

    items = group_by_image(queries)
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 200)))
    ds = ds.map_batches(
        decode_batch,
        batch_format="pyarrow",
        batch_size=4,
        num_cpus=cfg.decode_num_cpus,
        fn_kwargs={"max_side": cfg.max_image_side},
        runtime_env={"env_vars": env},
    )
    dp = cfg.discover_pool
    cfg_dict = OmegaConf.to_container(OmegaConf.structured(cfg))
    return ds.map_batches(
        DiscoverStage, fn_constructor_kwargs={"cfg": cfg_dict}, batch_format="pyarrow", batch_size=dp.batch_size,
        compute=ray.data.ActorPoolStrategy(size=dp.size), num_cpus=dp.num_cpus, num_gpus=dp.num_gpus or None,
        resources=dict(dp.resources) or None, **_remote_args(dp, env),
    )  # fmt: skip


def build_dataset(cfg: SegmentConfig, queries, run_id: str):
    """The lazy Ray Data graph for ``queries``; nothing runs until it is written."""
    import ray
    from omegaconf import OmegaConf

    env = worker_env()
    ds = discovered_dataset(cfg, queries, env)
    sp = cfg.score_pool
    cfg_dict = OmegaConf.to_container(OmegaConf.structured(cfg))
    return ds.map_batches(
        ScoreStage, fn_constructor_kwargs={"cfg": cfg_dict, "run_id": run_id}, batch_format="pyarrow",
        batch_size=sp.batch_size, compute=ray.data.ActorPoolStrategy(size=sp.size), num_cpus=sp.num_cpus,
        num_gpus=sp.num_gpus or None, resources=dict(sp.resources) or None, **_remote_args(sp, env),
    )  # fmt: skip


def run_segment(cfg: SegmentConfig) -> RunSummary:
    """Run the job to completion and return its summary (also printed)."""
    t0 = time.perf_counter()
    source = cfg.input or str(SAMPLE_SCENES / "manifest.jsonl")
    run_id = cfg.run_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_uri = predictions_uri(cfg)
    queries = list(read_queries(source, format=cfg.format, texts=cfg.texts, limit=cfg.limit, strict=False))
    done = set(existing_output(out_uri, ["query_id"]).column("query_id").to_pylist()) if cfg.resume else set()
    todo = [q for q in queries if q.query_id not in done]
    print(f"[rea2seg] {len(queries)} queries from {source}; {len(queries) - len(todo)} already in {out_uri}")
    if todo:
        import ray

        init_ray(cfg)
        ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress_bars
        ds = build_dataset(cfg, todo, run_id)
        fs, path = storage.filesystem(out_uri)
        if not storage.is_remote(out_uri):
            fs.create_dir(path, recursive=True)
        ds.write_parquet(path, filesystem=fs, filename_provider=_names(run_id))
    ids = {q.query_id for q in todo}
    out = existing_output(out_uri, ["query_id", "status", "error_stage", "run_id"])
    mine = (
        out.filter(pc.is_in(out.column("query_id"), pa.array(sorted(ids), pa.string())))
        if ids
        else out.slice(0, 0)
    )
    counts = summarize(mine)
    summary = RunSummary(
        run_id=run_id,
        input=source,
        predictions=out_uri,
        rows_in=len(queries),
        skipped=len(queries) - len(todo),
        written=mine.num_rows,
        ok=counts["ok"],
        error=counts["error"],
        error_stages=counts["error_stages"],
        seconds=time.perf_counter() - t0,
    )
    if mine.num_rows != len(todo) or len(set(out.column("query_id").to_pylist())) != out.num_rows:
        raise RuntimeError(
            f"output check failed: {len(todo)} queries processed but {mine.num_rows} rows written "
            f"({out.num_rows} rows, {len(set(out.column('query_id').to_pylist()))} distinct ids in {out_uri})"
        )
    for line in summary.lines():
        print(f"[rea2seg] {line}")
    return summary


def _names(run_id: str):
    """Parquet file names that say which run wrote them (a rerun adds files, never overwrites)."""
    from ray.data.datasource import FilenameProvider

    class RunFilenames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"{run_id}-{write_uuid}-{task_index:06d}.parquet"

        def get_filename_for_block(self, block, write_uuid: str, task_index: int, block_index: int) -> str:
            return f"{run_id}-{write_uuid}-{task_index:06d}-{block_index:06d}.parquet"

    return RunFilenames()
