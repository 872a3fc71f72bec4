"""What a transformers checkpoint folder is, read from its ``config.json`` (the registries in ``families`` and
``mask_decoders`` are keyed by it)."""

from __future__ import annotations

import json
from pathlib import Path


def model_type_of(path: str | Path) -> str | None:
    """``config.json``'s ``model_type`` of a checkpoint folder ("" when the key is missing); None when ``path`` is not
    a folder with a ``config.json`` (a single checkpoint file, a segment-anything folder)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text()).get("model_type", "")
