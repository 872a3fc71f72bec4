"""Poison-query isolation for actor stages: a query that kills its worker (out of memory, a crash) or hangs past the
batch time limit is retried a bounded number of times, then redone alone, then written as an error row; the rest of
its batch completes and the job always ends.

Ray Data restarts a dead pool actor and retries its batch without limit, and a restarted actor remembers nothing. So
each attempt is recorded before it starts in a ``Ledger`` actor owned by the driver: an attempt that was begun and
never ended is a death. A batch with ``max_attempts`` deaths is split into one call per query, each recorded on its
own; a query with ``max_attempts`` deaths of its own is not run again. A watchdog thread turns a call that outlives
``limits.batch_timeout_s`` into a death (the actor exits; Ray restarts it), noting the reason first.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable

import ray

from .. import get_logger

log = get_logger(__name__)


class Isolated(RuntimeError):
    """The result for a query the guard isolated: it killed or hung its worker too often to be run again."""


@ray.remote(num_cpus=0, max_restarts=-1)
class Ledger:
    """Attempts begun and not ended, per unit of work (a batch's or one query's ids); memory grows only with the
    units in flight and the poison queries found."""

    def __init__(self):
        self.open: dict[str, int] = {}
        self.reasons: dict[str, str] = {}

    def begin(self, key: str) -> tuple[int, str]:
        """-> (earlier attempts of ``key`` that never ended, why the last one ended if known)."""
        n = self.open.get(key, 0)
        self.open[key] = n + 1
        return n, self.reasons.get(key, "")

    def end(self, key: str) -> None:
        self.open.pop(key, None)
        self.reasons.pop(key, None)

    def note(self, key: str, reason: str) -> None:
        self.reasons[key] = reason


def start_ledger(name: str):
    """The run's ledger, on the driver's node (soft affinity): a worker node's loss must not take it along."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return Ledger.options(name=name, scheduling_strategy=here).remote()


def unit_key(stage: str, query_ids: list[str]) -> str:
    return stage + ":" + hashlib.blake2b("\n".join(sorted(query_ids)).encode(), digest_size=12).hexdigest()


class Guard:
    """Runs a stage's work on units of queries under the ledger and a watchdog.

    ``run(units, work)``: ``units`` is a list of (query id, payload); ``work(payloads)`` processes a list of
    payloads and returns one result per payload; an isolated query's result is an ``Isolated`` exception. With no
    ledger (outside Ray, e.g. a benchmark's in-process loop) it just calls ``work``.
    """

    def __init__(self, stage: str, ledger_name: str | None, max_attempts: int, timeout_s: float):
        self.stage, self.max_attempts, self.timeout_s = stage, max_attempts, timeout_s
        self.ledger = ray.get_actor(ledger_name) if ledger_name else None

    def _ask(self, method: str, key: str):
        """A ledger call; None when the ledger cannot answer (a restarted ledger has forgotten nothing that matters
        more than the batch in hand: the work goes on unguarded rather than failing)."""
        try:
            return ray.get(getattr(self.ledger, method).remote(key), timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            log.warning(
                "%s: the poison-query ledger did not answer (%s); running this call unguarded", self.stage, e
            )
            return None

    def _watched(self, key: str, fn: Callable[[], list]) -> list:
        if not self.timeout_s:
            return fn()

        def expire() -> None:
            reason = f"it ran past limits.batch_timeout_s={self.timeout_s:g}"
            log.error("%s: call %s %s; exiting so Ray restarts this actor", self.stage, key, reason)
            try:
                if self.ledger is not None:
                    ray.get(self.ledger.note.remote(key, reason), timeout=10)
            finally:
                os._exit(1)

        timer = threading.Timer(self.timeout_s, expire)
        timer.daemon = True
        timer.start()
        try:
            return fn()
        finally:
            timer.cancel()

    def run(self, units: list[tuple[str, object]], work: Callable[[list], list]) -> list:
        """``units``: (query id, payload) per query. Returns one result per unit, in order."""
        if not units:
            return []
        if self.ledger is None:
            return work([p for _, p in units])
        key = unit_key(self.stage, [q for q, _ in units])
        deaths, why = self._ask("begin", key) or (0, "")
        if deaths < self.max_attempts:
            out = self._watched(key, lambda: work([p for _, p in units]))
            self.ledger.end.remote(key)
            return out
        if len(units) == 1:  # a one-query call that keeps dying: that query is the poison
            return [Isolated(self._message(deaths, why))]  # left open: a retry skips it at once
        log.warning("%s: a batch of %d queries died %d times; redoing its queries one at a time", self.stage,
                    len(units), deaths)  # fmt: skip
        out = []
        for qid, payload in units:
            k = unit_key(self.stage, [qid])
            d, why = self._ask("begin", k) or (0, "")
            if d >= self.max_attempts:
                out.append(Isolated(self._message(d, why)))  # left open: a retried batch skips it at once
                continue
            out += self._watched(k, lambda p=payload: work([p]))
            self.ledger.end.remote(k)
        self.ledger.end.remote(key)
        return out

    def _message(self, deaths: int, why: str) -> str:
        cause = why or "its worker process died (out of memory or a crash)"
        return (
            f"{self.stage}: this query was attempted {deaths} times and each time {cause}; it was isolated from its "
            f"batch and not run again"
        )
