"""The per-worker training loop: examples -> the scorer's own prompts (shared code with scoring) -> loss on the
answer token (with ``scoring.reasoning``: on the whole assistant turn, reasoning included). Plain functions
(``collate``, ``load_scorer_for_training``) are testable without Ray; the loop itself runs inside Ray Train workers.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..config import FinetuneConfig
from ..images import decode, fetch
from ..models.families import VLMFamily, family_of_dir
from ..scoring.facts import CandidateFacts
from ..scoring.prompts import candidate_messages, reasoning_with_relations, render_chat, with_final_question
from ..scoring.render import render_query

STATE_FILE = "train_state.pt"


class ImageCache:
    """Decoded images per worker, least recently used first out: each image is decoded once per worker."""

    def __init__(self, capacity: int = 512):
        self.capacity = capacity
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, uri: str) -> np.ndarray:
        if uri in self._items:
            self._items.move_to_end(uri)
            return self._items[uri]
        image, _ = decode(fetch(uri), uri)
        self._items[uri] = image
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return image


def _last_occurrence(row: list[int], sub: list[int]) -> int:
    for i in range(len(row) - len(sub), -1, -1):
        if row[i : i + len(sub)] == sub:
            return i
    raise ValueError("assistant header not found in a training row: does the chat template match the family?")


def _facts(e: dict, relations: bool) -> CandidateFacts:
    facts = CandidateFacts.from_struct(e.get("facts"))
    if facts is None:
        raise ValueError(f"example {e.get('example_id')} has no `facts`: rebuild the mask-scoring data with this "
                         "version (rea2seg make-scoring-data) to fine-tune with scoring.candidate_facts=true")  # fmt: skip
    if not relations:  # served without a naming round, the scorer never reads whose closest candidate it is
        facts.closest_to = []
    return facts


def collate(
    examples: list[dict],
    processor,
    scfg,
    input_size,
    images: ImageCache,
    answer_ids: dict[str, int],
    family: VLMFamily,
):
    """Examples -> (model inputs, labels). Each example is the exact prompt the scorer sees, followed by its
    answer; labels are -100 except at the answer token (the one position whose logits the scorer reads).

    With ``scoring.reasoning`` the prompt asks the model to think first, as the scorer does, and the assistant turn
    is the example's reasoning, the final Yes/No question and the answer; the loss covers that whole turn, so the
    model learns to write the reasoning it will be served with and to answer after it."""
    texts, pics = [], []
    for e in examples:
        img = images.get(e["image_uri"])
        size = input_size(*img.shape[:2]) if input_size else None
        base, (cand,) = render_query(
            img,
            [e["mask"]],
            scfg.render,
            scfg.image_max_side or 448,
            scfg.overlay_style,
            scfg.crop_margin,
            size,
        )
        facts = _facts(e, scfg.facts_relations) if scfg.candidate_facts else None
        msgs = candidate_messages(
            e.get("conversation") or e["question"],
            scfg.render,
            "yesno",
            scfg.reasoning,
            scfg.overlay_style,
            scfg.show_original,
            facts,
        )
        reasoning = e.get("reasoning") or ""
        if facts is not None:  # closest_to is non-empty only with scoring.facts_relations
            reasoning = reasoning_with_relations(reasoning, facts)
        turn = with_final_question(reasoning) if scfg.reasoning else ""
        texts.append(render_chat(processor, msgs, answer=turn + e["label"]))
        pics += [base, cand] if scfg.show_original else [cand]
    inputs = processor(text=texts, images=pics, return_tensors="pt", padding=True)
    ids = inputs["input_ids"]
    # Left padding: every row ends "<answer>" + the family's turn end (e.g. "<|im_end|>\n"), so the answer sits at
    # the same offset from the end.
    suffix = len(processor.tokenizer.encode(family.turn_end + family.turn_sep, add_special_tokens=False))
    pos = ids.shape[1] - 1 - suffix
    labels = torch.full_like(ids, -100)
    want = torch.tensor([answer_ids[e["label"]] for e in examples])
    if not torch.equal(ids[:, pos], want):
        raise ValueError("answer token not where expected: is the tokenizer padding on the left?")
    labels[:, pos] = want
    if scfg.reasoning:
        # The assistant turn starts after the family's last assistant header (left padding keeps it per row).
        header = processor.tokenizer.encode(family.assistant_header, add_special_tokens=False)
        for i, row in enumerate(ids.tolist()):
            h = _last_occurrence(row, header)
            labels[i, h + len(header) : pos] = ids[i, h + len(header) : pos]
    return dict(inputs), labels


def training_loss(
    logits: torch.Tensor, labels: torch.Tensor, answer_weight: float = 1.0
) -> tuple[torch.Tensor, float]:
    """-> (loss to minimise, the Yes/No token's own cross-entropy; ln 2 = 0.693 is a constant guess).

    The answer is the last labelled position of every row (the same column for all, see ``collate``). Without
    reasoning the loss is the answer's cross-entropy. With reasoning it is the reasoning tokens' mean plus
    ``answer_weight`` x the answer's: in one mean over the turn the answer would be one token in ~25 and its
    gradient would drown in the reasoning's."""
    labels = labels.to(logits.device)
    pos = int((labels[0] != -100).nonzero()[-1, 0])
    answer = torch.nn.functional.cross_entropy(logits[:, pos - 1].float(), labels[:, pos])
    turn = labels[:, 1:pos]  # the reasoning tokens, each predicted from the position before it
    if not bool((turn != -100).any()):
        return answer, float(answer.detach())
    reasoning = torch.nn.functional.cross_entropy(
        logits[:, : pos - 1].flatten(0, 1).float(), turn.flatten(), ignore_index=-100
    )
    return reasoning + answer_weight * answer, float(answer.detach())


def load_scorer_for_training(model_path: str, cfg: FinetuneConfig, device: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..models.loading import default_dtype

    processor = AutoProcessor.from_pretrained(model_path)
    processor.tokenizer.padding_side = "left"
    dtype = default_dtype(device)
    if cfg.train.reinit:
        from transformers import AutoConfig

        mcfg = AutoConfig.from_pretrained(model_path)
        mcfg.initializer_range = cfg.train.init_range
        for sub in ("text_config", "vision_config"):
            if hasattr(mcfg, sub):
                getattr(mcfg, sub).initializer_range = cfg.train.init_range
        torch.manual_seed(cfg.train.seed)
        model = AutoModelForImageTextToText.from_config(mcfg, dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            model_path, dtype=dtype, attn_implementation="sdpa"
        )
    if cfg.train.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.train.lora_rank,
                lora_alpha=cfg.train.lora_alpha,
                target_modules=list(cfg.train.lora_targets),
                lora_dropout=0.0,
            ),
        )
    return model.to(device), processor


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


