"""Model resolution and loading, one path for tiny and real checkpoints.

A model spec is a preset name (``MODEL_PRESETS``), a local folder or file, an ``s3://`` prefix (downloaded once per
node into the cache, under a file lock), or, only with ``allow_hub``, a hub id. Loading never unpickles untrusted
data: safetensors first, else ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import storage
from ..config import default_cache_dir
from .cachedir import building
from .mask_decoders import TINY_MASK_DECODERS
from .sam import build_sam, sam_config
from .tiny import TINY_SAM_PRESETS, TINY_VLM_PRESETS, build_tiny_models


class ModelNotFound(FileNotFoundError):
    pass


# Named presets. Tiny ones are built offline on first use; real ones are configured in configs/models/*.yaml
# (they point at the user's local folders or s3:// prefixes: nothing is fetched from a hub by default).
MODEL_PRESETS: dict[str, dict] = {
    **{name: {"kind": "vlm", "tiny": True} for name in TINY_VLM_PRESETS},
    **{name: {"kind": "sam", "tiny": True} for name in [*TINY_SAM_PRESETS, *TINY_MASK_DECODERS]},
}


def _cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or default_cache_dir()).expanduser()


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def tiny_model_dir(cache_dir: str | None = None) -> Path:
    return _cache_root(cache_dir) / "tiny"


def ensure_tiny(name: str, cache_dir: str | None = None) -> Path:
    """The folder of a tiny preset, built (once, under a lock shared by every process on the node) if missing."""
    root = tiny_model_dir(cache_dir)
    dest = root / name
    if (dest / ".complete").exists():
        return dest
    with _file_lock(root / f".{name}.lock"):
        return build_tiny_models(root, names=[name])[name]


def _fetch_s3(uri: str, cache_dir: str | None) -> Path:
    key = hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.rstrip("/").split("/")[-1])
    dest = _cache_root(cache_dir) / "s3" / f"{name}-{key}"
    if (dest / ".complete").exists():
        return dest
    with _file_lock(dest.parent / f".{name}-{key}.lock"):
        if (dest / ".complete").exists():
            return dest
        with building(dest, uri) as tmp:
            if storage.is_dir(uri):
                n = storage.download_tree(uri, tmp)
            else:  # a single checkpoint object
                (tmp / uri.rstrip("/").split("/")[-1]).write_bytes(storage.read_bytes(uri))
                n = 1
            if n == 0:
                raise ModelNotFound(f"model {uri}: no objects under this prefix")
    return dest


def resolve_model(spec: str, cache_dir: str | None = None, allow_hub: bool = False) -> Path:
    """Model spec -> local path (folder or file) ready to load."""
    if not spec:
        raise ModelNotFound("empty model spec")
    preset = MODEL_PRESETS.get(spec)
    if preset is not None:
        if preset.get("tiny"):
            return ensure_tiny(spec, cache_dir)
        spec = preset["uri"]
    if spec.startswith("s3://"):
        return _fetch_s3(spec, cache_dir)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if allow_hub and re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, cache_dir=str(_cache_root(cache_dir) / "hub")))
    known = ", ".join(MODEL_PRESETS)
    raise ModelNotFound(
        f"model {spec!r} not found: not a preset ({known}), an existing local path or an s3:// URI"
        + ("" if allow_hub else " (hub ids need models.allow_hub=true)")
    )


def default_dtype(device: str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_vlm(
    spec: str,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "eager",
    cache_dir: str | None = None,
    allow_hub: bool = False,
):
    """Load a transformers VLM and its processor. Returns (model in eval mode, processor)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_model(spec, cache_dir, allow_hub)
    if not (path / "config.json").exists():
        raise ModelNotFound(f"model {spec!r} ({path}) has no config.json: not a transformers model folder")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype or default_dtype(device), attn_implementation=attn_implementation
    )
    return model.to(device).eval(), processor


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _sam_files(path: Path) -> tuple[dict, Path]:
    if path.is_dir():
        cfg_file = path / "sam_config.json"
        weights = sorted([*path.glob("*.safetensors"), *path.glob("*.pth"), *path.glob("*.pt")])
        if not weights:
            raise ModelNotFound(f"SAM folder {path} has no *.safetensors / *.pth checkpoint")
        if cfg_file.exists():
            return json.loads(cfg_file.read_text()), weights[0]
        path = weights[0]
    m = re.search(r"vit_([bhl])", path.name)
    if not m:
        raise ModelNotFound(
            f"cannot tell the SAM model type of {path}: name the file like sam_vit_b_*.pth or add sam_config.json"
        )
    return sam_config(f"vit_{m.group(1)}"), path


def load_sam(spec: str, device: str = "cpu", cache_dir: str | None = None, allow_hub: bool = False):
    """Load a Segment Anything model (folder with sam_config.json, or a sam_vit_{b,l,h}*.pth file)."""
    path = resolve_model(spec, cache_dir, allow_hub)
    cfg, weights = _sam_files(path)
    sam = build_sam(cfg)
    state = _load_state_dict(weights)
    missing, unexpected = sam.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"SAM checkpoint {weights} does not match {cfg.get('model_type')}: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    return sam.to(device).eval()
