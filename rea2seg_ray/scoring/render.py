"""Showing candidates to the scorer. The image is resized once per query; every candidate is drawn on that copy.

- overlay: the full image with the candidate highlighted (``dim``: everything else darkened to 45 % and a 2-px
  white outline; ``tint``: a translucent colour and a contour);
- crop: the candidate's box with a margin, outlined (shown after the full image);
- marks: all candidates outlined in distinct colours and numbered 1..K on one image (comparative prompts).

Deterministic: no randomness, fixed colours, OpenCV drawing only.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from ..masks import decode_rle

PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
]  # fmt: skip


def resize_once(image: np.ndarray, max_side: int = 0, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 -> the image at ``size`` (h, w) when given, else with its longer side at most ``max_side``."""
    h, w = image.shape[:2]
    if size is None:
        s = min(1.0, max_side / max(h, w)) if max_side > 0 else 1.0
        size = (max(1, round(h * s)), max(1, round(w * s)))
    if size == (h, w):
        return np.ascontiguousarray(image)
    interp = cv2.INTER_AREA if size[0] * size[1] < h * w else cv2.INTER_LINEAR
    return cv2.resize(image, (size[1], size[0]), interpolation=interp)


def _nearest_index(src: int, dst: int) -> np.ndarray:
    return np.minimum(((np.arange(dst) + 0.5) * src / dst).astype(np.int64), src - 1)


def fit_array(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An (h, w) mask brought to ``shape`` (H, W) with nearest-neighbour resampling (pixel centres)."""
    if mask.shape == tuple(shape):
        return mask
    return mask[
        _nearest_index(mask.shape[0], shape[0])[:, None], _nearest_index(mask.shape[1], shape[1])[None, :]
    ]


def fit_mask(rle: dict, shape: tuple[int, int]) -> np.ndarray:
    """Decode an RLE and bring it to ``shape`` (H, W) (``fit_array``)."""
    return fit_array(decode_rle(rle), shape)


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    k = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    m = mask.astype(np.uint8)
    return (cv2.dilate(m, k) > 0) & ~(cv2.erode(m, np.ones((3, 3), np.uint8)) > 0)


def overlay(
    base: np.ndarray, mask: np.ndarray, style: str = "dim", dimmed: np.ndarray | None = None
) -> np.ndarray:
    """``dimmed``: the base already darkened (computed once per query and reused for every candidate)."""
    if style == "dim":
        out = (dimmed if dimmed is not None else (base * 0.45).astype(np.uint8)).copy()
        out[mask] = base[mask]
        out[outline(mask)] = 255
    elif style == "tint":
        colour = np.array(PALETTE[0], np.float32)
        out = base.copy()
        out[mask] = (0.55 * base[mask] + 0.45 * colour).astype(np.uint8)
        out[outline(mask)] = PALETTE[0]
    else:
        raise ValueError(f"scoring.overlay_style must be dim or tint, not {style!r}")
    return out


def crop(base: np.ndarray, mask: np.ndarray, margin: float = 0.15) -> np.ndarray:
    """The mask's box grown by ``margin`` of its size on each side, outlined; at least 28 px a side."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return base.copy()
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    mx, my = int((x1 - x0) * margin) + 2, int((y1 - y0) * margin) + 2
    x0, x1, y0, y1 = max(0, x0 - mx), min(w, x1 + mx), max(0, y0 - my), min(h, y1 + my)
    if x1 - x0 < 28:
        x0, x1 = max(0, min(x0, w - 28)), min(w, max(x1, x0 + 28))
    if y1 - y0 < 28:
        y0, y1 = max(0, min(y0, h - 28)), min(h, max(y1, y0 + 28))
    out = base[y0:y1, x0:x1].copy()
    out[outline(mask[y0:y1, x0:x1])] = 255
    return out


def _label_point(mask: np.ndarray) -> tuple[int, int]:
    """A point well inside the mask (distance-transform maximum), as (x, y)."""
    if not mask.any():
        return 0, 0
    dist = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return int(x), int(y)


def marks(base: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """All candidates on one image: coloured outline and a number (1-based) in each."""
    out = base.copy()
    scale = max(0.35, min(base.shape[:2]) / 400)
    for i, m in enumerate(masks):
        colour = PALETTE[i % len(PALETTE)]
        out[outline(m)] = colour
    for i, m in enumerate(masks):
        colour = PALETTE[i % len(PALETTE)]
        x, y = _label_point(m)
        text = str(i + 1)
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        org = (
            int(np.clip(x - tw // 2, 0, out.shape[1] - tw)),
            int(np.clip(y + th // 2, th, out.shape[0] - 1)),
        )
        cv2.rectangle(out, (org[0] - 1, org[1] - th - 1), (org[0] + tw + 1, org[1] + 2), (0, 0, 0), -1)
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
    return out


def render_query(
    image: np.ndarray,
    rles: list[dict],
    mode: str,
    max_side: int = 0,
    style: str = "dim",
    margin: float = 0.15,
    size: tuple[int, int] | None = None,
) -> tuple[Image.Image, list[Image.Image]]:
    """(base image, candidate images) for one query. ``size`` (h, w): draw at the scorer's own input size, so an
    outline stays visible to the model and its processor has nothing left to resize; else ``max_side``.
    ``marks`` gives one image holding every candidate."""
    base = resize_once(image, max_side, size)
    ms = [fit_mask(r, base.shape[:2]) for r in rles]
    if mode == "overlay":
        dimmed = (base * 0.45).astype(np.uint8) if style == "dim" else None
        cands = [overlay(base, m, style, dimmed) for m in ms]
    elif mode == "crop":
        cands = [crop(base, m, margin) for m in ms]
    elif mode == "marks":
        cands = [marks(base, ms)]
    else:
        raise ValueError(f"scoring.render must be overlay, crop or marks, not {mode!r}")
    return Image.fromarray(base), [Image.fromarray(c) for c in cands]
