"""One writer per output: a run holds a lease on ``<output>/_lease.json`` while it writes, so two runs started on the
same output never write the same query twice. The second run refuses with a message naming the live run.

The lease is created atomically (``O_EXCL`` locally; an S3 conditional put, ``If-None-Match: *``, on S3), renewed by
a heartbeat thread, and deleted when the run ends. It expires ``ttl`` seconds after its last renewal, so a run whose
driver was killed leaves a lease that the next run takes over; on the same host a lease whose process is gone is
taken over at once (a re-submitted or resumed run does not wait out the ttl).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass

from .. import get_logger, storage

log = get_logger(__name__)
LEASE_FILE = (
    "_lease.json"  # Ray Data's readers skip names starting with "_": the lease is never read as output
)


class LeaseHeld(RuntimeError):
    """Another live run holds the output's lease."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _s3(uri: str):
    import boto3
    from botocore.config import Config

    bucket, _, key = uri[len("s3://") :].partition("/")
    # The storage layer's client retry policy (standard mode: exponential back-off with jitter).
    retries = {"max_attempts": storage.RETRY.client_attempts, "mode": "standard"}
    return boto3.client("s3", config=Config(retries=retries)), bucket, key


def _create(uri: str, body: bytes) -> bool:
    """Create ``uri`` only if it does not exist; False when it does."""
    if uri.startswith("s3://"):
        from botocore.exceptions import ClientError

        client, bucket, key = _s3(uri)
        try:
            client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
            ):
                return False
            raise
    os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
    try:
        fd = os.open(uri, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(body)
    return True


def _delete(uri: str) -> None:
    if uri.startswith("s3://"):
        client, bucket, key = _s3(uri)
        client.delete_object(Bucket=bucket, Key=key)
        return
    try:
        os.remove(uri)
    except FileNotFoundError:
        pass


def _read(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}  # unreadable (a holder killed mid-write): treated as expired


def describe(holder: dict) -> str:
    left = holder.get("expires", 0) - time.time()
    return (
        f"run {holder.get('run_id', '?')} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
        f"lease renewed until {left:.0f} s from now)"
    )


def live_holder(uri: str) -> dict | None:
    """The lease's content when a live run holds it, else None (absent, expired, or its process gone)."""
    holder = _read(uri)
    if not holder:
        return None
    if holder.get("expires", 0) < time.time():
        return None
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0))):
        return None
    return holder


@dataclass
class Lease:
    uri: str
    run_id: str
    ttl: float
    _stop: threading.Event | None = None
    _thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "acquired": now,
                "expires": now + self.ttl,
            }  # fmt: skip
        ).encode()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            holder = _read(self.uri)
            if not holder or holder.get("run_id") != self.run_id:
                log.error("lease on %s was lost (now %s); this run keeps going", self.uri, holder)
                return
            try:
                storage.write_bytes(self.uri, self._body())
            except OSError as e:  # a missed renewal is retried at the next beat; the ttl covers two of them
                log.warning("could not renew the lease on %s: %s", self.uri, e)

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=5)
        holder = _read(self.uri)
        if holder and holder.get("run_id") == self.run_id:
            _delete(self.uri)


def acquire(output: str, run_id: str, ttl: float) -> Lease:
    """Take the output's lease or raise LeaseHeld naming the live run that has it."""
    uri = storage.join(output, LEASE_FILE)
    lease = Lease(uri, run_id, ttl)
    for _ in range(3):
        created = _create(uri, lease._body())
        held = _read(uri)
        # Ours: created by this call, or by a try of it whose answer was lost (the client's retry then finds the
        # object there and reports a failed precondition).
        if held and held.get("run_id") == run_id:
            lease._stop = threading.Event()
            lease._thread = threading.Thread(target=lease._renew, daemon=True, name="rea2seg-lease")
            lease._thread.start()
            return lease
        if created:
            continue
        holder = live_holder(uri)
        if holder is not None:
            raise LeaseHeld(
                f"another run is writing to {output}: {describe(holder)}. Wait for it to finish, or use another "
                f"output (its lease expires {ttl:g} s after its driver stops renewing it)"
            )
        log.warning("taking over the stale lease on %s: %s", output, _read(uri))
        _delete(uri)
    raise LeaseHeld(f"could not take the lease on {output}: other runs keep taking it")
