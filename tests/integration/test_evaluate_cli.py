"""`rea2seg evaluate` end to end through the console script: ground-truth copies score 1.0, failures score 0."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rea2seg_ray.datasets import load_ground_truth, read_queries
from rea2seg_ray.masks import encode_rle, mask_bbox
from rea2seg_ray.records import Candidate, Prediction, predictions_table

from ..conftest import REASONSEG_SAMPLES, upload_tree
from ..gallery_check import check_gallery

RUN = [sys.executable, "-m", "rea2seg_ray.cli"]


def gt_copy_predictions(dataset: str, fail: set[str] = frozenset(), texts: str = "first") -> list[Prediction]:
    preds = []
    for q in read_queries(dataset, texts=texts):
        if q.query_id in fail:
            preds.append(Prediction.failed(q, "discover", "synthetic failure"))
            continue
        gt = load_ground_truth(q) == 1
        wrong = np.zeros_like(gt)
        cands = [
            Candidate(
                mask=encode_rle(gt), bbox=mask_bbox(gt), area=int(gt.sum()), rank=0, score=0.9, source="gt"
            ),
            Candidate(
                mask=encode_rle(wrong), bbox=mask_bbox(wrong), area=0, rank=1, score=0.1, source="empty"
            ),
        ]
        preds.append(
            Prediction(
                query_id=q.query_id,
                image_uri=q.image,
                question=q.question,
                category=q.category,
                height=gt.shape[0],
                width=gt.shape[1],
                mask=cands[0].mask,
                score=0.9,
                candidates=cands,
            )
        )
    return preds


def _run(*args):
    r = subprocess.run([*RUN, "evaluate", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


def test_ground_truth_copy_scores_one_on_reasonseg_folder(tmp_path):
    folder = tmp_path / "reasonseg"
    folder.mkdir()
    shutil.copy(REASONSEG_SAMPLES / "scene0104_00_0.json", folder)
    Image.new("RGB", (320, 240)).save(folder / "scene0104_00_0.jpg")
    pq.write_table(predictions_table(gt_copy_predictions(str(folder))), tmp_path / "preds.parquet")
    r = _run(f"predictions={tmp_path / 'preds.parquet'}", f"dataset={folder}", f"output={tmp_path / 'ev'}")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n"] == 1 and m["n_error"] == 0
    for level in ("top1", "top3", "oracle"):
        assert m[level] == {"giou": 1.0, "ciou": 1.0}
    assert m["by_category"]["long"]["top1"] == {"giou": 1.0, "ciou": 1.0}
    assert "| Rea2Seg (top-1) | 100.0 | 100.0 | 100.0 | 100.0 |" in r.stdout


def test_scenes_per_category_and_failed_rows_count_zero(tmp_path, scenes_dir):
    qids = [q.query_id for q in read_queries(str(scenes_dir))]
    failed = set(qids[:3])  # categories are round-robin: one each of discriminative, geometric, spatial
    preds = gt_copy_predictions(str(scenes_dir), fail=failed)
    out = tmp_path / "preds"
    out.mkdir()
    # A folder of Parquet parts, as a Ray Data job writes it.
    pq.write_table(predictions_table(preds[:6]), out / "part-0.parquet")
    pq.write_table(predictions_table(preds[6:]), out / "part-1.parquet")
    _run(f"predictions={out}", f"dataset={scenes_dir / 'scenes.jsonl'}", f"output={tmp_path / 'ev'}", "k=2")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n"] == 12 and m["n_error"] == 3
    assert m["top1"]["giou"] == pytest.approx(9 / 12)
    assert set(m) == {"n", "n_error", "top1", "top2", "oracle", "instances", "pixels", "by_category"}
    assert m["instances"] == {"precision": 1.0, "recall": 0.75, "matched": 9, "selected": 9, "instances": 12}
    cats = m["by_category"]
    assert cats["multi-step"]["top1"] == {"giou": 1.0, "ciou": 1.0}
    assert cats["discriminative"]["top1"]["giou"] == pytest.approx(2 / 3)
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "discriminative gIoU" in report and "3 failed or missing" in report
    per_query = [json.loads(line) for line in (tmp_path / "ev" / "per_query.jsonl").read_text().splitlines()]
    assert sum(not r["ok"] for r in per_query) == 3
    assert "![gIoU by category" in report and (tmp_path / "ev" / "plots" / "iou_histogram.png").exists()
    data = check_gallery(tmp_path / "ev" / "gallery" / "index.html", tmp_path / "ev" / "per_query.jsonl")
    errors = [i for i in data["items"] if i["status"] == "error"]
    assert sorted(i["id"] for i in errors) == sorted(failed)
    assert all(
        i["error"] == "synthetic failure" and i["error_stage"] == "discover" and i["image"] for i in errors
    )


def test_missing_predictions_count_as_failures(tmp_path, scenes_dir):
    preds = gt_copy_predictions(str(scenes_dir))[:4]
    pq.write_table(predictions_table(preds), tmp_path / "p.parquet")
    _run(f"predictions={tmp_path / 'p.parquet'}", f"dataset={scenes_dir}", f"output={tmp_path / 'ev'}")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n"] == 12 and m["n_error"] == 8 and m["top1"]["giou"] == pytest.approx(4 / 12)


def test_evaluate_on_s3(tmp_path, scenes_dir, s3_bucket):
    upload_tree(scenes_dir, s3_bucket, "data/scenes")
    preds = gt_copy_predictions(str(scenes_dir))
    pq.write_table(predictions_table(preds), tmp_path / "p.parquet")
    upload_tree(tmp_path, s3_bucket, "runs/r1")
    b = f"s3://{s3_bucket}"
    for dataset in (f"{b}/data/scenes/scenes.jsonl", f"{b}/data/scenes"):
        _run(f"predictions={b}/runs/r1/p.parquet", f"dataset={dataset}", f"output={b}/eval")
        import boto3

        body = boto3.client("s3").get_object(Bucket=s3_bucket, Key="eval/metrics.json")["Body"].read()
        assert json.loads(body)["top1"] == {"giou": 1.0, "ciou": 1.0}


def test_cli_errors_are_clear(tmp_path, scenes_dir):
    r = subprocess.run(
        [*RUN, "evaluate", "predictions=x", "dataset=y", "output=z", "topk=3"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "unknown config key 'topk'" in r.stderr
    r = subprocess.run(
        [
            *RUN,
            "evaluate",
            f"predictions={tmp_path / 'nope.parquet'}",
            f"dataset={scenes_dir}",
            f"output={tmp_path}",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "predictions not found" in r.stderr and "nope.parquet" in r.stderr


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "rea2seg"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "evaluate" in r.stdout and "build-tiny-models" in r.stdout
