"""The segmentation job as a Ray Data graph: sharded input read on the cluster -> resume anti-join and query-id
de-duplication -> one row per image -> decode (CPU tasks) -> Discoverer actor pool -> Scorer actor pool -> one
Parquet row per query (local or s3://).

Every run first counts what it will do with the same graph head (``plan``: queries, distinct images, ids already
written, invalid rows); ``dry_run=true`` stops there. A run holds the output's lease while it writes, so a second run
on the same output refuses, and a rerun or resumed run adds exactly the missing rows and never duplicates one.
"""

from __future__ import annotations

import gc
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa

from .. import get_logger, provenance, storage
from ..config import PoolConfig, SegmentConfig
from ..datasets import SAMPLE_SCENES, InputSpec, resolve_input
from ..datasets.shards import predictions_files
from ..records import PREDICTIONS_SCHEMA
from ..runtime import init_ray, pool_args, worker_env
from ..runtime.inputs import count_queries, image_dataset
from ..runtime.stages import discovered_dataset
from . import lease as leases
from . import watch
from .stages import ScoreStage, summarize

log = get_logger(__name__)
MAX_MESSAGES = 5  # invalid-row messages a plan keeps to show


@dataclass
class Plan:
    """What a run will do, counted on the cluster by the same graph head the run uses."""

    input: str
    files: int
    queries: int = 0  # input rows (valid or not)
    images: int = 0  # distinct images among the queries to process
    done: int = 0  # queries whose id is already in the output (resume skips them)
    invalid: int = 0  # rows that become error rows before any image is read (bad rows, duplicate ids)
    messages: list[str] = field(default_factory=list)
    torn: list[str] = field(
        default_factory=list
    )  # unreadable output files (moved aside; their rows are redone)

    @property
    def to_write(self) -> int:
        return self.queries - self.done

    def lines(self, predictions: str) -> list[str]:
        out = [
            f"input {self.input}: {self.files} file(s), {self.queries} queries, {self.images} distinct images to "
            f"process; {self.done} already in {predictions}; {self.invalid} invalid rows; {self.to_write} to write",
        ]
        out += [f"  invalid: {m}" for m in self.messages]
        out += [f"  unreadable output file (its rows are redone): {t}" for t in self.torn]
        return out


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
    images: int = 0
    error_stages: dict = field(default_factory=dict)
    seconds: float = 0.0
    plan: list[str] = field(default_factory=list)  # the plan's lines (what the run counted before it began)
    dry_run: bool = False

    @property
    def queries_per_s(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        """The command's report: the plan, then (unless a dry run) what was written."""
        if self.dry_run:
            return ["dry run: no model runs, nothing is written", *self.plan]
        return [
            *self.plan,
            f"run {self.run_id}: {self.rows_in} queries in, {self.skipped} skipped (already in the output), "
            f"{self.written} written: {self.ok} ok, {self.error} error"
            + (
                f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.error_stages.items()))})"
                if self.error
                else ""
            ),
            f"throughput: {self.queries_per_s:.2f} queries/s over {self.seconds:.1f} s ({self.images} images)",
            f"predictions: {self.predictions}",
        ]


def predictions_uri(cfg: SegmentConfig) -> str:
    return storage.join(cfg.output, "predictions")


def plan(cfg: SegmentConfig, spec: InputSpec, pred_uri: str, filesystem=None) -> Plan:
    """Read and validate the input, resolve resume against ``pred_uri``, count; runs no model, writes nothing."""
    ds = image_dataset(cfg, spec, pred_uri if cfg.resume else None, keep_done=True, filesystem=filesystem)
    c = count_queries(ds, MAX_MESSAGES)
    return Plan(input=spec.uri, files=len(spec.files), **c)


def build_dataset(cfg: SegmentConfig, spec: InputSpec, run_id: str, ledger: str | None = None):
    """The lazy Ray Data graph of a run: the rows still to write, as ``PREDICTIONS_SCHEMA``; nothing runs until
    it is written."""
    env = worker_env()
    images = image_dataset(
        cfg, spec, predictions_uri(cfg) if cfg.resume else None, rows_per_block=cfg.discover_pool.batch_size
    )
    ds = discovered_dataset(
        images, max_image_side=cfg.max_image_side, decode_num_cpus=cfg.decode_num_cpus, limits=cfg.limits,
        discovery=cfg.discovery, models=cfg.models, pool=cfg.discover_pool, env=env, ledger=ledger,
        max_question_tokens=cfg.limits.question_tokens(cfg.scoring.vllm.max_model_len),
    )  # fmt: skip
    kwargs = dict(scoring=cfg.scoring, models=cfg.models, limits=cfg.limits, run_id=run_id, ledger=ledger)
    return ds.map_batches(ScoreStage, fn_constructor_kwargs=kwargs, **pool_args(cfg.score_pool, env))


