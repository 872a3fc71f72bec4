"""Local paths and s3:// URIs behind one small API (pyarrow.fs), with retries on transient errors.

S3 endpoint and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``
for S3-compatible stores, ``AWS_ACCESS_KEY_ID``... or instance roles); they are never logged.

One retry policy (``RETRY``), in two layers, both exponential back-off with jitter and bounded:

1. every S3 request, whoever makes it (this module, Ray Data's reads and Parquet writes, Ray Train's checkpoint
   uploads: they all get their filesystem from ``filesystem``), is retried by the S3 client itself
   (``client_attempts``, the AWS SDK's standard strategy: 500 / 503 SlowDown / reset connections);
2. each whole operation of this module (a read, a write, a listing) that still fails is retried ``attempts`` times
   with full-jitter back-off (``base_delay_s`` doubling, capped at ``max_delay_s``); Ray Data's readers and writers
   do the same with their own retry on the same error kinds (``IO_RETRY_PATTERNS``, installed by ``init_ray``).

What still fails names the object and how often it was tried; callers turn it into the affected rows' error (an
image that cannot be read) or stop the job (an output that cannot be written: a rerun resumes).
"""

from __future__ import annotations

import os
import posixpath
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs

from . import get_logger

T = TypeVar("T")
log = get_logger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How transient storage errors are retried (module docstring: two layers)."""

    attempts: int = (
        5  # tries of one operation of this module, in all (each try is itself retried by the client)
    )
    base_delay_s: float = 0.2  # first back-off bound; doubles per try
    max_delay_s: float = 5.0  # back-off bound cap: the whole operation gives up within ~attempts x this
    client_attempts: int = (
        3  # tries of one S3 request by the S3 client (AWS SDK standard strategy, with jitter)
    )

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full jitter: uniform in [0, min(cap, base x 2^attempt)], so clients that failed together spread out."""
        bound = min(self.max_delay_s, self.base_delay_s * (2**attempt))
        return (rng or random).uniform(0.0, bound)


RETRY = RetryPolicy()
# Error texts (as pyarrow's S3 client words them) that Ray Data's own readers and writers retry, beside its defaults.
IO_RETRY_PATTERNS = (
    "AWS Error INTERNAL_FAILURE",
    "AWS Error NETWORK_CONNECTION",
    "AWS Error SLOW_DOWN",
    "AWS Error SERVICE_UNAVAILABLE",
    "AWS Error UNKNOWN (HTTP status 500)",
    "AWS Error UNKNOWN (HTTP status 503)",
    "AWS Error REQUEST_TIMEOUT",
    "Connection reset",
    "Recv failure",
)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=RETRY.client_attempts), **kwargs
    )


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """URI -> (pyarrow FileSystem, path inside it). Local paths are made absolute."""
    if uri.startswith("s3://"):
        # A bare S3FileSystem ignores AWS_ENDPOINT_URL: pass the endpoint explicitly.
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return _s3_filesystem(_s3_endpoint(), region), uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if is_remote(uri):
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


def with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy = RETRY) -> T:
    """Retry transient I/O errors (connection resets, throttling, 5xx) with jittered exponential back-off, at most
    ``policy.attempts`` tries; a missing, forbidden or wrong-kind object fails at once."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except OSError as e:
            if not _transient(e):
                raise
            if attempt == policy.attempts - 1:
                raise OSError(f"{what}: still failing after {policy.attempts} attempts: {e}") from e
            pause = policy.delay(attempt)
            log.debug("%s: transient error (try %d of %d), retrying in %.2f s: %s", what, attempt + 1,
                      policy.attempts, pause, e)  # fmt: skip
            time.sleep(pause)
    raise AssertionError("unreachable")


def _transient(e: OSError) -> bool:
    text = str(e).lower()
    permanent = ("not found", "nosuchkey", "nosuchbucket", "access denied", "is a directory", "not a file")
    if any(p in text for p in permanent):
        return False
    return True


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return str(Path(base, *parts))


def parent(uri: str) -> str:
    if is_remote(uri):
        scheme, _, rest = uri.partition("://")
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return str(Path(uri).expanduser().absolute().parent)


def resolve_relative(path: str, base_dir: str) -> str:
    """A manifest's relative path -> absolute URI relative to the manifest's folder; absolute ones unchanged."""
    if is_remote(path) or path.startswith("file://") or os.path.isabs(path):
        return path
    return join(base_dir, path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)

    def _read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        return with_retries(_read, f"read {uri}")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such file or object: {uri}") from e
    except OSError as e:
        if "not found" in str(e).lower() or "nosuchkey" in str(e).lower():
            raise FileNotFoundError(f"no such file or object: {uri}") from e
        raise


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if not is_remote(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)

    def _write() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    with_retries(_write, f"write {uri}")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.get_file_info(path).type != pafs.FileType.NotFound, f"stat {uri}")


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.get_file_info(path).type == pafs.FileType.Directory, f"stat {uri}")


def list_files(uri: str, recursive: bool = False) -> Iterator[str]:
    """Files directly under (or, recursive, anywhere under) a folder or prefix, as URIs of the same kind, sorted."""
    fs, path = filesystem(uri)
    infos = with_retries(
        lambda: fs.get_file_info(pafs.FileSelector(path, recursive=recursive)), f"list {uri}"
    )
    prefix = "s3://" if uri.startswith("s3://") else ""
    for info in sorted(infos, key=lambda i: i.path):
        if info.type == pafs.FileType.File:
            yield prefix + info.path if prefix else info.path


def download_tree(uri: str, dest: str | os.PathLike) -> int:
    """Copy every object under ``uri`` into local folder ``dest`` (keeping relative paths). Returns file count."""
    fs, root = filesystem(uri)
    infos = with_retries(lambda: fs.get_file_info(pafs.FileSelector(root, recursive=True)), f"list {uri}")
    n = 0
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root) :].lstrip("/")
        target = Path(dest, rel)
        target.parent.mkdir(parents=True, exist_ok=True)

        def _get(p: str = info.path, t: Path = target) -> None:
            with fs.open_input_stream(p) as src, open(t, "wb") as out:
                while chunk := src.read(8 << 20):
                    out.write(chunk)

        with_retries(_get, f"download {info.path}")
        n += 1
    return n
