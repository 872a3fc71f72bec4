"""Checks of a gallery page as a browser would load it: the page's data, every file it references, a screenshot."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image


def page_data(index: Path) -> dict:
    text = index.read_text()
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
    assert m, "the page holds no data block"
    return json.loads(m.group(1).replace("<\\/", "</"))


def referenced_files(index: Path) -> list[Path]:
    """Every file the page loads: static <img src> (plots) and the pictures its data names."""
    data = page_data(index)
    srcs = re.findall(r'<img src="([^"]+)"', index.read_text())
    for item in data["items"]:
        srcs += [item["image"]] if item["image"] else []
        srcs += [c["thumb"] for c in item["candidates"]]
    assert not [s for s in srcs if re.match(r"^[a-z]+://", s)], (
        "the page must not load anything from a network"
    )
    return [(index.parent / s).resolve() for s in srcs]


def check_gallery(index: Path, per_query: Path) -> dict:
    """Every referenced image exists and decodes, every query appears once, IoU equals per_query.jsonl's."""
    data = page_data(index)
    for f in referenced_files(index):
        assert f.is_file(), f"missing: {f}"
        with Image.open(f) as im:
            im.load()
    ids = [i["id"] for i in data["items"]]
    assert len(ids) == len(set(ids))
    truth = {r["query_id"]: r for r in map(json.loads, per_query.read_text().splitlines())}
    assert set(ids) == set(truth)
    for item in data["items"]:
        assert item["iou"] == truth[item["id"]]["iou_top1"], item["id"]
    return data


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def screenshot(index: Path, out: Path) -> np.ndarray:
    """A headless Chromium screenshot of the page (1280x1000) as an (H, W, 3) uint8 array."""
    subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1000",
         "--allow-file-access-from-files", f"--screenshot={out}", index.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    return np.asarray(Image.open(out).convert("RGB"))
