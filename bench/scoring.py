"""Scoring throughput: vLLM with all candidates of all queries in one call against the research-style transformers
loop (one candidate per forward), on the same inputs, in one run; plus the share of each query's
image-and-question prefix served from vLLM's prefix cache.

    python bench/scoring.py [queries=16] [k=8] [scoring.vllm.max_num_seqs=256] [models.scorer=...]
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from rea2seg_ray.config import DiscoveryConfig, ModelsConfig, ScoringConfig, load_config
from rea2seg_ray.datasets import read_queries
from rea2seg_ray.datasets.synthetic import write_scenes
from rea2seg_ray.discovery.discoverer import Discoverer
from rea2seg_ray.scoring.scorer import Scorer


@dataclass
class BenchConfig:
    queries: int = 16
    k: int = 8
    seed: int = 5
    repeats: int = 2  # timed repetitions of each path (after one warm-up call); the best is reported
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)


def make_inputs(cfg: BenchConfig):
    """Scenes with K candidates each: the scene's own shapes plus SAM grid masks, de-duplicated, capped at K."""
    with tempfile.TemporaryDirectory() as tmp:
        write_scenes(tmp, cfg.queries, seed=cfg.seed)
        queries = list(read_queries(str(Path(tmp) / "scenes.jsonl")))
        images = [np.asarray(Image.open(q.image).convert("RGB")) for q in queries]
    d = Discoverer(
        DiscoveryConfig(
            sources=["given", "automatic"],
            automatic_points_per_side=6,
            max_candidates=cfg.k,
            nms_iou=0.9,
            min_area=4,
        ),
        cfg.models,
    )
    cands = d.discover(queries, images)
    assert all(len(c) == cfg.k for c in cands), [len(c) for c in cands]
    return queries, images, cands


def cold(scorer: Scorer) -> None:
    """Forget everything an earlier timed call left in the engine's caches (prefix blocks, processed images, encoder
    outputs), so a repeat costs what a first look at new inputs costs; within a call the caches work as usual."""
    llm = getattr(scorer.backend, "llm", None)
    if llm is not None:
        llm.reset_prefix_cache()
        llm.reset_mm_cache()
        llm.llm_engine.reset_encoder_cache()


def timed(scorer: Scorer, queries, images, cands, repeats: int) -> tuple[float, float, list]:
    """Best of ``repeats``: (end-to-end Scorer.score seconds, backend-only seconds on pre-rendered requests, results).
    Every timed call starts from cold caches (see ``cold``)."""
    scorer.score(queries[:2], images[:2], copy.deepcopy(cands[:2]))  # warm-up
    best, best_backend, out = float("inf"), float("inf"), None
    batch = scorer.build_requests(queries, images, copy.deepcopy(cands))
    for _ in range(repeats):
        c = copy.deepcopy(cands)
        cold(scorer)
        t0 = time.perf_counter()
        out = scorer.score(queries, images, c)
        best = min(best, time.perf_counter() - t0)
        cold(scorer)
        t0 = time.perf_counter()
        scorer.backend.yes_no(batch.requests, scorer.yes_id, scorer.no_id)
        best_backend = min(best_backend, time.perf_counter() - t0)
    return best, best_backend, out


def vllm_breakdown(scorer: Scorer, queries, images, cands, repeats: int) -> dict[str, float]:
    """Where a cold vLLM call's time goes: the same pre-rendered requests timed with successively more of the engine's
    caches kept warm (the processed-image cache skips the HF image processor, the encoder cache skips the vision
    tower, the prefix cache skips the prefill); the differences are those parts' costs."""
    llm = scorer.backend.llm
    batch = scorer.build_requests(queries, images, copy.deepcopy(cands))

    def best(reset) -> float:
        b = float("inf")
        for _ in range(repeats):
            reset()
            t0 = time.perf_counter()
            scorer.backend.yes_no(batch.requests, scorer.yes_id, scorer.no_id)
            b = min(b, time.perf_counter() - t0)
        return b

    cold_s = best(lambda: cold(scorer))
    proc_warm = best(lambda: (llm.reset_prefix_cache(), llm.llm_engine.reset_encoder_cache()))
    enc_warm = best(llm.reset_prefix_cache)
    all_warm = best(lambda: None)
    return {
        "cold": cold_s,
        "image processing (HF processor)": max(0.0, cold_s - proc_warm),
        "vision encoder": max(0.0, proc_warm - enc_warm),
        "prefill beyond the prefix cache": max(0.0, enc_warm - all_warm),
        "the rest (request handling, scheduling, one decode step, outputs)": all_warm,
    }


