"""Heat maps from a VLM's attention: question tokens -> image tokens, aggregated over heads and layers, on the
image-token grid (mapped back to original pixels by ``HeatMap``).

The model-specific part is small (``VLMAdapter``): how to build the prompt, where the image tokens sit and what
grid they form, and where the decoder layers are. Qwen2-VL and Qwen2.5-VL share it; other families add an adapter.
Attention weights are captured by forward hooks on the chosen layers only and reduced at once, so memory stays
at one layer's worth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..config import AttentionConfig
from .prompts import HeatMap, smooth


@dataclass
class Spans:
    """Token positions of one sample: image tokens (row-major over the merged grid) and query tokens."""

    image: np.ndarray  # (gh * gw,) positions
    grid: tuple[int, int]  # (gh, gw)
    question: np.ndarray  # positions of the question text


class QwenVLAdapter:
    """Qwen2-VL / Qwen2.5-VL: image tokens are contiguous ``<|image_pad|>`` runs, row-major over the grid after a
    ``spatial_merge_size`` x ``spatial_merge_size`` merge of ``image_grid_thw``."""

    model_types = ("qwen2_vl", "qwen2_5_vl")

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        cfg = model.config
        self.image_token_id = cfg.image_token_id
        self.vision_end_id = cfg.vision_end_token_id
        self.merge = int(getattr(cfg.vision_config, "spatial_merge_size", 2))
        tok = processor.tokenizer
        self.im_end_id = tok.convert_tokens_to_ids("<|im_end|>")
        tok.padding_side = "left"  # batched generation needs left padding; positions are found per row anyway

    def prompt(self, text: str, suffix: str = "") -> str:
        content = [{"type": "image"}, {"type": "text", "text": text + suffix}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )

    def encode(self, images: list[Image.Image], prompts: list[str]) -> dict:
        return self.processor(text=prompts, images=images, return_tensors="pt", padding=True)

    def decoder_layers(self) -> list[torch.nn.Module]:
        lm = getattr(self.model.model, "language_model", None) or self.model.get_decoder()
        return list(lm.layers)

    def spans(self, input_ids: torch.Tensor, grid_thw: torch.Tensor) -> list[Spans]:
        out = []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b].cpu().numpy()
            img_pos = np.nonzero(ids == self.image_token_id)[0]
            t, h, w = (int(v) for v in grid_thw[b])
            gh, gw = h // self.merge, w // self.merge
            if len(img_pos) != t * gh * gw:
                raise ValueError(f"expected {t * gh * gw} image tokens, found {len(img_pos)}")
            start = int(np.nonzero(ids == self.vision_end_id)[0][0]) + 1
            ends = np.nonzero(ids[start:] == self.im_end_id)[0]
            end = start + int(ends[0]) if len(ends) else len(ids)
            out.append(Spans(image=img_pos[: gh * gw], grid=(gh, gw), question=np.arange(start, end)))
        return out


ADAPTERS = [QwenVLAdapter]


def make_adapter(model, processor):
    mt = getattr(model.config, "model_type", "")
    for cls in ADAPTERS:
        if mt in cls.model_types:
            return cls(model, processor)
    raise ValueError(
        f"no attention adapter for model type {mt!r} (supported: {[a.model_types for a in ADAPTERS]})"
    )


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
        self.adapter = make_adapter(model, processor)
        layers = self.adapter.decoder_layers()
        n = len(layers)
        idx = list(range(n)) if not cfg.layers else [i % n for i in cfg.layers]
        if any(not -n <= i < n for i in (cfg.layers or [])):
            raise ValueError(f"attention.layers {list(cfg.layers)} out of range for a {n}-layer model")
        self.layer_idx = sorted(set(idx))
        self.layers = [layers[i] for i in self.layer_idx]
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
        """images: (H, W, 3) uint8 RGB arrays; texts: the questions (or rendered dialogues). One HeatMap each."""
        pil = [Image.fromarray(im) for im in images]
        inputs = self.adapter.encode(pil, [self.adapter.prompt(t) for t in texts])
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        spans = self.adapter.spans(inputs["input_ids"], inputs["image_grid_thw"])
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
        per_layer: list[list[torch.Tensor]] = [[] for _ in spans]

        def hook(_module, _args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(
                    "attention weights not returned: load the model with attn_implementation='eager'"
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
        maps = []
        for b, s in enumerate(spans):
            vec = _reduce(torch.stack(per_layer[b]), self.cfg.layer_reduce, dim=0).cpu().numpy()
            grid = smooth(vec.reshape(s.grid), self.cfg.smooth_sigma)
            h, w = images[b].shape[:2]
            maps.append(HeatMap(grid=grid, height=h, width=w))
        return maps

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
        patch = int(getattr(self.model.config.vision_config, "patch_size", 14))
        return grid[0] * self.adapter.merge * patch, grid[1] * self.adapter.merge * patch
