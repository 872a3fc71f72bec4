"""Heat maps from a VLM's attention: question tokens -> image tokens, aggregated over heads and layers, on the
image-token grid (mapped back to original pixels by ``HeatMap``).

What differs between model families (where the image tokens sit and what grid they form, where the question is)
comes from the registry in ``models.families``. Two ways to get the weights, equal within float rounding:

- ``sdpa`` (default): the model runs with its fast attention everywhere; at the chosen layers only, the weights of
  the question rows are recomputed from that layer's own queries and keys (rotary embedding and norms already
  applied, as the model's attention function receives them): (heads, question tokens, sequence) per sample, never
  the full (heads, sequence, sequence) matrix of every layer.
- ``eager``: every layer computes its full weights (the reference); forward hooks on the chosen layers read them.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .. import get_logger
from ..config import AttentionConfig
from ..models.families import VLMFamily, family_of
from .prompts import HeatMap, smooth

log = get_logger(__name__)

# The attention implementation the discovery MLLM is loaded with for the sdpa path: PyTorch's SDPA for every layer,
# plus the question-row weights at the layers a ``_Probe`` asks for.
CAPTURE_ATTENTION = "rea2seg_sdpa_capture"
_PROBE: contextvars.ContextVar[_Probe | None] = contextvars.ContextVar(
    "rea2seg_attention_probe", default=None
)


@dataclass
class Spans:
    """Token positions of one sample: image tokens (row-major over the merged grid) and query tokens."""

    image: np.ndarray  # (gh * gw,) positions
    grid: tuple[int, int]  # (gh, gw)
    question: np.ndarray  # positions of the question text


class _Probe:
    """Collects, at the chosen attention modules, each sample's question-row -> image-column weights, reduced over
    heads and question rows: one (image tokens,) float32 vector per sample and layer."""

    def __init__(self, modules, rows: list[torch.Tensor], cols: list[torch.Tensor], head_reduce: str):
        self.modules = {id(m) for m in modules}
        self.rows, self.cols, self.head_reduce = rows, cols, head_reduce
        self.per_layer: list[list[torch.Tensor]] = [[] for _ in rows]

    def record(self, module, query: torch.Tensor, key: torch.Tensor, mask, scaling: float | None) -> None:
        """query: (B, H, L, d); key: (B, H_kv, L, d) after rotary; mask: None (causal), bool (B, 1, L, L) with True
        where attention is allowed, or additive float (B, 1, L, L)."""
        groups = query.shape[1] // key.shape[1]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        for b, (rows, cols) in enumerate(zip(self.rows, self.cols, strict=True)):
            q = query[b].index_select(1, rows).float()  # (H, r, d)
            k = key[b].float().repeat_interleave(groups, dim=0)  # (H, L, d): grouped-query heads share keys
            logits = torch.matmul(q, k.transpose(1, 2)) * scale  # (H, r, L)
            if mask is None:
                allowed = torch.arange(k.shape[1], device=q.device)[None, :] <= rows[:, None]
                logits = logits.masked_fill(~allowed, float("-inf"))
            elif mask.dtype == torch.bool:
                logits = logits.masked_fill(~mask[b, :, rows], float("-inf"))
            else:
                logits = logits + mask[b, :, rows].float()
            weights = torch.softmax(logits, dim=-1)
            heads = _reduce(weights, self.head_reduce, dim=0)  # (r, L)
            self.per_layer[b].append(heads.index_select(1, cols).mean(dim=0))


def _capture_attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """PyTorch SDPA, plus the probe's weights when this module is one it watches (transformers calls every
    attention layer's implementation through this signature: query/key/value (B, H, L, d))."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    probe = _PROBE.get()
    if probe is not None and id(module) in probe.modules:
        probe.record(module, query, key, attention_mask, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def register_capture_attention() -> str:
    """Make ``CAPTURE_ATTENTION`` a transformers attention implementation (with SDPA's masks); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(CAPTURE_ATTENTION, _capture_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_ATTENTION, sdpa_mask)
    return CAPTURE_ATTENTION


class VLMAdapter:
    """A loaded VLM seen through its family's registry entry: prompts, encoding, token spans, decoder layers."""

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.family: VLMFamily = family_of(getattr(model.config, "model_type", ""))
        tok = processor.tokenizer
        self.image_id, self.after_image_ids, self.turn_end_id = self.family.token_ids(tok)
        tok.padding_side = "left"  # batched generation needs left padding; positions are found per row anyway

    def prompt(self, text, suffix: str = "") -> str:
        """The chat prompt for a question (str) or a dialogue ([{role, content}], roles kept): the image opens the
        first user turn, ``suffix`` (e.g. the text-box request) closes the last."""
        from ..scoring.prompts import dialogue_messages

        last = "{question}" + suffix.replace("{", "{{").replace("}", "}}")
        messages = dialogue_messages(text, [{"type": "image"}], last, [])
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def encode(self, images: list[Image.Image], prompts: list[str]) -> dict:
        return self.processor(text=prompts, images=images, return_tensors="pt", padding=True)

    def decoder_layers(self) -> list[torch.nn.Module]:
        lm = getattr(self.model.model, "language_model", None) or self.model.get_decoder()
        return list(lm.layers)

    def spans(self, inputs: dict) -> list[Spans]:
        out = []
        ids_all = inputs["input_ids"]
        for b in range(ids_all.shape[0]):
            ids = ids_all[b].cpu()
            img_pos = np.nonzero(ids.numpy() == self.image_id)[0]
            gh, gw, offset = self.family.grid(inputs, b, self.model.config, len(img_pos))
            if offset < 0 or len(img_pos) < offset + gh * gw:
                raise ValueError(f"expected {offset + gh * gw} image tokens or more, found {len(img_pos)}")
            img_pos = img_pos[offset : offset + gh * gw]
            q = self.family.question_span(ids, self.image_id, self.after_image_ids, self.turn_end_id)
            out.append(Spans(image=img_pos, grid=(gh, gw), question=np.arange(q.start, q.stop)))
        return out

    def cell_pixels(self) -> int:
        return self.family.cell_pixels(self.model.config)


def _reduce(x: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    if how == "mean":
        return x.mean(dim=dim)
    if how == "max":
        return x.amax(dim=dim)
    raise ValueError(f"unknown reduction {how!r} (mean | max)")


class AttentionMapper:
    """(images, texts) -> one HeatMap per pair, batched through the VLM."""

    def __init__(self, model, processor, cfg: AttentionConfig):
        self.model = model
        self.cfg = cfg
        self.adapter = VLMAdapter(model, processor)
        layers = self.adapter.decoder_layers()
        n = len(layers)
        idx = list(range(n)) if not cfg.layers else [i % n for i in cfg.layers]
        if any(not -n <= i < n for i in (cfg.layers or [])):
            raise ValueError(f"attention.layers {list(cfg.layers)} out of range for a {n}-layer model")
        self.layer_idx = sorted(set(idx))
        self.layers = [layers[i] for i in self.layer_idx]
        # The text model's attention implementation decides how weights are read (the vision tower may differ).
        impl = getattr(getattr(model.config, "text_config", model.config), "_attn_implementation", None)
        self.fast = impl == CAPTURE_ATTENTION
        if cfg.query_tokens not in ("question", "last_n", "generated"):
            raise ValueError(
                f"attention.query_tokens must be question | last_n | generated, not {cfg.query_tokens!r}"
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _query_rows(self, spans: Spans, seq_len: int, n_generated: int) -> np.ndarray:
        if self.cfg.query_tokens == "generated" and n_generated:
            return np.arange(seq_len - n_generated, seq_len)
        q = spans.question
        if self.cfg.query_tokens == "last_n":
            q = q[-max(1, self.cfg.last_n) :]
        return q

    @torch.no_grad()
    def heat_maps(self, images: list[np.ndarray], texts: list[str]) -> list[HeatMap]:
        """images: (H, W, 3) uint8 RGB arrays; texts: the questions, or dialogues ([{role, content}]). One HeatMap
        each; the question rows are every text token after the image (a dialogue's turns, roles included)."""
        pil = [Image.fromarray(im) for im in images]
        prompts = [self.adapter.prompt(t) for t in texts]
        for p in prompts:
            log.debug("discovery prompt: %r", p)
        inputs = self.adapter.encode(pil, prompts)
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        spans = self.adapter.spans(inputs)
        n_gen = 0
        if self.cfg.query_tokens == "generated":
            gen = self.model.generate(**inputs, max_new_tokens=self.cfg.generate_tokens, do_sample=False)
            n_gen = gen.shape[1] - inputs["input_ids"].shape[1]
            if n_gen:
                pad = torch.ones(
                    (gen.shape[0], n_gen), dtype=inputs["attention_mask"].dtype, device=gen.device
                )
                inputs["attention_mask"] = torch.cat([inputs["attention_mask"], pad], dim=1)
                if "mm_token_type_ids" in inputs:
                    zeros = torch.zeros(
                        (gen.shape[0], n_gen), dtype=inputs["mm_token_type_ids"].dtype, device=gen.device
                    )
                    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], zeros], dim=1)
                inputs["input_ids"] = gen
        seq_len = inputs["input_ids"].shape[1]
        rows = [torch.as_tensor(self._query_rows(s, seq_len, n_gen), device=self.device) for s in spans]
        cols = [torch.as_tensor(s.image, device=self.device) for s in spans]
        per_layer = self._weights(inputs, rows, cols)
        maps = []
        for b, s in enumerate(spans):
            vec = _reduce(torch.stack(per_layer[b]), self.cfg.layer_reduce, dim=0).cpu().numpy()
            grid = smooth(vec.reshape(s.grid), self.cfg.smooth_sigma)
            h, w = images[b].shape[:2]
            maps.append(HeatMap(grid=grid, height=h, width=w))
        return maps

    def _weights(
        self, inputs: dict, rows: list[torch.Tensor], cols: list[torch.Tensor]
    ) -> list[list[torch.Tensor]]:
        """One forward pass -> per sample, per chosen layer, the (image tokens,) question -> image weights."""
        if self.fast:
            probe = _Probe([layer.self_attn for layer in self.layers], rows, cols, self.cfg.head_reduce)
            token = _PROBE.set(probe)
            try:
                self.model(**inputs, use_cache=False)
            finally:
                _PROBE.reset(token)
            return probe.per_layer
        per_layer: list[list[torch.Tensor]] = [[] for _ in rows]

        def hook(_module, _args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(
                    "attention weights not returned: load the model with attn_implementation='eager' or "
                    f"{CAPTURE_ATTENTION!r}"
                )
            heads = _reduce(weights.float(), self.cfg.head_reduce, dim=1)  # (B, L, L)
            for b in range(heads.shape[0]):
                per_layer[b].append(heads[b].index_select(0, rows[b]).index_select(1, cols[b]).mean(dim=0))

        handles = [layer.self_attn.register_forward_hook(hook) for layer in self.layers]
        try:
            self.model(**inputs, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return per_layer

    @torch.no_grad()
    def generate_text(
        self, images: list[np.ndarray], texts: list[str], suffix: str, max_new_tokens: int = 64
    ) -> list[str]:
        """Greedy answers (e.g. Seg-Zero-style JSON boxes) for the text_box source."""
        pil = [Image.fromarray(im) for im in images]
        inputs = self.adapter.encode(pil, [self.adapter.prompt(t, suffix) for t in texts])
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        return self.adapter.processor.batch_decode(new, skip_special_tokens=True)

    def resized_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the processor's resized image for a merged token grid."""
        cell = self.adapter.cell_pixels()
        return grid[0] * cell, grid[1] * cell
