"""RLE, LISA-exact polygon rasterisation, IoU with ignore pixels, NMS: hand-computed expectations."""

import json

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco

from rea2seg_ray.masks import (
    IGNORE,
    decode_rle,
    encode_rle,
    intersection_union,
    mask_bbox,
    mask_iou,
    mask_nms,
    rle_area,
    rle_bbox,
    shapes_to_mask,
)

from ..conftest import REASONSEG_SAMPLES


def test_rle_roundtrip_and_contract_decoding():
    m = np.zeros((7, 11), bool)
    m[2:5, 3:9] = True
    m[6, 0] = True
    rle = encode_rle(m)
    assert rle["size"] == [7, 11] and isinstance(rle["counts"], str)
    # The contract's decoding recipe gives back the mask exactly.
    back = coco.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert back.shape == (7, 11) and np.array_equal(back.astype(bool), m)
    assert np.array_equal(decode_rle(rle), m)
    assert rle_area(rle) == 19
    assert rle_bbox(rle) == [0.0, 2.0, 9.0, 5.0] == mask_bbox(m)


def test_polygon_is_rasterised_with_truncated_vertices_outline_and_fill():
    # Vertices 1.9 truncate to 1: the square covers rows/cols 1..4 inclusive (outline drawn too) = 16 px.
    shapes = [{"label": "target", "points": [[1.9, 1.9], [4.2, 1.0], [4.99, 4.0], [1.0, 4.7]]}]
    m = shapes_to_mask(shapes, 6, 6)
    expected = np.zeros((6, 6), np.uint8)
    expected[1:5, 1:5] = 1
    assert np.array_equal(m, expected)


def test_smaller_shapes_overwrite_larger_ignore_is_255_flag_skipped():
    target = {"label": "target", "points": [[0, 0], [5, 0], [5, 5], [0, 5]]}  # 36 px
    hole = {"label": "ignore", "points": [[2, 2], [3, 2], [3, 3], [2, 3]]}  # 4 px
    flag = {"label": "flag", "points": [[0, 0], [5, 5]]}
    # Listed small-first: LISA still draws the larger one first, so the hole survives.
    m = shapes_to_mask([hole, flag, target], 8, 8)
    assert (m == 1).sum() == 32 and (m == IGNORE).sum() == 4
    assert m[2, 2] == IGNORE and m[0, 0] == 1 and m[7, 7] == 0
    # A small target inside a large ignore region overwrites it.
    m2 = shapes_to_mask(
        [{"label": "ignore", "points": target["points"]}, {"label": "target", "points": hole["points"]}], 8, 8
    )
    assert (m2 == 1).sum() == 4 and (m2 == IGNORE).sum() == 32


def _lisa_reference(anno: dict, h: int, w: int) -> np.ndarray:
    """LISA's get_mask_from_json, transcribed, as the reference the loader must match."""
    area_list, valid = [], []
    for i in anno["shapes"]:
        if "flag" == i["label"].lower():
            continue
        tmp = np.zeros((h, w), dtype=np.uint8)
        cv2.polylines(tmp, np.array([i["points"]], dtype=np.int32), True, 1, 1)
        cv2.fillPoly(tmp, np.array([i["points"]], dtype=np.int32), 1)
        area_list.append(tmp.sum())
        valid.append(i)
    mask = np.zeros((h, w), dtype=np.uint8)
    for s in np.argsort(area_list)[::-1].astype(np.int32):
        i = valid[s]
        v = 255 if "ignore" in i["label"].lower() else 1
        cv2.polylines(mask, np.array([i["points"]], dtype=np.int32), True, v, 1)
        cv2.fillPoly(mask, np.array([i["points"]], dtype=np.int32), v)
    return mask


def test_real_reasonseg_annotation_matches_lisa_to_the_pixel():
    anno = json.loads((REASONSEG_SAMPLES / "scene0104_00_0.json").read_text())
    m = shapes_to_mask(anno["shapes"], 240, 320)
    assert np.array_equal(m, _lisa_reference(anno, 240, 320))
    assert (m == 1).sum() > 1000 and (m == IGNORE).sum() > 0  # the hole is there and kept as ignore


def test_iou_excludes_ignore_pixels_and_empty_union_is_one():
    gt = np.zeros((4, 4), np.uint8)
    gt[0, 0:2] = 1  # 2 target px
    gt[1, 0:2] = IGNORE  # 2 ignore px
    pred = np.zeros((4, 4), bool)
    pred[0:2, 0:3] = True  # 6 px: 2 on target, 2 on ignore (dropped), 2 on background
    assert intersection_union(pred, gt) == (2, 4)
    assert mask_iou(pred, gt) == 0.5
    assert mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), np.uint8)) == 1.0
    assert mask_iou(np.zeros((4, 4), bool), gt) == 0.0
    with pytest.raises(ValueError, match="shape"):
        intersection_union(np.zeros((3, 4), bool), gt)


def test_mask_nms_keeps_best_of_overlapping_and_caps():
    a = np.zeros((10, 10), bool)
    a[0:5, 0:5] = True
    b = a.copy()
    b[0:5, 5] = True  # IoU(a, b) = 25/30
    c = np.zeros((10, 10), bool)
    c[6:, 6:] = True
    rles = [encode_rle(x) for x in (a, b, c)]
    assert mask_nms(rles, [0.5, 0.9, 0.1], iou_threshold=0.7) == [1, 2]
    assert mask_nms(rles, [0.5, 0.9, 0.1], iou_threshold=0.9) == [1, 0, 2]
    assert mask_nms(rles, [0.5, 0.9, 0.1], iou_threshold=0.9, max_keep=2) == [1, 0]
    assert mask_nms([], [], 0.5) == []
