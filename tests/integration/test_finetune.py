"""Scorer fine-tuning on Ray Train with the tiny scorer and 2 CPU workers (gloo): mask-scoring data from scenes,
checkpoints in an S3 bucket on 127.0.0.1, resume from the last step, export that vLLM loads and scores with."""

import copy
import json
import os
import re
import signal
import threading
import time

import boto3
import numpy as np
import pytest
import torch
from PIL import Image

from rea2seg_ray.config import FinetuneConfig, MakeScoringDataConfig, ModelsConfig, ScoringConfig, load_config
from rea2seg_ray.datasets import read_queries
from rea2seg_ray.models.families import family_of_dir
from rea2seg_ray.models.loading import resolve_model
from rea2seg_ray.records import Candidate
from rea2seg_ray.scoring.scorer import Scorer, model_input_size_fn
from rea2seg_ray.train.data import build_scoring_data
from rea2seg_ray.train.loop import ImageCache, answer_token_ids, collate, load_scorer_for_training

from ..conftest import run_cli

pytestmark = pytest.mark.slow


def finetune_args(data, out: str, address: str) -> list[str]:
    return [
        f"data={data}",
        f"output={out}",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.batch_size=4",
        "train.checkpoint_every=4",
        "train.log_every=2",
        "train.lr=2e-3",
        "ray.progress_bars=false",
        f"ray.address={address}",
    ]


@pytest.fixture(scope="module")
def s3_run(ray_driver, scoring_data, s3_server):
    """`rea2seg finetune` to step 8, checkpoints in an S3 bucket, undisturbed: the run the S3 test resumes and the
    killed-worker test compares with. {bucket, out, common (its overrides but max_steps), stdout, loss}."""
    root, _, _ = scoring_data
    bucket = f"finetune-{int(time.time() * 1000) % 100000}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    out = f"s3://{bucket}/scorer-runs/r1"
    common = finetune_args(root / "data", out, ray_driver["address"])
    # Through the console script, with the overrides the issue names.
    r = run_cli("finetune", *common, "train.max_steps=8", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    loss = float(re.search(r"trained to step 8 \(loss ([\d.]+)", r.stdout).group(1))
    return {"bucket": bucket, "out": out, "common": common, "stdout": r.stdout, "loss": loss}


def test_make_scoring_data_labels_and_balances(scoring_data):
    import pyarrow.dataset as pads

    root, _, counts = scoring_data
    assert counts["queries"] == counts["queries_with_examples"] == 16
    assert (
        counts["yes"] == 16 and counts["no"] == 16
    )  # each scene's target, one hardest negative per positive
    rows = pads.dataset(str(root / "data"), format="parquet").to_table().to_pylist()
    for r in rows:
        assert (r["label"] == "Yes") == (r["iou"] >= 0.7) and (r["iou"] >= 0.7 or r["iou"] <= 0.3)
        # The scenes name their target and describe their shapes: each example says what the question asks for, then
        # what its candidate is; the two names agree exactly for the target.
        m = re.fullmatch(
            r"The question asks for the (\w+ \w+)\. The highlighted region is the (\w+ \w+)\.", r["reasoning"]
        )
        assert m and m.group(1) in r["question"] and (m.group(1) == m.group(2)) == (r["label"] == "Yes"), r
    with pytest.raises(FileExistsError):
        build_scoring_data(
            load_config(
                MakeScoringDataConfig,
                None,
                [
                    f"input={root / 'scenes' / 'scenes.jsonl'}",
                    f"output={root / 'data'}",
                    "discovery.sources=[given]",
                ],
            )
        )


def _loss(model, processor, rows, cfg):
    ids = answer_token_ids(processor.tokenizer, cfg.scoring)
    path = resolve_model("tiny-qwen2-vl-scorer")
    inputs, labels = collate(
        rows, processor, cfg.scoring, model_input_size_fn(path), ImageCache(), ids, family_of_dir(path)
    )
    with torch.no_grad():
        return float(model(**inputs, labels=labels).loss)


def test_finetune_checkpoints_to_s3_resumes_and_exports_for_vllm(ray_driver, scoring_data, s3_run):
    import pyarrow.dataset as pads

    root, manifest, _ = scoring_data
    out, common, s3_bucket = s3_run["out"], s3_run["common"], s3_run["bucket"]
    assert "trained to step 8" in s3_run["stdout"] and f"models.scorer={out}/export" in s3_run["stdout"]
    keys = [
        o["Key"]
        for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="scorer-runs/r1/")["Contents"]
    ]
    assert any(
        k.startswith("scorer-runs/r1/checkpoints/scorer/checkpoint_") and k.endswith("train_state.pt")
        for k in keys
    )
    assert any(k == "scorer-runs/r1/export/model.safetensors" for k in keys)

    # Same name again with more steps: picks up at step 8, not 0.
    from rea2seg_ray.train.trainer import run_finetune

    cfg = load_config(FinetuneConfig, None, [*common, "train.max_steps=12"])
    res = run_finetune(cfg)
    assert res["start_step"] == 8 and res["step"] == 12

    # Loss went down: the exported model fits the training examples better than the base model.
    rows = pads.dataset(str(root / "data"), format="parquet").to_table().to_pylist()[:12]
    export_dir = root / "export-local"
    from rea2seg_ray import storage

    storage.download_tree(f"{out}/export", export_dir)
    base, proc = load_scorer_for_training(str(resolve_model("tiny-qwen2-vl-scorer")), cfg, "cpu")
    from transformers import AutoModelForImageTextToText

    tuned = AutoModelForImageTextToText.from_pretrained(export_dir)
    proc.tokenizer.padding_side = "left"
    assert _loss(tuned, proc, rows, cfg) < _loss(base, proc, rows, cfg)
    assert json.loads((export_dir / "rea2seg_export.json").read_text())["step"] == 12

    # vLLM loads the export unchanged, and it scores differently from the base scorer.
    qs = list(read_queries(str(manifest)))[:3]
    images = [np.asarray(Image.open(q.image).convert("RGB")) for q in qs]
    cands = [[Candidate(mask=m, bbox=[0, 0, 0, 0], area=1) for m in q.candidates] for q in qs]
    tuned_scores = Scorer(ScoringConfig(backend="vllm"), ModelsConfig(scorer=str(export_dir))).score(
        qs, images, copy.deepcopy(cands)
    )
    base_scores = Scorer(ScoringConfig(backend="hf"), ModelsConfig()).score(qs, images, copy.deepcopy(cands))
    t = sorted(c.score for r in tuned_scores for c in r)
    b = sorted(c.score for r in base_scores for c in r)
    assert all(0 <= v <= 1 for v in t) and max(abs(x - y) for x, y in zip(t, b, strict=True)) > 1e-3