def run_counts(pred_uri: str, run_id: str) -> dict:
    """ok / error / error stages of the rows one run wrote: its own files' ``status`` and ``error_stage`` columns
    only (column projection: ranged reads of two small columns), streamed batch by batch in constant memory."""
    import pyarrow.dataset as pads

    files = [i.path for i in predictions_files(pred_uri) if i.base_name.startswith(f"{run_id}-")]
    if not files:
        return {"ok": 0, "error": 0, "error_stages": {}}
    fs, _ = storage.filesystem(pred_uri)

    def count() -> dict:
        counts = {"ok": 0, "error": 0, "error_stages": {}}
        for b in pads.dataset(files, filesystem=fs, format="parquet").to_batches(
            columns=["status", "error_stage"]
        ):
            c = summarize(pa.Table.from_batches([b]))
            counts["ok"] += c["ok"]
            counts["error"] += c["error"]
            for k, v in c["error_stages"].items():
                counts["error_stages"][k] = counts["error_stages"].get(k, 0) + v
        return counts

    # A whole recount when a read fails past the S3 client's own retries (storage's policy, outer layer).
    return storage.with_retries(count, f"count the rows of run {run_id} in {pred_uri}")


def _move_torn(paths: list[str]) -> None:
    for f in paths:
        fs, path = storage.filesystem(f)
        fs.move(path, path + ".torn")
        log.warning("moved unreadable output file aside: %s.torn (its rows will be redone)", f)


