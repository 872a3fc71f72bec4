"""Ray Train (V2) fine-tuning of the scorer and export of a merged HF folder that vLLM loads unchanged.

Checkpoints go to ``<output>/checkpoints/<name>`` (local or s3://); rerunning with the same name resumes from the
latest one; ``FailureConfig`` retries a failed worker.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from .. import storage
from ..config import FinetuneConfig
from ..models.families import save_vlm
from .loop import STATE_FILE, load_scorer_for_training, load_trainable_state, train_loop_per_worker


def _run_config(cfg: FinetuneConfig):
    import ray.train

    fs, path = storage.filesystem(storage.join(cfg.output, "checkpoints"))
    if not storage.is_remote(cfg.output):
        fs.create_dir(path, recursive=True)
    return ray.train.RunConfig(
        name=cfg.name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
    )


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Train, then export. Returns {"checkpoint": URI, "export": path, "step": n, "loss": last loss}."""
    import ray
    import ray.data
    from omegaconf import OmegaConf
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..models.loading import resolve_model
    from ..runtime import init_ray

    init_ray(cfg.ray)
    model_path = str(resolve_model(cfg.models.scorer, cfg.models.cache_dir or None, cfg.models.allow_hub))
    fs, data_path = storage.filesystem(cfg.data)
    ds = ray.data.read_parquet(data_path, filesystem=fs)
    tc = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": OmegaConf.to_container(OmegaConf.structured(cfg)), "model_path": model_path},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}),
        run_config=_run_config(cfg),
        datasets={"train": ds},
    )  # fmt: skip
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint: {result.error}")
    export_dir = storage.join(cfg.output, "export")
    export(cfg, model_path, result.checkpoint, export_dir)
    metrics = result.metrics or {}
    return {
        "checkpoint": result.checkpoint.path,
        "export": export_dir,
        "serve_with": serving_overrides(cfg),
        "step": metrics.get("step"),
        "start_step": metrics.get("start_step"),
        "loss": metrics.get("loss"),
        "answer_loss": metrics.get("answer_loss"),
    }


def serving_overrides(cfg: FinetuneConfig) -> dict:
    """The prompt settings the scorer was trained with that differ from ``rea2seg segment``'s defaults: serve it
    with the same ones."""
    from dataclasses import asdict

    from ..config import ScoringConfig

    keys = ("render", "overlay_style", "show_original", "reasoning", "candidate_facts", "facts_relations", "image_max_side", "crop_margin",
            "yes_token", "no_token")  # fmt: skip
    base, used = asdict(ScoringConfig()), asdict(cfg.scoring)
    return {k: used[k] for k in keys if used[k] != base[k]}


def export(cfg: FinetuneConfig, model_path: str, checkpoint, dest: str) -> str:
    """Load the base scorer, apply the checkpoint (merging LoRA), and save a standalone HF folder (safetensors,
    processor, tokenizer, chat template) at ``dest`` (local or s3://)."""
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    model, processor = load_scorer_for_training(model_path, cfg, "cpu")
    load_trainable_state(model, state["model"], cfg.train.lora)
    if cfg.train.lora:
        model = model.merge_and_unload()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        save_vlm(model.eval(), out)  # weight names as the family's hub checkpoints have them: vLLM loads them
        processor.tokenizer.padding_side = "left"
        processor.save_pretrained(out)
        gen = Path(model_path) / "generation_config.json"
        if gen.exists():
            shutil.copy(gen, out / "generation_config.json")
        (out / "rea2seg_export.json").write_text(
            json.dumps({"base": cfg.models.scorer, "step": int(state["step"]), "lora": cfg.train.lora,
                        "scoring": serving_overrides(cfg)})
        )  # fmt: skip
        if storage.is_remote(dest):
            for f in sorted(out.iterdir()):
                storage.write_bytes(storage.join(dest, f.name), f.read_bytes())
        else:
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            if Path(dest).exists():
                shutil.rmtree(dest)
            shutil.copytree(out, dest)
    return dest