def test_a_killed_training_worker_restores_from_the_last_checkpoint(ray_driver, s3_run, s3_server, s3_faults,
                                                                    monkeypatch):  # fmt: skip
    """The same run as ``s3_run``, its checkpoints uploaded through the fault proxy (5% of S3 requests fail, and the
    first try of every checkpoint upload), and one
    Ray Train worker SIGKILLed mid-epoch once the first checkpoint (step 4) is registered: FailureConfig restarts the
    workers from that checkpoint, and the run ends at the same step as the undisturbed one, with a loss close to its."""
    from ray.util.state import list_actors

    from rea2seg_ray.train.trainer import run_finetune

    out = f"s3://{s3_run['bucket']}/scorer-runs/killed"
    args = [f"output={out}" if a.startswith("output=") else a for a in s3_run["common"]]
    s3_faults.configure(
        rate=0.05, delay_s=0.2, once=rf"^(PUT|POST) /{s3_run['bucket']}/scorer-runs/killed/checkpoints/"
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_faults.endpoint)
    cfg = load_config(FinetuneConfig, None, [*args, "train.max_steps=8"])
    result: dict = {}

    def train() -> None:
        try:
            result["res"] = run_finetune(cfg)
        except Exception as e:  # noqa: BLE001 - reported by the assertions below
            result["error"] = e

    th = threading.Thread(target=train)
    th.start()
    s3 = boto3.client(
        "s3", endpoint_url=s3_server
    )  # straight to the server: the test's own look is never faulted
    killed = None
    deadline = time.time() + 600
    while th.is_alive() and killed is None and time.time() < deadline:
        listing = s3.list_objects_v2(Bucket=s3_run["bucket"], Prefix="scorer-runs/killed/checkpoints/")
        # Registered, not only uploaded: Ray Train lists a checkpoint in its snapshot once the report is done.
        if any(o["Key"].endswith("checkpoint_manager_snapshot.json") for o in listing.get("Contents", [])):
            workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
                       if "RayTrainWorker" in (a.class_name or "") and a.pid]  # fmt: skip
            if workers:
                killed = workers[-1]
                os.kill(killed.pid, signal.SIGKILL)
        time.sleep(0.1)
    th.join(timeout=600)
    assert killed is not None, "no training worker was seen alive after the first checkpoint"
    assert "error" not in result, result.get("error")
    res = result["res"]
    # Restored from the checkpoint at step 4 (not from 0, not after the end), and finished the 8 steps.
    assert res["start_step"] == 4 and res["step"] == 8, res
    assert abs(res["loss"] - s3_run["loss"]) <= 0.25 * s3_run["loss"], (res["loss"], s3_run["loss"])
    # Every checkpoint upload request met a fault on its first try.
    once = s3_faults.stats()["once"]
    assert any("checkpoints/" in k and "/train_state.pt" in k for k in once), once  # PUT or multipart part


def test_reasoning_scorer_trains_and_serves_in_the_same_format(ray_driver, scoring_data, tmp_path):
    """scoring.reasoning=true end to end: finetune prints the override to serve with; vLLM, serving the export in
    that mode, writes the kind of reasoning it was trained on and stops where the final question begins."""
    root, manifest, _ = scoring_data
    out = tmp_path / "reasoning-run"
    r = run_cli(
        "finetune", f"data={root / 'data'}", f"output={out}", "scoring.reasoning=true", "scoring.show_original=false",
        "train.num_workers=2", "train.cpus_per_worker=0.5", "train.batch_size=4", "train.max_steps=60",
        "train.lr=5e-3", "train.warmup_steps=5", "train.checkpoint_every=60", "ray.progress_bars=false",
        f"ray.address={ray_driver['address']}", timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    serve = f"models.scorer={out / 'export'} scoring.show_original=false scoring.reasoning=true"
    assert serve in r.stdout, r.stdout
    qs = list(read_queries(str(manifest)))[:3]
    images = [np.asarray(Image.open(q.image).convert("RGB")) for q in qs]
    cands = [[Candidate(mask=m, bbox=[0, 0, 0, 0], area=1) for m in q.candidates] for q in qs]
    scfg = ScoringConfig(reasoning=True, show_original=False, max_reasoning_tokens=24)
    scored = Scorer(scfg, ModelsConfig(scorer=str(out / "export"))).score(qs, images, cands)
    for c in (c for res in scored for c in res):
        assert (
            c.reasoning.startswith("The question asks for the ") and "Answer Yes or No" not in c.reasoning
        ), c.reasoning
        assert 0.0 <= c.score <= 1.0
