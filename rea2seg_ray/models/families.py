"""Everything that differs between VLM families, in one registry keyed by the checkpoint's ``model_type``.

Discovery (where the image tokens sit and what grid they form, where the question is), training (where a chat turn
ends and the assistant's begins), the fine-tuning export and the tiny presets (weight names as the hub has them)
read it; no other module names a family's tokens. Scoring needs nothing from it: its prompts go through each
model's own chat template and processor. One entry per family, the way vLLM's offline examples keep one per model
type.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import model_type_of


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
    # (processor outputs, sample index, model config, number of image tokens) -> (rows, cols, offset): the grid of
    # image tokens that covers the whole image, row-major, starting ``offset`` tokens into the sample's image tokens.
    grid: Callable[[dict, int, object, int], tuple[int, int, int]]
    # model config -> pixels of the processor's resized image per grid cell edge.
    cell_pixels: Callable[[object], int]
    # Coordinates the family's own grounding answers use (discovery.text_box_coords="auto").
    box_coords: str = "resized"
    # Weight-name prefixes transformers' save_pretrained writes differently from the hub checkpoints vLLM reads:
    # (written, as the hub has it). Applied by ``save_vlm``.
    saved_prefixes: tuple[tuple[str, str], ...] = ()

    def question_span(self, ids: torch.Tensor, image_id: int, after_ids: set[int], end_id: int) -> range:
        """Positions of the user's text in one sample: after the image block, up to the end of the last turn before
        the generation prompt (a question's one turn; a dialogue's turns after the image, roles included)."""
        seq = ids.tolist()
        last = max(i for i, t in enumerate(seq) if t == image_id)
        start = last + 1
        while start < len(seq) and seq[start] in after_ids:
            start += 1
        ends = [i for i in range(start, len(seq)) if seq[i] == end_id]
        return range(start, ends[-1] if ends else len(seq))

    def token_ids(self, tokenizer) -> tuple[int, set[int], int]:
        """(image token id, ids closing the image block, turn-end id) in ``tokenizer``'s vocabulary."""
        names = (self.image_token, *self.after_image, self.turn_end)
        ids = [tokenizer.convert_tokens_to_ids(t) for t in names]
        unk = getattr(tokenizer, "unk_token_id", None)
        missing = [t for t, i in zip(names, ids, strict=True) if i is None or i == unk]
        if missing:
            raise ValueError(f"{self.name} tokenizer lacks the family's tokens {missing}")
        return ids[0], set(ids[1:-1]), ids[-1]


def _qwen_grid(inputs: dict, b: int, config, n: int) -> tuple[int, int, int]:
    # image_grid_thw: (images, 3) patches before the merge; one image per sample here; every token is on the grid.
    t, h, w = (int(v) for v in inputs["image_grid_thw"][b])
    m = int(getattr(config.vision_config, "spatial_merge_size", 2))
    return h // m, w // m, 0


def _internvl_grid(inputs: dict, b: int, config, n: int) -> tuple[int, int, int]:
    # Dynamic tiling: the tiles' tokens, then (when there is more than one tile) a thumbnail of the whole image;
    # the thumbnail's square grid is the one that covers the image.
    side = math.isqrt(int(config.image_seq_length))
    return side, side, n - side * side


def _internvl_cell(config) -> int:
    size = config.vision_config.image_size
    return int(size[0] if isinstance(size, list | tuple) else size) // math.isqrt(
        int(config.image_seq_length)
    )


def _llava_ov_grid(inputs: dict, b: int, config, n: int) -> tuple[int, int, int]:
    # AnyRes: the base image (resized to the encoder's square) comes first, then the high-resolution crops.
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
    return side, side, 0


def _qwen_cell(config) -> int:
    v = config.vision_config
    return int(getattr(v, "patch_size", 14)) * int(getattr(v, "spatial_merge_size", 2))


# ChatML turns: every family here (Qwen2-VL to Qwen3-VL, and the Qwen2 language models of InternVL3 and
# LLaVA-OneVision) closes a turn with <|im_end|> and opens the assistant's with <|im_start|>assistant.
_CHATML = dict(turn_end="<|im_end|>", turn_sep="\n", assistant_header="<|im_start|>assistant\n")
_QWEN = dict(
    image_token="<|image_pad|>",
    after_image=("<|vision_end|>",),
    grid=_qwen_grid,
    cell_pixels=_qwen_cell,
    **_CHATML,
)

FAMILIES: tuple[VLMFamily, ...] = (
    # Qwen2-VL and Qwen3-VL ground in 0..1000 normalized coordinates, Qwen2.5-VL in the resized image's pixels.
    VLMFamily(name="qwen2-vl", model_types=("qwen2_vl",), box_coords="normalized_1000", **_QWEN),
    VLMFamily(name="qwen2.5-vl", model_types=("qwen2_5_vl",), box_coords="resized", **_QWEN),
    VLMFamily(name="qwen3-vl", model_types=("qwen3_vl",), box_coords="normalized_1000", **_QWEN),
    VLMFamily(
        name="internvl3",
        model_types=("internvl",),
        image_token="<IMG_CONTEXT>",
        after_image=("</img>",),
        grid=_internvl_grid,
        cell_pixels=_internvl_cell,
        box_coords="normalized_1000",
        **_CHATML,
    ),
    # LLaVA-OneVision has no grounding format of its own: boxes are asked for and read as 0..1000 normalized.
    VLMFamily(
        name="llava-onevision",
        model_types=("llava_onevision",),
        image_token="<image>",
        after_image=(),
        grid=_llava_ov_grid,
        cell_pixels=lambda c: int(c.vision_config.patch_size),
        box_coords="normalized_1000",
        # transformers 5 writes the SigLIP tower as vision_tower.*; the hub (and vLLM) say vision_tower.vision_model.*
        saved_prefixes=(("vision_tower.", "vision_tower.vision_model."),),
        **_CHATML,
    ),
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
    model_type = model_type_of(model_dir)
    if model_type is None:
        raise FileNotFoundError(f"{model_dir} has no config.json: not a transformers model folder")
    return family_of(model_type)


def save_vlm(model, out: str | Path) -> None:
    """``model.save_pretrained(out)`` in safetensors, with weight names as the family's hub checkpoints have them, so
    vLLM and transformers both load the folder (tiny presets and fine-tuning exports go through here)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    renames = family_of(model.config.model_type).saved_prefixes
    if not renames:
        return

    def rename(key: str) -> str:
        for written, hub in renames:
            if key.startswith(written) and not key.startswith(hub):
                return hub + key[len(written) :]
        return key

    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            tensors, meta = {rename(k): st.get_tensor(k) for k in st.keys()}, st.metadata()
        save_file(tensors, str(f), metadata=meta)
    index = out / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
