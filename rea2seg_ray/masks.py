"""Masks: COCO compressed RLE, LISA-exact polygon rasterisation, IoU with ignore pixels, mask NMS, boxes.

Conventions: a mask is a ``np.ndarray`` of shape (H, W); boolean for predictions, uint8 with values {0, 1, 255}
for ground truth (255 = ignore). An RLE is ``{"size": [h, w], "counts": str}`` (pycocotools compressed, Fortran order).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

IGNORE = 255
RLE = dict  # {"size": [h, w], "counts": str}


def encode_rle(mask: np.ndarray) -> RLE:
    """(H, W) bool/uint8 -> {"size": [H, W], "counts": str}. Nonzero pixels are foreground (255 is not: use gt==1)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8) != 0, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _coco(rle: RLE) -> dict:
    counts = rle["counts"]
    return {
        "size": [int(s) for s in rle["size"]],
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }


def decode_rle(rle: RLE) -> np.ndarray:
    """RLE -> (H, W) bool."""
    return mask_utils.decode(_coco(rle)).astype(bool)


def union_rle(rles: Sequence[RLE]) -> RLE:
    """The union of masks of one size, computed on the RLEs (pycocotools merge, no decode)."""
    if len(rles) == 1:
        return rles[0]
    merged = mask_utils.merge([_coco(r) for r in rles], intersect=0)
    return {
        "size": [int(merged["size"][0]), int(merged["size"][1])],
        "counts": merged["counts"].decode("ascii"),
    }


def rle_area(rle: RLE) -> int:
    return int(mask_utils.area(_coco(rle)))


def rle_bbox(rle: RLE) -> list[float]:
    """(x, y, w, h) of the mask's pixels, as pycocotools computes it (0s for an empty mask)."""
    return [float(v) for v in mask_utils.toBbox(_coco(rle))]


def mask_bbox(mask: np.ndarray) -> list[float]:
    """(x, y, w, h) tight box of a bool mask, in pixels; zeros when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


# --- LISA ReasonSeg ground truth --------------------------------------------------------------------------------


def _draw_polygon(canvas: np.ndarray, points: Sequence[Sequence[float]], value: int) -> None:
    # Exactly LISA's get_mask_from_json: vertices truncated to int32, closed 1-px outline, then fill.
    pts = np.array([points], dtype=np.int32)
    cv2.polylines(canvas, pts, True, value, 1)
    cv2.fillPoly(canvas, pts, value)


def polygon_area_px(points: Sequence[Sequence[float]], height: int, width: int) -> int:
    """Pixel area of one polygon as LISA counts it (outline + fill)."""
    tmp = np.zeros((height, width), dtype=np.uint8)
    _draw_polygon(tmp, points, 1)
    return int(tmp.sum())


def shapes_to_mask(shapes: Sequence[dict], height: int, width: int) -> np.ndarray:
    """LISA-format ``shapes`` -> (H, W) uint8 mask: 1 target, 255 ignore, 0 background.

    Reproduces LISA's ReasonSeg loader to the pixel: ``flag`` shapes skipped, shapes sorted by pixel area, largest
    first (so smaller ones overwrite), labels containing "ignore" drawn as 255, everything else as 1.
    """
    valid = [s for s in shapes if s.get("label", "").lower() != "flag"]
    areas = [polygon_area_px(s["points"], height, width) for s in valid]
    order = np.argsort(areas)[::-1].astype(
        np.int32
    )  # same (unstable) argsort as LISA, for identical tie order
    mask = np.zeros((height, width), dtype=np.uint8)
    for idx in order:
        shape = valid[int(idx)]
        value = IGNORE if "ignore" in shape.get("label", "").lower() else 1
        _draw_polygon(mask, shape["points"], value)
    return mask


# --- IoU ---------------------------------------------------------------------------------------------------------


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """(I, U) of a bool prediction against a {0, 1, 255} ground truth; ignore pixels count in neither."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    valid = gt != IGNORE
    p = pred.astype(bool) & valid
    g = gt == 1
    return int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))


def iou_from_iu(i: int, u: int) -> float:
    """LISA: a query whose union is empty (no target, nothing predicted) scores 1."""
    return 1.0 if u == 0 else i / u


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    return iou_from_iu(*intersection_union(pred, gt))


def rle_iou_matrix(a: Sequence[RLE], b: Sequence[RLE]) -> np.ndarray:
    """Pairwise IoU (len(a), len(b)) computed on RLEs without decoding."""
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    return np.asarray(
        mask_utils.iou([_coco(r) for r in a], [_coco(r) for r in b], [0] * len(b)), dtype=np.float64
    )


def mask_nms(
    rles: Sequence[RLE], scores: Sequence[float], iou_threshold: float, max_keep: int | None = None
) -> list[int]:
    """Greedy mask NMS: indices kept, highest score first; a mask is dropped if its IoU with a kept one > threshold."""
    order = sorted(range(len(rles)), key=lambda i: (-float(scores[i]), i))
    if not order:
        return []
    ious = rle_iou_matrix(rles, rles)
    keep: list[int] = []
    for i in order:
        if all(ious[i, j] <= iou_threshold for j in keep):
            keep.append(i)
            if max_keep and len(keep) >= max_keep:
                break
    return keep


def resize_mask(rle: RLE, shape: tuple[int, int]) -> np.ndarray:
    """Decode an RLE and resample it to ``shape`` (H, W), nearest neighbour -> (H, W) bool."""
    m = decode_rle(rle).astype(np.uint8)
    return cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)


def resize_rle(rle: RLE, shape: tuple[int, int]) -> RLE:
    """The same mask at ``shape`` (H, W); unchanged when it already is that size."""
    if tuple(rle["size"]) == tuple(shape):
        return rle
    return encode_rle(resize_mask(rle, shape))
