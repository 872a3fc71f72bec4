"""COCO out (`rea2seg export-coco` -> pycocotools' loadRes / COCOeval) and RefCOCO in (`format=refcoco`)."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rea2seg_ray.cli import main
from rea2seg_ray.datasets import DatasetError, load_ground_truth, read_queries
from rea2seg_ray.masks import decode_rle, encode_rle, mask_bbox, rle_area
from rea2seg_ray.records import Candidate, Prediction, predictions_table

from ..conftest import REPO

REFCOCO = REPO / "tests" / "assets" / "refcoco"


def _disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def coco_fixture(tmp_path):
    """Three images, four instances of two categories: a COCO ground truth, a manifest that names them by
    image_id / category_id (one query per instance) and the masks."""
    shapes = {1: [(_disk(48, 64, 20, 20, 9), 1), (_disk(48, 64, 30, 45, 7), 1)],
              2: [(_disk(48, 64, 24, 32, 12), 2)], 3: [(np.pad(np.ones((10, 20), bool), ((5, 33), (30, 14))), 2)]}  # fmt: skip
    gt = {
        "images": [],
        "annotations": [],
        "categories": [{"id": 1, "name": "ball"}, {"id": 2, "name": "box"}],
    }
    rows, masks = [], {}
    for img_id, insts in shapes.items():
        Image.new("RGB", (64, 48), (90, 90, 90)).save(tmp_path / f"im{img_id}.jpg")
        gt["images"].append({"id": img_id, "file_name": f"im{img_id}.jpg", "height": 48, "width": 64})
        for m, cat in insts:
            ann_id = len(gt["annotations"]) + 1
            rle = encode_rle(m)
            gt["annotations"].append({"id": ann_id, "image_id": img_id, "category_id": cat, "segmentation": rle,
                                      "area": rle_area(rle), "bbox": mask_bbox(m), "iscrowd": 0})  # fmt: skip
            qid = f"q{ann_id}"
            masks[qid] = m
            rows.append({"query_id": qid, "image": f"im{img_id}.jpg", "question": f"the object {ann_id}",
                         "image_id": img_id, "category_id": cat, "gt_mask": rle})  # fmt: skip
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return masks


def predictions(tmp_path, masks, wrong: set[str] = frozenset()):
    preds = []
    for qid, m in masks.items():
        good = encode_rle(np.zeros_like(m) if qid in wrong else m)
        other = encode_rle(np.roll(m, 9, axis=1))
        cands = [Candidate(mask=good, bbox=mask_bbox(decode_rle(good)), area=rle_area(good), rank=0, score=0.9),
                 Candidate(mask=other, bbox=mask_bbox(decode_rle(other)), area=rle_area(other), rank=1, score=0.2)]  # fmt: skip
        preds.append(Prediction(query_id=qid, image_uri=str(tmp_path / "x.jpg"), question="?", height=48, width=64,
                                mask=good, score=0.9, candidates=cands))  # fmt: skip
    preds.append(
        Prediction(query_id="broken", image_uri="", status="error", error="boom", error_stage="decode")
    )
    pq.write_table(predictions_table(preds), tmp_path / "preds.parquet")
    return str(tmp_path / "preds.parquet")


def segm_ap(gt_file, results_file) -> float:
    coco = COCO(str(gt_file))
    ev = COCOeval(coco, coco.loadRes(str(results_file)), iouType="segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return float(ev.stats[0])


def test_export_coco_perfect_predictions_score_ap_one(tmp_path, capsys):
    masks = coco_fixture(tmp_path)
    pred = predictions(tmp_path, masks)
    out = tmp_path / "res" / "results.json"
    assert (
        main(["export-coco", f"predictions={pred}", f"output={out}", f"dataset={tmp_path / 'm.jsonl'}"]) == 0
    )
    assert "4 results from 5 queries (1 error rows left out)" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert {(r["query_id"], r["image_id"], r["category_id"]) for r in res} == {
        ("q1", 1, 1), ("q2", 1, 1), ("q3", 2, 2), ("q4", 3, 2)}  # fmt: skip
    assert not (tmp_path / "res" / "results.json.ids.json").exists()  # every id came from the manifest
    assert segm_ap(tmp_path / "gt.json", out) == pytest.approx(1.0)


def test_export_coco_wrong_mask_lowers_ap_and_all_candidates(tmp_path):
    masks = coco_fixture(tmp_path)
    pred = predictions(tmp_path, masks, wrong={"q3"})
    out = tmp_path / "results.json"
    assert (
        main(["export-coco", f"predictions={pred}", f"output={out}", f"dataset={tmp_path / 'm.jsonl'}"]) == 0
    )
    assert segm_ap(tmp_path / "gt.json", out) < 0.9
    every = tmp_path / "every.json"
    args = ["export-coco", f"predictions={pred}", f"output={every}", f"dataset={tmp_path / 'm.jsonl'}"]
    assert main([*args, "--all-candidates"]) == 0
    res = json.loads(every.read_text())
    assert len(res) == 8 and sorted({r["rank"] for r in res}) == [0, 1]
    assert [r["score"] for r in res if r["rank"] == 1] == [pytest.approx(0.2)] * 4


def test_export_coco_without_ids_writes_stable_ids_and_mapping(tmp_path):
    masks = coco_fixture(tmp_path)
    pred = predictions(tmp_path, masks)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["export-coco", f"predictions={pred}", f"output={a}"]) == 0
    assert main(["export-coco", f"predictions={pred}", f"output={b}"]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert [(r["image_id"], r["category_id"]) for r in ra] == [(r["image_id"], r["category_id"]) for r in rb]
    mapping = json.loads((tmp_path / "a.json.ids.json").read_text())
    assert [m["file_name"] for m in mapping["images"]] == [str(tmp_path / "x.jpg")]
    assert {r["image_id"] for r in ra} == {m["id"] for m in mapping["images"]}
    # the mapping is enough to build a ground truth pycocotools accepts for these results
    gt = {"images": [dict(id=m["id"], height=48, width=64, file_name=m["file_name"]) for m in mapping["images"]],
          "categories": mapping["categories"], "annotations": []}  # fmt: skip
    (tmp_path / "g.json").write_text(json.dumps(gt))
    COCO(str(tmp_path / "g.json")).loadRes(str(a))


# -- RefCOCO ----------------------------------------------------------------------------------------------------


def refcoco_folder(tmp_path, form: str = "json"):
    """The vendored RefCOCO fixture (refer's refs + COCO instances, JSON form) with blank images, or the same refs
    as Parquet with the annotation and image in each row (``raw_anns`` / ``raw_image_info``)."""
    folder = tmp_path / "refcoco"
    (folder / "images").mkdir(parents=True)
    inst = json.loads((REFCOCO / "instances.json").read_text())
    for im in inst["images"]:
        Image.new("RGB", (im["width"], im["height"])).save(folder / "images" / im["file_name"])
    refs = json.loads((REFCOCO / "refs(unc).json").read_text())
    if form == "json":
        shutil.copy(REFCOCO / "instances.json", folder)
        shutil.copy(REFCOCO / "refs(unc).json", folder)
    else:
        anns = {a["id"]: a for a in inst["annotations"]}
        imgs = {i["id"]: i for i in inst["images"]}
        rows = [dict(r, raw_anns=json.dumps(anns[r["ann_id"]]), raw_image_info=json.dumps(imgs[r["image_id"]]))
                for r in refs]  # fmt: skip
        pq.write_table(pa.Table.from_pylist(rows), folder / "refs(unc).parquet")
    return folder, inst, refs


@pytest.mark.parametrize("form", ["json", "parquet"])
def test_refcoco_reads_one_query_per_sentence_with_the_instance_mask(tmp_path, form):
    folder, inst, refs = refcoco_folder(tmp_path, form)
    qs = list(read_queries(str(folder), format="refcoco"))
    want = [(r, s) for r in refs for s in r["sentences"]]
    assert [q.query_id for q in qs] == [f"ref{r['ref_id']}:{s['sent_id']}" for r, s in want]
    assert [q.question for q in qs] == [s["sent"] for _, s in want]
    assert [q.category for q in qs] == [r["split"] for r, _ in want]
    anns = {a["id"]: a for a in inst["annotations"]}
    imgs = {i["id"]: i for i in inst["images"]}
    for q, (r, _) in zip(qs, want, strict=True):
        img, ann = imgs[r["image_id"]], anns[r["ann_id"]]
        assert q.image == str(folder / "images" / img["file_name"])
        gt = load_ground_truth(q)
        assert gt.shape == (img["height"], img["width"])
        # the polygon drawn independently: every vertex-free interior point of the polygon is in the mask
        from pycocotools import mask as mu

        expect = mu.decode(mu.merge(mu.frPyObjects(ann["segmentation"], img["height"], img["width"])))
        assert np.array_equal(gt, expect) and gt.sum() == pytest.approx(ann["area"], rel=0.1)
        assert q.meta == {"image_id": r["image_id"], "category_id": r["category_id"]}
    val = list(read_queries(str(folder), format="refcoco", split="val"))
    assert val and all(q.category == "val" for q in val) and len(val) < len(qs)


def test_refcoco_bad_input_names_the_problem(tmp_path):
    folder, _, refs = refcoco_folder(tmp_path)
    with pytest.raises(DatasetError, match="split must be one of"):
        list(read_queries(str(folder), format="refcoco", split="dev"))
    bad = [dict(refs[0], ann_id=999999)] + refs[1:]
    (folder / "refs(unc).json").write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match="ann_id 999999 is not in instances.json"):
        list(read_queries(str(folder), format="refcoco"))
    lenient = list(read_queries(str(folder), format="refcoco", strict=False))
    assert lenient[0].meta["error_stage"] == "read" and "999999" in lenient[0].meta["error"]
    (folder / "refs(google).json").write_text("[]")
    with pytest.raises(DatasetError, match="name one RefCOCO refs file"):
        list(read_queries(str(folder), format="refcoco"))
    assert list(read_queries(str(folder / "refs(google).json"), format="refcoco")) == []
