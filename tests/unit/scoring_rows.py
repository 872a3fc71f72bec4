"""Mask-scoring rows from one hand-made image row, as `rea2seg make-scoring-data` builds them from the discovery
stage's output."""

import numpy as np
import pyarrow as pa


def label_scene(query, found_masks: list[np.ndarray], max_neg_per_pos: float = 0) -> list[dict]:
    """`query` (records.Query) with `found_masks` (H x W bool each) as its discovered candidates, in one image row
    of IMAGE_ROW_SCHEMA -> label_batch's EXAMPLE rows (pos IoU 0.7, neg IoU 0.3, seed 0)."""
    from rea2seg_ray.masks import encode_rle, mask_bbox
    from rea2seg_ray.records import Candidate
    from rea2seg_ray.runtime.inputs import IMAGE_ROW_SCHEMA
    from rea2seg_ray.train.data import label_batch

    h, w = found_masks[0].shape
    found = [
        Candidate(mask=encode_rle(m), bbox=mask_bbox(m), area=int(m.sum())).to_row() for m in found_masks
    ]
    row = {"image_uri": query.image, "part": 0, "queries": [dict(query.to_struct(), found=found)], "height": h,
           "width": w, "proc_h": h, "proc_w": w, "image": bytes(h * w * 3)}  # fmt: skip
    table = pa.Table.from_pylist([row], schema=IMAGE_ROW_SCHEMA)
    return label_batch(table, 0.7, 0.3, max_neg_per_pos, True, 0).to_pylist()
