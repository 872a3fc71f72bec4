"""The GPU benchmark (issue H), short and self-contained: random-init models at real sizes, nothing downloaded.

1. discovery: a Qwen2.5-VL-7B-size MLLM (bf16, SDPA + the question rows' weights at the last layer, as the job
   runs it) on images of ~1,280 tokens: heat maps per second, peak GPU memory, model FLOPs utilisation;
2. SAM ViT-H image encoder: our fp32 path (segment_anything as shipped) against bf16 + SDPA + torch.compile
   (segment-anything-fast's recipe): images per second both ways and the ratio (targets: >= 20 img/s on an H100,
   >= 7x the fp32 path);
3. scorer: an InternVL3-8B-size model served by vLLM (written to a local folder first): candidates per second,
   peak GPU memory.

Each stage prints its own lines and frees the GPU before the next; the card's name comes first. ``smoke=true`` runs
every stage at tiny sizes on CPU (what the test suite checks); the real run needs a CUDA device.

    python bench/gpu.py                          # all stages on the GPU (under 10 minutes on an H100)
    python bench/gpu.py stages=[sam] sam_images=64
    python bench/gpu.py smoke=true               # CPU, tiny sizes: the code paths only
"""

from __future__ import annotations

import gc
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rea2seg_ray.config import AttentionConfig, load_config

# Dense bf16 tensor-core peaks (FLOP/s) for the MFU line; other cards print MFU as n/a.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


@dataclass
class GpuBenchConfig:
    stages: list[str] = field(default_factory=lambda: ["discovery", "sam", "scorer"])
    smoke: bool = False  # tiny sizes on CPU: checks the code paths, numbers mean nothing
    discovery_queries: int = 32
    discovery_batch: int = 8
    image_tokens: int = 1280
    sam_images: int = 64
    sam_batch: int = 8
    scorer_queries: int = 32
    candidates: int = 8
    seed: int = 0


def _device(cfg: GpuBenchConfig) -> str:
    if cfg.smoke:
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device (or smoke=true for the CPU code-path check)")
    return "cuda"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _mfu(flops_per_s: float) -> str:
    if not torch.cuda.is_available():
        return "n/a"
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return f"{100 * flops_per_s / peak:.1f}%" if peak else "n/a"


def _qwen_at_size(
    hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vision: dict, image_tokens: int
):
    """A Qwen2.5-VL config + processor (the project's tiny builder, widened) and the image side per merged token."""
    from rea2seg_ray.models.tiny import QWEN2VL_SPECIAL_TOKENS, _qwen_family_parts, build_tokenizer

    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS}
    config, _, processor = _qwen_family_parts(
        "qwen2.5-vl", ids, ((len(tok) + 63) // 64) * 64, 0.02, tok, 56 * 56, image_tokens * 28 * 28
    )
    t = config.text_config
    head_dim = hidden // heads
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = hidden, inter, layers
    t.num_attention_heads, t.num_key_value_heads, t.head_dim = heads, kv_heads, head_dim
    t.layer_types = ["full_attention"] * layers
    quarter = (
        head_dim // 8
    )  # mrope: (time, height, width) = 1/4, 3/8, 3/8 of the rotary half, as the real models
    t.rope_parameters = {**t.rope_parameters, "mrope_section": [quarter, 3 * quarter // 2, 3 * quarter // 2]}
    for k, v in vision.items():
        setattr(config.vision_config, k, v)
    config.vision_config.out_hidden_size = hidden
    return config, processor


def bench_discovery(cfg: GpuBenchConfig, device: str) -> None:
    from transformers import AutoModelForImageTextToText

    from rea2seg_ray.discovery.attention import AttentionMapper, register_capture_attention

    if cfg.smoke:
        size = dict(hidden=128, layers=2, heads=4, kv_heads=2, inter=256)
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1])
        n, batch, tokens = 4, 2, 64
    else:  # Qwen2.5-VL-7B: 28 layers, 3584 wide, 28 heads (4 kv), MLP 18944; vision 32 blocks, 1280 wide
        size = dict(hidden=3584, layers=28, heads=28, kv_heads=4, inter=18944)
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                      fullatt_block_indexes=[7, 15, 23, 31])  # fmt: skip
        n, batch, tokens = cfg.discovery_queries, cfg.discovery_batch, cfg.image_tokens
    config, processor = _qwen_at_size(**size, vision=vision, image_tokens=tokens)
    dtype = torch.float32 if cfg.smoke else torch.bfloat16
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(
            config, dtype=dtype, attn_implementation=register_capture_attention()
        ).eval()
    params = sum(p.numel() for p in model.parameters())
    mapper = AttentionMapper(model, processor, AttentionConfig())
    rows = int(math.sqrt(tokens * 3 / 4))
    h, w = rows * 28, (tokens // rows) * 28
    rng = np.random.default_rng(cfg.seed)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]
    texts = [f"Segment what a person would use to open the bottle ({i})." for i in range(n)]
    mapper.heat_maps(images[:batch], texts[:batch])  # warm-up
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        mapper.heat_maps(images[i : i + batch], texts[i : i + batch])
    _sync(device)
    dt = time.perf_counter() - t0
    seq = tokens + 40  # image tokens + prompt
    flops = 2 * params * seq * n  # forward FLOPs, ~2 per parameter per token
    print(
        f"  discovery ({params / 1e9:.2f} B params, {dtype}, ~{tokens} image tokens, batch {batch}): "
        f"{n / dt:.2f} queries/s, peak GPU memory {_peak_gib(device):.1f} GiB, MFU {_mfu(flops / dt)}"
    )
    del model, mapper
    _free()


