"""Publishing a folder into the per-node model cache atomically."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def building(dest: Path, marker: str) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest`` to fill. On success it is marked complete (``.complete`` holds
    ``marker``), made readable to every process on the node and renamed into place; on failure it is removed.
    A crash never leaves half a model where a reader would take it for a whole one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        (tmp / ".complete").write_text(marker + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by every process on the node
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
