"""Heat-map attention both ways on a real-width model, in one run: eager attention in every layer (every layer
materialises its (heads, sequence, sequence) weights) against the fast path (SDPA everywhere, the question rows'
weights recomputed at the chosen layers only). Random init, two decoder layers at real width, an image large enough
for >= 1,200 image tokens. Prints time and peak memory per query both ways, their ratios, and the largest
difference between the two heat maps.

    python bench/attention.py [hidden=2048] [image_tokens=1280] [queries=4] [family=qwen2.5-vl]
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from rea2seg_ray.config import AttentionConfig, load_config
from rea2seg_ray.discovery.attention import AttentionMapper, register_capture_attention
from rea2seg_ray.models.tiny import QWEN2VL_SPECIAL_TOKENS, _qwen_family_parts, build_tokenizer


@dataclass
class BenchConfig:
    family: str = "qwen2.5-vl"  # a Qwen family of models.families
    hidden: int = 2048  # text model width (Qwen2.5-VL-3B: 2048)
    layers: int = 2
    heads: int = 16
    kv_heads: int = 2
    image_tokens: int = 1280  # merged image tokens per query (the image is sized to give about this many)
    queries: int = 4
    seed: int = 0


def _peak_reset() -> None:
    """Reset the kernel's peak-RSS mark of this process (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def build(cfg: BenchConfig, attn: str):
    """A random-init model of ``cfg.family`` at real text width, with its processor sized for the image."""
    from transformers import AutoModelForImageTextToText

    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS}
    side = 28 if cfg.family != "qwen3-vl" else 32  # pixels per merged token
    vocab = ((len(tok) + 63) // 64) * 64
    config, _, processor = _qwen_family_parts(
        cfg.family, ids, vocab, 0.3, tok, 56 * 56, cfg.image_tokens * side * side
    )
    head_dim = cfg.hidden // cfg.heads
    t = config.text_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = cfg.hidden, int(cfg.hidden * 2.75), cfg.layers
    t.num_attention_heads, t.num_key_value_heads, t.head_dim = cfg.heads, cfg.kv_heads, head_dim
    t.layer_types = ["full_attention"] * cfg.layers
    quarter = (
        head_dim // 2 // 4
    )  # mrope halves split (time, height, width) as the real models do: 1/4, 3/8, 3/8
    t.rope_parameters = {**t.rope_parameters, "mrope_section": [quarter, 3 * quarter // 2, 3 * quarter // 2]}
    config.vision_config.out_hidden_size = cfg.hidden
    torch.manual_seed(cfg.seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32, attn_implementation=attn)
    return model.eval(), processor


def measure(cfg: BenchConfig, attn: str, images, texts) -> tuple[float, int, list]:
    """(seconds per query, peak memory above the loaded model per query in bytes, heat maps)."""
    model, processor = build(cfg, attn)
    mapper = AttentionMapper(model, processor, AttentionConfig())
    mapper.heat_maps(images[:1], texts[:1])  # warm-up: allocator pools and kernels
    times, peaks, maps = [], [], []
    for im, t in zip(images, texts, strict=True):
        base = _rss()
        _peak_reset()
        t0 = time.perf_counter()
        maps += mapper.heat_maps([im], [t])
        times.append(time.perf_counter() - t0)
        peaks.append(_peak_rss() - base)
    del model, mapper
    return float(np.median(times)), int(np.median(peaks)), maps


def main(argv: list[str]) -> None:
    cfg = load_config(BenchConfig, None, argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = np.random.default_rng(cfg.seed)
    side = 28 if cfg.family != "qwen3-vl" else 32
    rows = int(math.sqrt(cfg.image_tokens * 3 / 4))
    cols = cfg.image_tokens // rows
    h, w = rows * side, cols * side
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(cfg.queries)]
    texts = [
        f"Segment the object a person would use to open the bottle, number {i}." for i in range(cfg.queries)
    ]
    t_eager, m_eager, maps_eager = measure(cfg, "eager", images, texts)
    t_fast, m_fast, maps_fast = measure(cfg, register_capture_attention(), images, texts)
    diff = max(float(np.abs(a.grid - b.grid).max()) for a, b in zip(maps_eager, maps_fast, strict=True))
    tokens = maps_fast[0].grid.size
    print(
        f"attention benchmark: {cfg.family}, hidden {cfg.hidden}, {cfg.layers} layers, {cfg.heads} heads, "
        f"{tokens} image tokens ({w}x{h} image), {cfg.queries} queries, {torch.get_num_threads()} threads"
    )
    print(f"  eager in every layer: {t_eager:6.2f} s a query, peak memory {m_eager / 2**20:7.1f} MiB a query")
    print(f"  sdpa + chosen layers: {t_fast:6.2f} s a query, peak memory {m_fast / 2**20:7.1f} MiB a query")
    print(
        f"  ratios (eager / fast): time {t_eager / t_fast:.2f}x, peak memory {m_eager / max(m_fast, 1):.2f}x"
    )
    print(f"  largest heat-map difference: {diff:.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