def bench_sam(cfg: GpuBenchConfig, device: str) -> None:
    from rea2seg_ray.models.sam import build_sam, sam_config, use_sdpa

    kind, n, batch = ("tiny", 4, 2) if cfg.smoke else ("vit_h", cfg.sam_images, cfg.sam_batch)
    config = sam_config(kind)
    torch.manual_seed(cfg.seed)
    x = torch.randn(batch, 3, config["img_size"], config["img_size"], device=device)

    def run(encoder, inputs) -> float:
        with torch.no_grad():
            encoder(inputs)  # warm-up (and compilation)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(max(1, n // batch)):
                encoder(inputs)
            _sync(device)
        return max(1, n // batch) * batch / (time.perf_counter() - t0)

    sam = build_sam(config).to(device).eval()
    _reset_peak(device)
    fp32 = run(sam.image_encoder, x)
    peak32 = _peak_gib(device)
    fast_dtype = torch.float32 if cfg.smoke else torch.bfloat16
    use_sdpa(sam.to(fast_dtype))
    encoder = sam.image_encoder if cfg.smoke else torch.compile(sam.image_encoder, mode="max-autotune")
    _reset_peak(device)
    fast = run(encoder, x.to(fast_dtype))
    print(
        f"  SAM {kind} image encoder, batch {batch}: fp32 (segment_anything) {fp32:.2f} img/s, peak {peak32:.1f} GiB; "
        f"{fast_dtype} + SDPA + torch.compile {fast:.2f} img/s, peak {_peak_gib(device):.1f} GiB; "
        f"{fast / fp32:.2f}x (targets: >= 20 img/s on an H100, >= 7x)"
    )
    del sam, encoder
    _free()


def bench_scorer(cfg: GpuBenchConfig, device: str) -> None:
    import copy

    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from rea2seg_ray.config import ModelsConfig, ScoringConfig
    from rea2seg_ray.masks import encode_rle
    from rea2seg_ray.models.families import save_vlm
    from rea2seg_ray.models.tiny import build_tiny_vlm
    from rea2seg_ray.records import Candidate, Query
    from rea2seg_ray.scoring.scorer import Scorer

    with tempfile.TemporaryDirectory() as tmp:
        # The tiny InternVL3 preset's folder (tokenizer, processor, chat template), its weights replaced by a
        # random-init model at InternVL3-8B's sizes: InternViT-300M (24 x 1024) + a Qwen2.5-7B-size language model.
        folder = build_tiny_vlm(Path(tmp) / "scorer", family="internvl3")
        config = AutoConfig.from_pretrained(folder)
        processor = AutoProcessor.from_pretrained(folder)
        if not cfg.smoke:
            v, t = config.vision_config, config.text_config
            v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size = (
                1024,
                24,
                16,
                4096,
            )
            v.image_size, v.patch_size = [448, 448], [14, 14]
            config.image_seq_length = processor.image_seq_length = 256
            processor.image_processor.size = {"height": 448, "width": 448}
            processor.image_processor.max_patches = 12
            t.hidden_size, t.num_hidden_layers, t.num_attention_heads = 3584, 28, 28
            t.num_key_value_heads, t.intermediate_size, t.head_dim = 4, 18944, 128
            t.layer_types = ["full_attention"] * 28
            processor.save_pretrained(folder)
        torch.manual_seed(cfg.seed)
        model = AutoModelForImageTextToText.from_config(
            config, dtype=torch.float32 if cfg.smoke else torch.bfloat16
        )
        params = sum(p.numel() for p in model.parameters())
        for f in folder.glob("*.safetensors"):
            f.unlink()
        save_vlm(model, folder)
        del model
        _free()
        scorer = Scorer(ScoringConfig(backend="vllm"), ModelsConfig(scorer=str(folder)))
        n, k = (2, 3) if cfg.smoke else (cfg.scorer_queries, cfg.candidates)
        rng = np.random.default_rng(cfg.seed)
        images = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(n)]
        queries = [Query(f"q{i}", f"img{i}", "the tool you would use to open this bottle") for i in range(n)]
        cands = []
        for _ in range(n):
            row = []
            for j in range(k):
                m = np.zeros((480, 640), bool)
                m[40 * j : 40 * j + 120, 50 * j : 50 * j + 160] = True
                row.append(Candidate(mask=encode_rle(m), bbox=[0, 0, 0, 0], area=int(m.sum())))
            cands.append(row)
        scorer.score(queries[:1], images[:1], copy.deepcopy(cands[:1]))  # warm-up
        _sync(device)
        _reset_peak(device)
        t0 = time.perf_counter()
        scorer.score(queries, images, copy.deepcopy(cands))
        _sync(device)
        dt = time.perf_counter() - t0
    print(
        f"  scorer ({params / 1e9:.2f} B params, InternVL3 layout, vLLM): {n * k / dt:.1f} candidates/s "
        f"({n / dt:.2f} queries/s at K={k}); peak GPU memory (vLLM pre-allocates its cache) {_peak_gib(device):.1f} GiB"
    )
    del scorer
    _free()


def main(argv: list[str]) -> None:
    cfg = load_config(GpuBenchConfig, None, argv)
    device = _device(cfg)
    card = (
        torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke: tiny sizes, numbers mean nothing)"
    )
    print(f"GPU benchmark on {card}, torch {torch.__version__}")
    for stage in cfg.stages:
        {"discovery": bench_discovery, "sam": bench_sam, "scorer": bench_scorer}[stage](cfg, device)


if __name__ == "__main__":
    main(sys.argv[1:])
