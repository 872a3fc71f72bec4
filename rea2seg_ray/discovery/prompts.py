"""Heat maps on the image-token grid and the SAM prompts drawn from them: peaks (positive points), coldest cells
(negative points) and boxes around high-attention blobs, all in original-image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class HeatMap:
    """Attention over an image-token grid, and the original image it covers.

    ``grid``: (gh, gw) float32, one value per (merged) image token, row-major. The tokens tile the processor's
    resized image exactly (no padding), so cell (r, c) covers original pixels x in [c, c+1) * W/gw and
    y in [r, r+1) * H/gh: separate x and y scales.
    """

    grid: np.ndarray
    height: int
    width: int

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): original pixels per token cell along x and y."""
        gh, gw = self.grid.shape
        return self.width / gw, self.height / gh

    def cell_center(self, r: float, c: float) -> tuple[float, float]:
        """Original-image (x, y) of a cell's centre."""
        sx, sy = self.scale
        return (c + 0.5) * sx, (r + 0.5) * sy

    def cell_box(self, r0: int, c0: int, r1: int, c1: int) -> list[float]:
        """Cells [r0..r1] x [c0..c1] (inclusive) -> original (x0, y0, x1, y1), clipped to the image."""
        sx, sy = self.scale
        return [c0 * sx, r0 * sy, min((c1 + 1) * sx, self.width), min((r1 + 1) * sy, self.height)]

    def to_image(self) -> np.ndarray:
        """(H, W) float32 map at the original resolution (bilinear between cell centres)."""
        return cv2.resize(
            self.grid.astype(np.float32), (self.width, self.height), interpolation=cv2.INTER_LINEAR
        )

    def normalized(self) -> np.ndarray:
        g = self.grid.astype(np.float64)
        lo, hi = g.min(), g.max()
        return np.zeros_like(g) if hi - lo < 1e-12 else (g - lo) / (hi - lo)

    def mass_in(self, mask: np.ndarray) -> float:
        """Share of the (min-shifted) attention mass that falls inside a (H, W) bool mask, in [0, 1]."""
        heat = np.clip(self.to_image() - self.grid.min(), 0, None)
        total = float(heat.sum())
        return 0.0 if total <= 0 else float(heat[mask].sum() / total)


def smooth(grid: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return grid.astype(np.float32)
    k = int(2 * round(3 * sigma) + 1)
    return cv2.GaussianBlur(
        grid.astype(np.float32), (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT
    )


def find_peaks(
    heat: HeatMap, k: int, min_distance: int = 1, rel_threshold: float = 0.3
) -> list[tuple[float, float, float]]:
    """Top-k local maxima of the grid, at least ``min_distance`` cells apart (Chebyshev) and at or above
    ``rel_threshold`` of the range. Returns [(x, y, value)] in original pixels, strongest first.
    """
    g = heat.normalized().astype(np.float32)  # same precision as the dilated map, so maxima compare equal
    size = 2 * max(min_distance, 1) + 1
    dilated = cv2.dilate(g, np.ones((size, size), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=-1)
    cand = np.argwhere((g >= dilated) & (g >= rel_threshold))
    order = sorted(cand.tolist(), key=lambda rc: (-g[rc[0], rc[1]], rc[0], rc[1]))
    picked: list[tuple[int, int]] = []
    for r, c in order:
        if all(max(abs(r - pr), abs(c - pc)) > min_distance for pr, pc in picked):
            picked.append((r, c))
            if len(picked) >= k:
                break
    if not picked:  # a flat map: its centre
        gh, gw = g.shape
        picked = [(gh // 2, gw // 2)]
    return [(*heat.cell_center(r, c), float(g[r, c])) for r, c in picked]


def coldest_points(heat: HeatMap, n: int, min_distance: int = 1) -> list[tuple[float, float]]:
    """The ``n`` lowest-attention cells, spread apart, as original (x, y) negative points."""
    if n <= 0:
        return []
    inv = HeatMap(grid=-heat.grid, height=heat.height, width=heat.width)
    return [(x, y) for x, y, _ in find_peaks(inv, n, min_distance=min_distance, rel_threshold=0.0)]


def blob_boxes(heat: HeatMap, threshold: float = 0.5, max_boxes: int = 3) -> list[tuple[list[float], float]]:
    """Boxes (x0, y0, x1, y1, original pixels) around connected cells at or above ``threshold`` of the range,
    with each blob's attention mass share; largest mass first.
    """
    g = heat.normalized()
    binary = (g >= threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    total = float(g.sum()) or 1.0
    blobs = []
    for i in range(1, n):
        x, y, w, h, _ = stats[i]
        mass = float(g[labels == i].sum()) / total
        blobs.append((heat.cell_box(int(y), int(x), int(y + h - 1), int(x + w - 1)), mass))
    blobs.sort(key=lambda b: -b[1])
    return blobs[:max_boxes]