def answer_token_ids(tok, scfg) -> dict[str, int]:
    """Label -> the token the scorer reads for it (``scoring.yes_token`` / ``no_token``, one token each)."""
    from ..scoring.scorer import single_token_id

    return {"Yes": single_token_id(tok, scfg.yes_token), "No": single_token_id(tok, scfg.no_token)}


def load_trainable_state(model, state: dict, lora: bool) -> None:
    """Put a ``_trainable_state`` back: the LoRA adapters, or the whole model."""
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
    else:
        model.load_state_dict(state)


def _trainable_state(model, lora: bool) -> dict:
    inner = model.module if hasattr(model, "module") else model
    if lora:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(inner)
    return inner.state_dict()


def _out_of_time(started: float, max_minutes: float, device: str = "cpu") -> bool:
    """True on every worker once any worker has used up the budget (a max all-reduce), so all stop together."""
    if max_minutes <= 0:
        return False
    over = torch.tensor([1.0 if time.monotonic() - started > 60 * max_minutes else 0.0], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(over, op=torch.distributed.ReduceOp.MAX)
    return bool(over.item())


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: config = {"cfg": FinetuneConfig as dict, "model_path": local path}."""
    import ray.train
    import ray.train.torch
    from omegaconf import OmegaConf

    from ..scoring.scorer import model_input_size_fn

    cfg: FinetuneConfig = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(FinetuneConfig), config["cfg"])
    )
    tc = cfg.train
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(tc.seed + rank)
    device = str(ray.train.torch.get_device())
    model, processor = load_scorer_for_training(config["model_path"], cfg, device)
    answer_ids = answer_token_ids(processor.tokenizer, cfg.scoring)
    family = family_of_dir(config["model_path"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, tc.warmup_steps, tc.max_steps))
    step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        load_trainable_state(model, state["model"], tc.lora)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
    start_step = step  # reported with every metric: a resumed run shows where it picked up
    model = ray.train.torch.prepare_model(model)
    input_size = model_input_size_fn(config["model_path"]) if cfg.scoring.image_max_side <= 0 else None
    images = ImageCache(capacity=4096)
    shard = ray.train.get_dataset_shard("train")
    model.train()
    losses: list[float] = []
    # The Yes/No token's own loss (what the score reads); with reasoning it is one part of `losses`.
    answer_losses: list[float] = []
    upload = (
        ray.train.CheckpointUploadMode.ASYNC
        if device.startswith("cuda")
        else ray.train.CheckpointUploadMode.SYNC
    )
    micro = 0
    last = False
    started = time.monotonic()
    while step < tc.max_steps:
        seen = 0
        for batch in shard.iter_batches(
            batch_size=tc.batch_size,
            batch_format="pyarrow",
            local_shuffle_buffer_size=256,
            local_shuffle_seed=tc.seed + step,
        ):
            seen += 1
            inputs, labels = collate(
                batch.to_pylist(), processor, cfg.scoring, input_size, images, answer_ids, family
            )
            inputs = {k: v.to(device) for k, v in inputs.items()}
            loss, answer = training_loss(model(**inputs).logits, labels, tc.answer_weight)
            (loss / tc.grad_accum).backward()
            losses.append(float(loss.detach()))
            answer_losses.append(answer)
            micro += 1
            if micro % tc.grad_accum:
                continue
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            last = step >= tc.max_steps or _out_of_time(started, tc.max_minutes, device)
            if step % tc.log_every == 0 or step % tc.checkpoint_every == 0 or last:
                metrics = {
                    "step": step,
                    "start_step": start_step,
                    "lr": sched.get_last_lr()[0],
                    "loss": float(np.mean(losses)) if losses else float("nan"),
                    "answer_loss": float(np.mean(answer_losses)) if answer_losses else float("nan"),
                }
                losses, answer_losses = [], []
                if step % tc.checkpoint_every == 0 or last:
                    with tempfile.TemporaryDirectory() as d:
                        if rank == 0:
                            torch.save(
                                {
                                    "model": _trainable_state(model, tc.lora),
                                    "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(),
                                    "step": step,
                                },
                                os.path.join(d, STATE_FILE),
                            )
                        ckpt_out = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
                        ray.train.report(metrics, checkpoint=ckpt_out, checkpoint_upload_mode=upload)
                else:
                    ray.train.report(metrics)
            if last:
                break
        if seen == 0:
            raise ValueError("the training data is empty on this worker")
        if last:
            break
