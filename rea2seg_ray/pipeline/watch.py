"""Cluster faults during a run: which failures a resumed attempt can repair, and a watch that stops a run no alive
node can serve.

Ray repairs most losses by itself (a dead actor is restarted, a lost block recomputed from its lineage). What it
cannot repair surfaces in the writing thread as a Ray system error (an object lost with its node, a dead owner, an
actor gone for good): ``cluster_fault`` recognises those, and the job plans again and resumes (rows already written
are kept; the rest are redone). When no alive node offers what a pool's actors need (the last node with the pool's
custom resource, or its GPUs, is gone), Ray would wait for such a node forever: ``ResourceWatch`` notices, and after
a grace period stops the run with a message naming the pool and what it needs; rerunning the same command once such a
node is back resumes it.
"""

from __future__ import annotations

import ctypes
import threading
import time

from .. import get_logger
from ..config import PoolConfig

log = get_logger(__name__)


class Unschedulable(RuntimeError):
    """No alive node has offered what a pool's actors need for longer than the grace period."""


class ClusterLost(RuntimeError):
    """The cluster lost work Ray could not repair in every attempt a run had."""


def pool_needs(pool: PoolConfig) -> dict[str, float]:
    """What one actor of the pool reserves on one node: {"CPU": n, "GPU": n, custom: n}, zero amounts left out."""
    needs = {"CPU": pool.num_cpus, "GPU": pool.num_gpus, **pool.resources}
    return {k: float(v) for k, v in needs.items() if v}


def fits(needs: dict[str, float], offered: dict[str, float]) -> bool:
    return all(offered.get(k, 0.0) >= v for k, v in needs.items())


def alive_nodes() -> list[dict]:
    """The cluster's alive nodes as {"id", "address", "resources"} (total resources, not what is free now: the run's
    own actors hold part of them)."""
    import ray

    return [
        {
            "id": n["NodeID"],
            "address": n.get("NodeManagerAddress", ""),
            "resources": dict(n.get("Resources") or {}),
        }
        for n in ray.nodes()
        if n.get("Alive")
    ]


def cluster_fault(e: BaseException) -> BaseException | None:
    """The Ray system error behind ``e`` (itself, a cause, or what a task error wraps) when it is a loss a resumed
    attempt can repair: a node died, an object or its owner was lost, an actor died or is unreachable, a worker
    crashed. None for anything else (a bug, bad configuration, an interrupt)."""
    import ray.exceptions as rx

    kinds = (rx.ObjectLostError, rx.NodeDiedError, rx.ActorDiedError, rx.ActorUnavailableError,
             rx.WorkerCrashedError, rx.RaySystemError)  # fmt: skip
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, kinds):
            return x
        todo += [x.__cause__, x.__context__, getattr(x, "cause", None)]
    return None


class ResourceWatch:
    """While open, checks every ``interval_s`` that some alive node offers each named pool's needs; once one pool has
    gone unserved for ``timeout_s`` it raises ``Unschedulable`` in the thread that opened it (the one waiting on Ray
    Data, which then shuts its execution down) and ``__exit__`` re-raises it with the message. ``timeout_s=0``:
    never stops the run (only logs)."""

    def __init__(self, pools: dict[str, PoolConfig], timeout_s: float, interval_s: float = 2.0):
        self.needs = {name: pool_needs(p) for name, p in pools.items()}
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.message = ""
        self._stop = threading.Event()
        self._target = 0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ResourceWatch:
        self._target = threading.get_ident()
        self._thread = threading.Thread(target=self._run, name="rea2seg-resource-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.message:  # whatever the interrupted code turned the interruption into
            raise Unschedulable(self.message) from exc
        return False

    def unserved(self) -> dict[str, dict[str, float]]:
        """The pools no alive node can hold one actor of now, with their needs."""
        offered = [n["resources"] for n in alive_nodes()]
        return {name: needs for name, needs in self.needs.items() if not any(fits(needs, o) for o in offered)}

    def _run(self) -> None:
        since: dict[str, float] = {}
        while not self._stop.wait(self.interval_s):
            try:
                missing = self.unserved()
            except Exception as e:  # noqa: BLE001 - the watch must never break the run it watches
                log.debug("resource watch: cannot list nodes: %s", e)
                continue
            now = time.monotonic()
            for name in list(since):
                if name not in missing:
                    log.info("a node offering what the %s pool needs is back", name)
                    del since[name]
            for name, needs in missing.items():
                if name not in since:
                    since[name] = now
                    log.warning(
                        "no alive node offers what the %s pool needs (%s); waiting up to %.0f s for one",
                        name, needs, self.timeout_s,
                    )  # fmt: skip
            late = [n for n, t in since.items() if self.timeout_s and now - t >= self.timeout_s]
            if late:
                self.message = "; ".join(
                    f"no alive node has offered what the {n} pool needs ({self.needs[n]}) for {now - since[n]:.0f} s"
                    for n in late
                ) + (
                    ": the run stops here, keeping every row it wrote; rerun the same command once such a node is "
                    "back (or with the pool's resources changed) and it resumes"
                )
                log.error("%s", self.message)
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self._target), ctypes.py_object(Unschedulable)
                )
                return


def wait_for_release(job_id: str, timeout_s: float = 120.0) -> None:
    """Wait until no write task and no stage actor of this job runs any more: a failed attempt's executor shuts down
    without waiting for its tasks (a straggler finishing a file after the next attempt's plan would write its rows
    twice) and releases its actors by dropping their handles (one still alive would hold the resources the next
    attempt's pools need)."""
    from ray.util.state import list_actors, list_tasks

    stages = ("DiscoverStage", "ScoreStage")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            tasks = list_tasks(filters=[("job_id", "=", job_id)], limit=10_000, raise_on_missing_output=False)
            actors = list_actors(
                filters=[("job_id", "=", job_id)], limit=10_000, raise_on_missing_output=False
            )
        except Exception as e:  # noqa: BLE001 - no state API (a local Ray without dashboard): a pause instead
            log.debug("cannot list tasks and actors (%s): waiting %.0f s instead", e, 10.0)
            time.sleep(10.0)
            return
        writing = [t for t in tasks if "Write" in (t.name or "") and t.state not in ("FINISHED", "FAILED")]
        holding = [a for a in actors if any(s in (a.class_name or "") for s in stages) and a.state != "DEAD"]
        if not writing and not holding:
            return
        time.sleep(1.0)
    log.warning(
        "the failed attempt's write tasks or actors are still there after %.0f s; going on", timeout_s
    )
