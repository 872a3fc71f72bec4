"""The gallery's sample of a large run, and RefCOCO evaluated through `rea2seg evaluate`."""

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from rea2seg_ray.cli import main
from rea2seg_ray.datasets import load_ground_truth, read_queries
from rea2seg_ray.eval.gallery import allocate, build_gallery, sample_ids
from rea2seg_ray.masks import encode_rle, mask_bbox
from rea2seg_ray.records import Candidate, Prediction, predictions_table

from ..gallery_check import check_gallery, page_data
from .test_coco_refcoco import refcoco_folder


def test_allocate_is_proportional_with_one_each():
    share = allocate({"a": 900, "b": 90, "c": 9, "d": 1}, 20)
    assert sum(share.values()) == 20 and share["d"] == 1 and share["c"] >= 1 and share["a"] > share["b"]
    assert allocate({"a": 3, "b": 2}, 20) == {"a": 3, "b": 2}


def test_large_run_is_sampled_by_category_and_status(tmp_path):
    cats = ["short", "long", "multi-step"]
    rows = []
    for i in range(3000):
        ok = i % 50 != 0
        rows.append(Prediction(query_id=f"q{i:05d}", category=cats[i % 3], status="ok" if ok else "error",
                               error=None if ok else "bad image", error_stage=None if ok else "decode"))  # fmt: skip
    for n, part in enumerate((rows[:1700], rows[1700:])):
        pq.write_table(predictions_table(part), tmp_path / f"part-{n}.parquet")
    ids, total = sample_ids(str(tmp_path), 30)
    assert total == 3000 and len(ids) == 30 and len(set(ids)) == 30
    by = Counter((rows[int(q[1:])].category, rows[int(q[1:])].status) for q in ids)
    assert len(by) == 6 and all(v >= 1 for v in by.values())  # every (category, status) is seen
    assert sample_ids(str(tmp_path), 30) == (ids, 3000)  # the same run gives the same sample
    uri = build_gallery(str(tmp_path), str(tmp_path / "out"), max_queries=30)
    data = page_data(tmp_path / "out" / "gallery" / "index.html")
    assert sorted(i["id"] for i in data["items"]) == ids and uri.endswith("index.html")
    assert "a stratified sample of 3000" in (tmp_path / "out" / "gallery" / "index.html").read_text()
    assert all(i["image"] is None and i["image_error"] for i in data["items"])  # no image: said, not crashed


def test_refcoco_evaluates_per_split_with_ciou(tmp_path):
    folder, _, refs = refcoco_folder(tmp_path)
    preds = []
    for n, q in enumerate(read_queries(str(folder), format="refcoco")):
        gt = load_ground_truth(q) == 1
        m = gt if n else np.zeros_like(gt)  # the first query misses
        c = Candidate(mask=encode_rle(m), bbox=mask_bbox(m), area=int(m.sum()), rank=0, score=0.8, source="x")
        preds.append(Prediction(query_id=q.query_id, image_uri=q.image, question=q.question, category=q.category,
                                height=gt.shape[0], width=gt.shape[1], mask=c.mask, score=0.8, candidates=[c]))  # fmt: skip
    pq.write_table(predictions_table(preds), tmp_path / "p.parquet")
    args = [
        f"predictions={tmp_path / 'p.parquet'}",
        f"dataset={folder}",
        "format=refcoco",
        f"output={tmp_path / 'ev'}",
    ]
    assert main(["evaluate", *args]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(m["by_category"]) == {r["split"] for r in refs} and m["n"] == 6
    assert m["by_category"]["val"]["top1"] == {"giou": 1.0, "ciou": 1.0}
    assert m["by_category"]["train"]["top1"]["giou"] == pytest.approx(0.5)
    assert 0.5 < m["top1"]["ciou"] < 1.0
    data = check_gallery(tmp_path / "ev" / "gallery" / "index.html", tmp_path / "ev" / "per_query.jsonl")
    assert {i["category"] for i in data["items"]} == {"train", "val", "testA"}


def test_gallery_draws_the_top1_on_a_real_photo(tmp_path):
    """The vendored ReasonSeg photo: decoded once, shown at gallery.image_side with everything but the top-1 mask
    dimmed (as the scorer sees a candidate), and a thumbnail per candidate."""
    from PIL import Image

    from ..conftest import REASONSEG_SAMPLES

    photo = REASONSEG_SAMPLES / "4971309080_370ab0baf3_o.jpg"
    m = np.zeros((533, 685), bool)
    m[100:300, 200:500] = True
    rle = encode_rle(m)
    cands = [Candidate(mask=rle, bbox=mask_bbox(m), area=int(m.sum()), rank=r, score=0.9 - r / 10, source="x")
             for r in range(3)]  # fmt: skip
    p = Prediction(query_id="deer", image_uri=str(photo), question="the antlers?", height=533, width=685, mask=rle,
                   score=0.9, candidates=cands)  # fmt: skip
    pq.write_table(predictions_table([p]), tmp_path / "p.parquet")
    build_gallery(str(tmp_path / "p.parquet"), str(tmp_path / "out"), image_side=320, thumbs=2)
    item = page_data(tmp_path / "out" / "gallery" / "index.html")["items"][0]
    assert [c["rank"] for c in item["candidates"]] == [0, 1]
    shown = np.asarray(Image.open(tmp_path / "out" / "gallery" / item["image"]), np.float32)
    assert shown.shape == (249, 320, 3)  # 533x685 with its longer side at 320
    photo_small = np.asarray(Image.open(photo).convert("RGB").resize((320, 249)), np.float32)
    inside, outside = shown[80:120, 120:200], shown[5:30, 5:60]
    assert abs(inside.mean() - photo_small[80:120, 120:200].mean()) < 12  # the mask keeps its pixels
    assert outside.mean() < 0.6 * photo_small[5:30, 5:60].mean() + 5  # the rest is dimmed to 45 %
