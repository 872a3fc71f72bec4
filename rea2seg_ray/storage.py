"""Local paths and s3:// URIs behind one small API (pyarrow.fs), with retries on transient errors.

S3 endpoint and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``
for S3-compatible stores, ``AWS_ACCESS_KEY_ID``... or instance roles); they are never logged.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")

RETRIES = 4


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
    return pafs.S3FileSystem(**kwargs)


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


def with_retries(fn: Callable[[], T], what: str, retries: int = RETRIES) -> T:
    """Retry transient I/O errors (connection resets, throttling) with exponential back-off; not FileNotFoundError."""
    delay = 0.2
    for attempt in range(retries + 1):
        try:
            return fn()
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except OSError as e:
            if not _transient(e):
                raise
            if attempt == retries:
                raise OSError(f"{what}: still failing after {retries + 1} attempts: {e}") from e
            time.sleep(delay)
            delay *= 2
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
