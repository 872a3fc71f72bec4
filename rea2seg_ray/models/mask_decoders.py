"""Mask decoders other than segment-anything's SAM, through transformers: SAM 2.1, SAM-HQ and SAM 3 (its
point-and-box tracker). One registry entry per kind, keyed by the folder's ``config.json`` ``model_type``; tiny
random-init presets built from the real config classes; one loader. Segment-anything checkpoints (SAM ViT-B/L/H,
``sam_config.json`` or ``sam_vit_*.pth``) stay on ``models.sam.build_sam``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import model_type_of


@dataclass(frozen=True)
class MaskDecoderKind:
    name: str  # as users say it: sam2.1 | sam-hq | sam3
    model_types: tuple[str, ...]  # config.json model_type values it loads
    model_class: str  # transformers class
    processor_class: str  # transformers processor class
    # How the processor fits an image to the encoder: "square" resizes to S x S (SAM 2, SAM 3); "longest" resizes the
    # longest side to S and pads (SAM, SAM-HQ). Prompts are scaled by the same rule; masks are mapped back by the
    # processor's own post-processing.
    resize: str


MASK_DECODERS: tuple[MaskDecoderKind, ...] = (
    MaskDecoderKind("sam2.1", ("sam2",), "Sam2Model", "Sam2Processor", "square"),
    MaskDecoderKind("sam-hq", ("sam_hq",), "SamHQModel", "SamHQProcessor", "longest"),
    # SAM 3: points and boxes go through its tracker, from a tracker checkpoint or a full one (facebook/sam3 is
    # model_type sam3_video: detector + tracker). A detector-only checkpoint (model_type sam3) has no tracker weights,
    # so it is not accepted here (transformers would leave the tracker's mask decoder randomly initialised).
    MaskDecoderKind(
        "sam3", ("sam3_tracker", "sam3_video"), "Sam3TrackerModel", "Sam3TrackerProcessor", "square"
    ),
)


def mask_decoder_kind(path: Path) -> MaskDecoderKind | None:
    """The transformers mask decoder a folder holds, or None (a segment-anything checkpoint or something else)."""
    model_type = model_type_of(path)
    if model_type is None:
        return None
    for kind in MASK_DECODERS:
        if model_type in kind.model_types:
            return kind
    known = ", ".join(t for k in MASK_DECODERS for t in k.model_types)
    raise ValueError(
        f"{path}: model type {model_type!r} is not a supported mask decoder ({known}, or segment-anything)"
    )


# SAM 3's detector (text prompts, discovery source ``concept``): a detector checkpoint or facebook/sam3 (detector and
# tracker together).
CONCEPT_MODEL_TYPES = ("sam3", "sam3_video")


def load_hf_concept_model(path: Path, device: str, dtype: torch.dtype):
    """(SAM 3 detector in eval mode on ``device``, its processor) of a ``CONCEPT_MODEL_TYPES`` folder."""
    import transformers

    model_type = model_type_of(path)
    if model_type not in CONCEPT_MODEL_TYPES:
        raise ValueError(f"{path} is not a SAM 3 checkpoint (model_type {model_type!r})")
    model = transformers.Sam3Model.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, transformers.Sam3Processor.from_pretrained(path)


def load_hf_mask_decoder(path: Path, kind: MaskDecoderKind, device: str, dtype: torch.dtype):
    """(model in eval mode on ``device``, processor) of a transformers mask decoder folder."""
    import transformers

    model = getattr(transformers, kind.model_class).from_pretrained(path, dtype=dtype)
    processor = getattr(transformers, kind.processor_class).from_pretrained(path)
    return model.to(device).eval(), processor


# Tiny presets: real config classes at reduced sizes (random init; for tests, CI and the demo).
TINY_MASK_DECODERS = {
    "tiny-sam2": "sam2.1", "tiny-sam-hq": "sam-hq", "tiny-sam3": "sam3", "tiny-sam3-concept": "sam3-concept",
}  # fmt: skip


def build_tiny_mask_decoder(output: str | Path, kind: str, seed: int = 0, init: float = 0.3) -> Path:
    """Write a random-init tiny SAM 2.1, SAM-HQ, SAM 3 tracker or SAM 3 detector (``sam3-concept``: text prompts,
    with the project's tiny BPE tokenizer in place of CLIP's) and its processor to ``output``."""
    import transformers as tf

    hidden = 32
    sam3_vision = None
    if kind in ("sam3", "sam3-concept"):
        size, patch = 224, 14
        g = size // patch
        sam3_vision = dict(
            backbone_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=size,
                patch_size=patch, window_size=8, global_attn_indexes=[1], pretrain_image_size=size,
                initializer_range=init,
            ),
            fpn_hidden_size=hidden, backbone_feature_sizes=[[4 * g] * 2, [2 * g] * 2, [g] * 2], initializer_range=init,
        )  # fmt: skip
    decoder = dict(hidden_size=hidden, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
    if kind == "sam2.1":
        size = 256
        config = tf.Sam2Config(
            vision_config=dict(
                backbone_config=dict(
                    hidden_size=16, num_attention_heads=1, image_size=[size, size], blocks_per_stage=[1, 1, 2, 1],
                    embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 1, 2, 2],
                    window_size_per_stage=[8, 4, 8, 8], global_attention_blocks=[3],
                    window_positional_embedding_background_size=[4, 4], initializer_range=init,
                ),
                backbone_channel_list=[128, 64, 32, 16],
                backbone_feature_sizes=[[size // 4] * 2, [size // 8] * 2, [size // 16] * 2],
                fpn_hidden_size=hidden, initializer_range=init,
            ),
            prompt_encoder_config=dict(hidden_size=hidden, image_size=size, patch_size=16),
            mask_decoder_config=decoder,
            initializer_range=init,
        )  # fmt: skip
        model_cls = tf.Sam2Model
        processor = tf.Sam2Processor(
            image_processor=tf.Sam2ImageProcessor(
                size={"height": size, "width": size}, mask_size={"height": size // 4, "width": size // 4}
            )
        )
    elif kind == "sam-hq":
        size = 256
        config = tf.SamHQConfig(
            vision_config=dict(
                hidden_size=32, output_channels=hidden, num_hidden_layers=2, num_attention_heads=2, image_size=size,
                patch_size=16, window_size=4, global_attn_indexes=[1], num_pos_feats=hidden // 2, mlp_dim=64,
                initializer_range=init,
            ),
            prompt_encoder_config=dict(hidden_size=hidden, image_size=size, patch_size=16),
            mask_decoder_config=dict(decoder, vit_dim=32),
            initializer_range=init,
        )  # fmt: skip
        model_cls = tf.SamHQModel
        processor = tf.SamHQProcessor(
            image_processor=tf.SamImageProcessor(
                size={"longest_edge": size}, pad_size={"height": size, "width": size},
                mask_size={"longest_edge": size // 4}, mask_pad_size={"height": size // 4, "width": size // 4},
            )
        )  # fmt: skip
    elif kind == "sam3":
        config = tf.Sam3TrackerConfig(
            vision_config=sam3_vision,
            prompt_encoder_config=dict(hidden_size=hidden, image_size=size, patch_size=patch),
            mask_decoder_config=decoder,
            initializer_range=init,
        )
        model_cls = tf.Sam3TrackerModel
        processor = tf.Sam3TrackerProcessor(
            image_processor=tf.Sam2ImageProcessor(
                size={"height": size, "width": size}, mask_size={"height": 4 * g, "width": 4 * g},
                image_mean=[0.5] * 3, image_std=[0.5] * 3,
            ),
            target_size=size,
        )  # fmt: skip
    elif kind == "sam3-concept":
        from .tiny import build_tokenizer

        tok = build_tokenizer()
        layers = dict(hidden_size=hidden, num_layers=1, num_attention_heads=2, intermediate_size=64)
        config = tf.Sam3Config(
            vision_config=sam3_vision,
            text_config=dict(
                model_type="clip_text_model", vocab_size=((len(tok) + 63) // 64) * 64, hidden_size=32,
                intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                projection_dim=hidden, pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            ),
            geometry_encoder_config=layers, detr_encoder_config=layers,
            detr_decoder_config=dict(layers, num_queries=16), mask_decoder_config=dict(hidden_size=hidden, num_attention_heads=2),
            initializer_range=init,
        )  # fmt: skip
        model_cls = tf.Sam3Model
        processor = tf.Sam3Processor(
            image_processor=tf.Sam3ImageProcessor(
                size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
            ),
            tokenizer=tok, target_size=size,
        )  # fmt: skip
    else:
        raise ValueError(f"no tiny builder for mask decoder {kind!r}")
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