def run_segment(cfg: SegmentConfig) -> RunSummary:
    """Run the job to completion (or only its plan, with ``dry_run``) and return its summary (``lines()`` is the
    report the CLI prints; the plan is logged as soon as it is counted, before any model starts)."""
    t0 = time.perf_counter()
    source = cfg.input or str(SAMPLE_SCENES / "manifest.jsonl")
    started = datetime.now(timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    run_id = cfg.run_id or f"{stamp}-{uuid.uuid4().hex[:6]}"
    out_uri = predictions_uri(cfg)
    spec = resolve_input(source, cfg.format, cfg.split, cfg.images)
    init_ray(cfg.ray)
    if cfg.dry_run:
        p = plan(cfg, spec, out_uri)
        lines = p.lines(out_uri)
        holder = leases.live_holder(storage.join(cfg.output, leases.LEASE_FILE))
        if holder:
            lines.append(f"note: {cfg.output} is being written now by {leases.describe(holder)}")
        return RunSummary(run_id, source, out_uri, p.queries, p.done, 0, 0, 0, images=p.images,
                          seconds=time.perf_counter() - t0, plan=lines, dry_run=True)  # fmt: skip
    lease = leases.acquire(cfg.output, run_id, cfg.lease_ttl_s)
    try:
        p = plan(cfg, spec, out_uri)
        for line in p.lines(out_uri):
            log.info("%s", line)
        _move_torn(p.torn)
        if p.to_write:
            cfg_hash = record_run(cfg, run_id, started)
            write_missing(cfg, spec, run_id, cfg_hash)
        counts = run_counts(out_uri, run_id)
    finally:
        lease.release()
    summary = RunSummary(
        run_id=run_id, input=source, predictions=out_uri, rows_in=p.queries, skipped=p.done,
        written=counts["ok"] + counts["error"], ok=counts["ok"], error=counts["error"], images=p.images,
        error_stages=counts["error_stages"], seconds=time.perf_counter() - t0, plan=p.lines(out_uri),
    )  # fmt: skip
    if summary.written != p.to_write:
        raise RuntimeError(
            f"output check failed: {p.to_write} queries to write but {summary.written} rows written by run {run_id} "
            f"in {out_uri}"
        )
    log.info("run %s: %d written (%d ok, %d error) in %.1f s", run_id, summary.written, summary.ok, summary.error,
             summary.seconds)  # fmt: skip
    return summary


def write_missing(cfg: SegmentConfig, spec: InputSpec, run_id: str, cfg_hash: str) -> None:
    """Write the rows still missing from the output, in at most ``cfg.run_attempts`` attempts: an attempt that
    fails on a cluster fault Ray could not repair (``watch.cluster_fault``: a lost node's objects, a dead owner) is
    followed, once its stragglers are gone, by a new plan against what is written and a new attempt for the rest
    (same run id: the run's files and counts add up). A run no alive node can serve stops (``watch.Unschedulable``)."""
    import ray

    from ..runtime.guard import start_ledger

    out_uri = predictions_uri(cfg)
    fs, path = storage.filesystem(out_uri)
    if not storage.is_remote(out_uri):
        fs.create_dir(path, recursive=True)
    # The run id and config hash ride in every file's key-value metadata, beside the rows' run_id column.
    schema = PREDICTIONS_SCHEMA.with_metadata(provenance.parquet_metadata(run_id, cfg_hash))
    pools = {"discovery": cfg.discover_pool, "scorer": cfg.score_pool}
    for attempt in range(1, cfg.run_attempts + 1):
        if attempt > 1:
            p = plan(cfg, spec, out_uri)
            _move_torn(p.torn)
            log.warning("attempt %d of %d of run %s: %d queries still to write", attempt, cfg.run_attempts, run_id,
                        p.to_write)  # fmt: skip
            if not p.to_write:
                return
        ledger = f"rea2seg-ledger-{run_id}-{attempt}"
        keeper = start_ledger(ledger)
        lost = ""
        try:
            with watch.ResourceWatch(pools, cfg.unschedulable_timeout_s):
                ds = build_dataset(cfg, spec, run_id, ledger)
                ds.write_parquet(path, filesystem=fs, filename_provider=_names(run_id), schema=schema)
            return
        except watch.Unschedulable:
            raise
        except Exception as e:
            fault = watch.cluster_fault(e)
            if fault is None:
                raise
            lost = f"{type(fault).__name__}: {str(fault).splitlines()[0] if str(fault) else ''}"
            if attempt == cfg.run_attempts:
                raise watch.ClusterLost(
                    f"run {run_id}: the cluster lost work {attempt} time(s) ({lost}); every row written so far is "
                    f"kept: rerun the same command to resume"
                ) from e
            del fault  # its traceback holds the failed execution's actor handles
        finally:
            try:
                ray.kill(keeper)
            except Exception:  # noqa: BLE001 - a ledger lost with its node is already gone
                pass
        log.warning("run %s, attempt %d: the cluster lost work Ray could not recover (%s); resuming", run_id,
                    attempt, lost)  # fmt: skip
        # The failed execution releases its actors by dropping their handles: drop ours, collect, and wait for its
        # write tasks and actors to be gone before planning again (a straggling write would be counted twice, a
        # lingering actor would hold the resources the next attempt's pools need).
        ds = None
        gc.collect()
        watch.wait_for_release(ray.get_runtime_context().get_job_id())


def record_run(cfg: SegmentConfig, run_id: str, started: datetime) -> str:
    """Write ``<output>/runs/<run_id>.json`` (config, packages, each loaded model's weight digests) before any row of
    the run is written; returns the config hash the run's Parquet files carry. The digests are computed by a task
    on a node of the pool that loads the model (custom resources honoured), where its weights are cached anyway."""
    import ray

    from ..discovery.discoverer import discovery_models

    roles: dict[str, tuple[str, PoolConfig]] = {"scorer": (cfg.models.scorer, cfg.score_pool)}
    roles.update(
        {
            role: (spec, cfg.discover_pool)
            for role, spec in discovery_models(cfg.discovery, cfg.models).items()
        }
    )
    digest = ray.remote(num_cpus=0, max_retries=3)(provenance.model_digests)
    env = {"env_vars": worker_env()}
    refs = {
        role: digest.options(resources=dict(pool.resources) or None, runtime_env=env).remote(
            spec, cfg.models.cache_dir or None, cfg.models.allow_hub
        )
        for role, (spec, pool) in roles.items()
    }
    models = {role: ray.get(ref) for role, ref in refs.items()}
    record = provenance.run_record(cfg, run_id, models, started)
    uri = storage.join(cfg.output, "runs", f"{run_id}.json")
    storage.write_bytes(uri, json.dumps(record, indent=2).encode())
    log.info("run record: %s", uri)
    return record["config_hash"]


def _names(run_id: str):
    """Parquet file names that say which run wrote them (a rerun adds files, never overwrites)."""
    from ray.data.datasource import FilenameProvider

    class RunFilenames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"{run_id}-{write_uuid}-{task_index:06d}.parquet"

        def get_filename_for_block(self, block, write_uuid: str, task_index: int, block_index: int) -> str:
            return f"{run_id}-{write_uuid}-{task_index:06d}-{block_index:06d}.parquet"

    return RunFilenames()
