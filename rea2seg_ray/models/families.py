"""Everything that differs between VLM families, in one registry keyed by the checkpoint's ``model_type``.

Discovery (where the image tokens sit and what grid they form, where the question is, the decoder layers),
scoring (vLLM engine arguments, the processor's resize rule), training (where a chat turn ends and the assistant's
begins) and the tiny presets all read it; no other module names a family's tokens. One entry per family, the way
vLLM's offline examples keep one per model type.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class VLMFamily:
    """One family of image-text models.

    Token positions are found in a sample's ``input_ids`` (1-D, as the processor returns them, padding included):
    the image is the run of ``image_token`` ids the processor expanded; the question is every token after the last
    image token and the ``after_image`` tokens that close the image block, up to the first ``turn_end``.
    """

    name: str  # the family's name in presets and messages, e.g. "qwen2.5-vl"
    model_types: tuple[str, ...]  # transformers ``config.model_type`` values it covers
    image_token: str  # placeholder the processor expands into one token per merged patch
    after_image: tuple[str, ...]  # tokens that close the image block before the user's text
    turn_end: str  # closes every chat turn (the assistant's answer is followed by it)
    turn_sep: str  # what the chat template writes right after ``turn_end``
    assistant_header: str  # opens the assistant turn, e.g. "<|im_start|>assistant\n"
    # (processor outputs, sample index, model config) -> (rows, cols) of the merged image-token grid, row-major.
    grid: Callable[[dict, int, object], tuple[int, int]]
    # model config -> pixels of the processor's resized image per grid cell edge.
    cell_pixels: Callable[[object], int]
    # Coordinates the family's own grounding answers use (discovery.text_box_coords="auto").
    box_coords: str = "resized"
    # Extra vLLM engine arguments the family needs (merged under the user's; the user's win).
    vllm_args: dict = field(default_factory=dict)

    def question_span(self, ids: torch.Tensor, image_id: int, after_ids: set[int], end_id: int) -> range:
        """Positions of the user's text in one sample (after the image block, before the turn's end)."""
        seq = ids.tolist()
        last = max(i for i, t in enumerate(seq) if t == image_id)
        start = last + 1
        while start < len(seq) and seq[start] in after_ids:
            start += 1
        end = seq.index(end_id, start) if end_id in seq[start:] else len(seq)
        return range(start, end)

    def token_ids(self, tokenizer) -> tuple[int, set[int], int]:
        """(image token id, ids closing the image block, turn-end id) in ``tokenizer``'s vocabulary."""
        names = (self.image_token, *self.after_image, self.turn_end)
        ids = [tokenizer.convert_tokens_to_ids(t) for t in names]
        unk = getattr(tokenizer, "unk_token_id", None)
        missing = [t for t, i in zip(names, ids, strict=True) if i is None or i == unk]
        if missing:
            raise ValueError(f"{self.name} tokenizer lacks the family's tokens {missing}")
        return ids[0], set(ids[1:-1]), ids[-1]


def _qwen_grid(inputs: dict, b: int, config) -> tuple[int, int]:
    # image_grid_thw: (images, 3) patches before the merge; one image per sample here.
    t, h, w = (int(v) for v in inputs["image_grid_thw"][b])
    m = int(getattr(config.vision_config, "spatial_merge_size", 2))
    return h // m, w // m


def _qwen_cell(config) -> int:
    v = config.vision_config
    return int(getattr(v, "patch_size", 14)) * int(getattr(v, "spatial_merge_size", 2))


_QWEN = dict(
    image_token="<|image_pad|>",
    after_image=("<|vision_end|>",),
    turn_end="<|im_end|>",
    turn_sep="\n",
    assistant_header="<|im_start|>assistant\n",
    grid=_qwen_grid,
    cell_pixels=_qwen_cell,
)

FAMILIES: tuple[VLMFamily, ...] = (
    # Qwen2-VL grounds in 0..1000 normalized coordinates; Qwen2.5-VL and Qwen3-VL in the resized image's pixels.
    VLMFamily(name="qwen2-vl", model_types=("qwen2_vl",), box_coords="normalized_1000", **_QWEN),
    VLMFamily(name="qwen2.5-vl", model_types=("qwen2_5_vl",), box_coords="resized", **_QWEN),
    VLMFamily(name="qwen3-vl", model_types=("qwen3_vl",), box_coords="normalized_1000", **_QWEN),
)


def family_of(model_type: str) -> VLMFamily:
    """The registry entry for a transformers ``model_type``."""
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"model type {model_type!r} is not a supported VLM family (supported: {known})")


def family_of_dir(model_dir: str | Path) -> VLMFamily:
    """The family of a transformers model folder, from its ``config.json``."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return family_of(cfg.get("model_type", ""))
