"""Segment Anything built from segment_anything's own modules, for any size: real ViT-B/L/H and tiny test models.

One builder (``build_sam``) for every preset, like segment_anything's ``_build_sam`` but with the image size and
prompt width as parameters, so a tiny 512-px model and the real 1024-px ones share one code path.
"""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

# Architectures. Real ones match segment_anything.build_sam; "tiny" is for tests, CI and the demo.
SAM_CONFIGS: dict[str, dict] = {
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=[7, 15, 23, 31]),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "tiny": dict(
        embed_dim=96,
        depth=2,
        num_heads=2,
        global_attn_indexes=[1],
        img_size=512,
        prompt_embed_dim=64,
        window_size=8,
        decoder_heads=4,
        decoder_mlp_dim=256,
        iou_head_hidden_dim=64,
    ),
}


def sam_config(model_type: str, **overrides) -> dict:
    if model_type not in SAM_CONFIGS:
        raise ValueError(f"unknown SAM model type {model_type!r}; known: {', '.join(SAM_CONFIGS)}")
    cfg = dict(
        model_type=model_type,
        img_size=1024,
        prompt_embed_dim=256,
        patch_size=16,
        window_size=14,
        decoder_heads=8,
        decoder_mlp_dim=2048,
        iou_head_hidden_dim=256,
        mlp_ratio=4.0,
    )
    cfg.update(SAM_CONFIGS[model_type])
    cfg.update(overrides)
    return cfg


def build_sam(cfg: dict) -> Sam:
    """A randomly initialised (or to-be-loaded) Sam from a config dict (see ``sam_config``)."""
    img_size = int(cfg["img_size"])
    patch = int(cfg["patch_size"])
    prompt_dim = int(cfg["prompt_embed_dim"])
    grid = img_size // patch
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=int(cfg["depth"]),
            embed_dim=int(cfg["embed_dim"]),
            img_size=img_size,
            mlp_ratio=float(cfg["mlp_ratio"]),
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=int(cfg["num_heads"]),
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(cfg["global_attn_indexes"]),
            window_size=int(cfg["window_size"]),
            out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=prompt_dim,
                mlp_dim=int(cfg["decoder_mlp_dim"]),
                num_heads=int(cfg["decoder_heads"]),
            ),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=int(cfg["iou_head_hidden_dim"]),
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    return sam


def _sdpa_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """segment_anything's image-encoder ``Attention.forward`` through PyTorch's fused SDPA: the decomposed relative
    position terms become the additive mask (segment-anything-fast's recipe). x: (B, H, W, C) -> (B, H, W, C)."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, HW, C')
    bias = None
    if self.use_rel_pos:
        flat = q.reshape(b * self.num_heads, h * w, -1)
        zeros = torch.zeros(b * self.num_heads, h * w, h * w, dtype=q.dtype, device=q.device)
        bias = add_decomposed_rel_pos(zeros, flat, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        bias = bias.view(b, self.num_heads, h * w, h * w)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(out)


def use_sdpa(sam: Sam) -> Sam:
    """Run every attention block of ``sam``'s image encoder through SDPA (flash / memory-efficient kernels on GPU);
    the same function as segment_anything's, to float rounding. Returns ``sam``."""
    import types

    from segment_anything.modeling.image_encoder import Attention

    for module in sam.image_encoder.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(_sdpa_attention_forward, module)
    return sam