def prefix_lengths(scorer: Scorer, proc, query, image) -> tuple[int, int]:
    """(image-and-question prefix, whole shared prefix) in tokens for one of the query's prompts: the tokens up to
    the end of the question, and up to the candidate image (the question plus the shared instructions)."""
    from rea2seg_ray.scoring.prompts import TEMPLATES, candidate_messages, render_chat
    from rea2seg_ray.scoring.render import render_query

    size = scorer.input_size(*image.shape[:2]) if scorer.input_size else None
    base, _ = render_query(image, [], "overlay", scorer.cfg.image_max_side or 448, size=size)
    prompt = render_chat(proc, candidate_messages(query.text(), "overlay"))
    head = prompt.split(TEMPLATES["overlay"])[0]
    n_iq = len(proc(text=[head], images=[base], return_tensors="pt")["input_ids"][0])
    ids = proc(text=[prompt], images=[base, base], return_tensors="pt")["input_ids"][0].tolist()
    vs = proc.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    return n_iq, [i for i, t in enumerate(ids) if t == vs][1]


def main(argv: list[str]) -> None:
    cfg = load_config(BenchConfig, None, argv)
    queries, images, cands = make_inputs(cfg)
    n = sum(len(c) for c in cands)

    vcfg = copy.deepcopy(cfg.scoring)
    vcfg.backend = "vllm"
    v = Scorer(vcfg, cfg.models)
    t_vllm, tb_vllm, out_v = timed(v, queries, images, cands, cfg.repeats)
    # Prefix cache on a cold cache: reset, score once, read each request's cached tokens.
    cold(v)
    v.backend.stats.__init__()
    v.score(queries, images, copy.deepcopy(cands))
    st = v.backend.stats
    from transformers import AutoProcessor

    from rea2seg_ray.models.loading import resolve_model

    proc = AutoProcessor.from_pretrained(resolve_model(v.model_name))  # once, not per query
    lens = [prefix_lengths(v, proc, q, im) for q, im in zip(queries, images, strict=True)]
    per_req = [lens[i] for i, c in enumerate(cands) for _ in c]  # requests are in query order, K each
    iq_total = sum(iq for iq, _ in per_req)
    iq_cached = sum(min(c, iq) for c, (iq, _) in zip(st.last_cached, per_req, strict=True))
    shared_total = sum(sh for _, sh in per_req)
    shared_cached = sum(min(c, sh) for c, (_, sh) in zip(st.last_cached, per_req, strict=True))
    all_cached, all_prompt, all_rate = st.cached_tokens, st.prompt_tokens, st.cache_hit_rate
    breakdown = vllm_breakdown(v, queries, images, cands, cfg.repeats)
    del v

    hcfg = copy.deepcopy(cfg.scoring)
    hcfg.backend, hcfg.hf.batch_size = "hf", 1
    h = Scorer(hcfg, cfg.models)
    t_hf, tb_hf, out_h = timed(h, queries, images, cands, cfg.repeats)

    diff = max(
        abs(a.score - b.score)
        for qa, qb in zip(out_v, out_h, strict=True)
        for a, b in zip(qa, qb, strict=True)
    )
    k = cfg.k
    print(
        f"scoring benchmark: {len(queries)} queries x K={k} = {n} candidates, scorer {cfg.models.scorer}, "
        f"render {cfg.scoring.render}, answer {cfg.scoring.answer}"
    )
    print("  end to end (render + score + rerank):")
    print(f"    vLLM, all candidates in one call:      {n / t_vllm:8.1f} candidates/s ({t_vllm:.3f} s)")
    print(f"    transformers, one candidate at a time: {n / t_hf:8.1f} candidates/s ({t_hf:.3f} s)")
    print(f"    speed-up: {t_hf / t_vllm:.2f}x")
    print("  backend only (same pre-rendered requests):")
    print(
        f"    vLLM {n / tb_vllm:.1f} candidates/s, transformers {n / tb_hf:.1f} candidates/s, speed-up {tb_hf / tb_vllm:.2f}x"
    )
    print(f"  max |score difference| vLLM vs transformers: {diff:.2e}")
    print(f"  where a cold vLLM call's {1000 * breakdown['cold']:.0f} ms go (ms per candidate):")
    for part, sec in list(breakdown.items())[1:]:
        print(f"    {part}: {1000 * sec / n:.2f}")
    print(f"  prefix cache (cold start, block size {cfg.scoring.vllm.block_size or 32}):")
    print(
        f"    image-and-question prefixes served from cache: {100 * iq_cached / iq_total:.1f}% "
        f"(mean prefix {iq_total / n:.0f} tokens; target (K-1)/K = {100 * (k - 1) / k:.1f}%)"
    )
    print(
        f"    whole shared prefixes (question + instructions, mean {shared_total / n:.0f} tokens): "
        f"{100 * shared_cached / shared_total:.1f}%"
    )
    print(f"    all prompt tokens: {all_cached} of {all_prompt} ({100 * all_rate:.1f}%)")
    budget = 1000 * t_hf / n / 10
    print(
        f"  a 10x speed-up leaves {budget:.2f} ms per candidate for vLLM end to end; request handling alone takes "
        f"{1000 * list(breakdown.values())[-1] / n:.2f}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
