"""Scorer: (queries with candidates) -> scored, reranked candidates. Plain class, no Ray (the pipeline wraps it).

All candidates of all queries in one call go to the backend together, so vLLM batches across queries and its prefix
cache serves each query's image+question prefix once.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .. import get_logger
from ..config import ModelsConfig, ScoringConfig
from ..masks import decode_rle
from ..records import Candidate, Query
from .backends import HFBackend, ScoreRequest, VLLMBackend, image_key
from .facts import candidate_facts, relate
from .prompts import (
    NUMERIC_SCHEMA,
    REASONING_STOP,
    AnswerError,
    candidate_messages,
    comparative_messages,
    comparative_schema,
    count_messages,
    count_schema,
    parse_comparative,
    parse_count,
    parse_description,
    parse_numeric,
    render_chat,
    with_final_question,
)
from .render import render_query, resize_once

log = get_logger(__name__)


def rerank(candidates: list[Candidate], top_k: int = 0) -> list[Candidate]:
    """Stable sort by score (high first; NaN, i.e. unscorable, last), ties broken by the discovery prior; ranks
    0..n-1; the first ``top_k`` kept (0 keeps all)."""

    def key(ic):
        i, c = ic
        s = c.score
        return (1 if s is None or math.isnan(s) else 0, -(s if s == s else 0.0), -c.prior, i)

    ordered = [c for _, c in sorted(enumerate(candidates), key=key)]
    if top_k > 0:
        ordered = ordered[:top_k]
    for r, c in enumerate(ordered):
        c.rank = r
    return ordered


def select_ranks(
    ranked: list[Candidate], mode: str = "top1", threshold: float = 0.5, count: int = 1
) -> list[int]:
    """The ranks chosen as the answer (``scoring.select``), best first, never empty for a non-empty list:
    ``top1`` the first; ``threshold`` every candidate scoring at least ``threshold`` (at least the first);
    ``count`` the first ``count``."""
    if not ranked:
        return []
    if mode == "threshold":
        return [c.rank for c in ranked if c.score == c.score and c.score >= threshold] or [ranked[0].rank]
    if mode == "count":
        return [c.rank for c in ranked[: max(1, count)]]
    return [ranked[0].rank]


@dataclass
class _Slot:
    query: int
    cand: int  # -1: the query's single comparative request


@dataclass
class _Batch:
    results: list
    requests: list[ScoreRequest] = field(default_factory=list)
    slots: list[_Slot] = field(default_factory=list)
    # scoring.candidate_facts: per query index, (its candidates' facts, the shape their centroids are measured in)
    facts: dict[int, tuple[list, tuple[int, int]]] = field(default_factory=dict)


class Scorer:
    """Stage two of Rea2Seg. ``score`` returns, per query, its candidates scored and ranked (or the exception that
    stopped that query)."""

    def __init__(self, cfg: ScoringConfig, models: ModelsConfig, backend=None):
        """``backend``: an already-loaded backend to share (one engine per process is enough for any mode)."""
        from ..discovery.discoverer import resolve_device, resolve_dtype
        from ..models.loading import resolve_model

        if cfg.mode not in ("per_candidate", "comparative"):
            raise ValueError(f"scoring.mode must be per_candidate or comparative, not {cfg.mode!r}")
        if cfg.answer not in ("yesno", "numeric"):
            raise ValueError(f"scoring.answer must be yesno or numeric, not {cfg.answer!r}")
        self.cfg = cfg
        self.model_name = models.scorer
        path = resolve_model(models.scorer, models.cache_dir or None, models.allow_hub)
        if backend is not None:
            self.backend = backend
        elif cfg.backend == "vllm":
            self.backend = VLLMBackend(str(path), cfg.vllm, max_images=2)
        elif cfg.backend == "hf":
            device = resolve_device(cfg.device)
            self.backend = HFBackend(str(path), cfg.hf, device, resolve_dtype("auto", device))
        else:
            raise ValueError(f"scoring.backend must be vllm or hf, not {cfg.backend!r}")
        tok = self.backend.tokenizer
        self.yes_id, self.no_id = single_token_id(tok, cfg.yes_token), single_token_id(tok, cfg.no_token)
        self.processor = _ChatFormatter(tok)
        self.input_size = model_input_size_fn(path) if cfg.image_max_side <= 0 else None
        self.timings: dict[str, float] = defaultdict(float)

    def warmup(self) -> None:
        """Score two masks on a small image, so the engine's first-call costs are paid at start-up."""
        from ..masks import encode_rle, mask_bbox

        image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
        masks = [np.zeros((96, 128), bool), np.zeros((96, 128), bool)]
        masks[0][10:50, 10:60], masks[1][40:90, 60:120] = True, True
        cands = [Candidate(mask=encode_rle(m), bbox=mask_bbox(m), area=int(m.sum())) for m in masks]
        self.score([Query("warmup", "warmup", "warm up")], [image], [cands])
        self.timings.clear()

    def score(
        self, queries: list[Query], images: list[np.ndarray], candidates: list[list[Candidate]]
    ) -> list[list[Candidate] | Exception]:
        """Score every candidate of every query; rerank; keep ``top_k``. images: (H, W, 3) uint8 RGB."""
        batch = self.build_requests(queries, images, candidates)
        t0 = time.perf_counter()
        if self.cfg.facts_relations and batch.requests:
            batch = self._second_round(batch, queries, candidates)
        ks = [len(candidates[s.query]) for s in batch.slots] if self.cfg.mode == "comparative" else None
        scores, notes = self._run(batch.requests, ks)
        self.timings["model"] += time.perf_counter() - t0
        return self.assemble(batch, candidates, scores, notes)

    def select(
        self, queries: list[Query], images: list[np.ndarray], ranked: list[list[Candidate] | Exception]
    ) -> list[list[int]]:
        """The chosen ranks per query (``scoring.select``); [] for a failed or empty query. With ``count`` the
        scorer is first asked how many objects each question wants: one request per query, in one call."""
        cfg = self.cfg
        counts = [1] * len(queries)
        if cfg.select == "count":
            from PIL import Image

            todo = [i for i, r in enumerate(ranked) if isinstance(r, list) and r]
            reqs = []
            for i in todo:
                size = self.input_size(*images[i].shape[:2]) if self.input_size else None
                base = Image.fromarray(resize_once(images[i], cfg.image_max_side or 448, size))
                prompt = render_chat(self.processor, count_messages(queries[i].dialogue(), cfg.select_max))
                reqs.append(ScoreRequest(prompt, [base], [image_key(base)]))
            t0 = time.perf_counter()
            texts = (
                self.backend.generate(reqs, cfg.max_answer_tokens, count_schema(cfg.select_max))
                if reqs
                else []
            )
            self.timings["count"] += time.perf_counter() - t0
            for i, t in zip(todo, texts, strict=True):
                try:
                    counts[i] = parse_count(t, cfg.select_max)
                except AnswerError:
                    counts[i] = 1  # an unreadable count takes the top candidate, as top1 would
        return [
            select_ranks(r, cfg.select, cfg.select_threshold, n) if isinstance(r, list) else []
            for r, n in zip(ranked, counts, strict=True)
        ]

    def candidate_prompts(self, q: Query, facts: list | None) -> list[str]:
        """One prompt per candidate of ``q`` (per_candidate mode). Without candidate facts (None) all are the same
        prompt (one is returned); with them (``facts.CandidateFacts`` per candidate) each ends with its own facts
        sentence."""
        prompts = []
        for f in facts or [None]:
            msgs = candidate_messages(q.dialogue(), self.cfg.render, self.cfg.answer, self.cfg.reasoning,
                                      self.cfg.overlay_style, self.cfg.show_original, f)  # fmt: skip
            prompts.append(render_chat(self.processor, msgs))
            log.debug("scorer prompt for %s: %r", q.query_id, prompts[-1])
        return prompts

    def build_requests(
        self, queries: list[Query], images: list[np.ndarray], candidates: list[list[Candidate]]
    ) -> _Batch:
        """Render every candidate and build the backend requests (image and question first, candidate last)."""
        if not (len(queries) == len(images) == len(candidates)):
            raise ValueError("queries, images and candidates must have the same length")
        t0 = time.perf_counter()
        batch = _Batch(results=[[] for _ in queries])
        comparative = self.cfg.mode == "comparative"
        for qi, (q, im, cands) in enumerate(zip(queries, images, candidates, strict=True)):
            if not cands:
                continue
            try:
                render = "marks" if comparative else self.cfg.render
                size = self.input_size(*im.shape[:2]) if self.input_size else None
                base, shown = render_query(
                    im,
                    [c.mask for c in cands],
                    render,
                    self.cfg.image_max_side or 448,
                    self.cfg.overlay_style,
                    self.cfg.crop_margin,
                    size,
                )
            except Exception as e:  # noqa: BLE001 - a bad mask fails its query only
                batch.results[qi] = RuntimeError(f"rendering candidates failed: {type(e).__name__}: {e}")
                continue
            if comparative:
                prompt = render_chat(self.processor, comparative_messages(q.dialogue(), len(cands)))
                log.debug("scorer prompt for %s: %r", q.query_id, prompt)
                batch.requests.append(ScoreRequest(prompt, [shown[0]], [image_key(shown[0])]))
                batch.slots.append(_Slot(qi, -1))
            else:
                facts = None
                if self.cfg.candidate_facts:
                    masks = [decode_rle(c.mask) for c in cands]
                    facts = candidate_facts(masks)
                    batch.facts[qi] = (facts, masks[0].shape)
                prompts = self.candidate_prompts(q, facts)
                bkey = image_key(base)
                # A candidate image is a pure function of the base image, its mask and the render settings: key it
                # by those instead of hashing its pixels.
                how = f"{self.cfg.render}:{self.cfg.overlay_style}:{self.cfg.crop_margin}:{base.size}"
                for ci, img in enumerate(shown):
                    prompt = prompts[ci if self.cfg.candidate_facts else 0]
                    ckey = hashlib.blake2b(
                        f"{bkey}|{how}|{cands[ci].mask['counts']}".encode(), digest_size=16
                    ).hexdigest()
                    if self.cfg.show_original:
                        batch.requests.append(ScoreRequest(prompt, [base, img], [bkey, ckey]))
                    else:
                        batch.requests.append(ScoreRequest(prompt, [img], [ckey]))
                    batch.slots.append(_Slot(qi, ci))
        self.timings["render"] += time.perf_counter() - t0
        return batch

    def assemble(
        self, batch: _Batch, candidates: list[list[Candidate]], scores: list, notes: list[str]
    ) -> list[list[Candidate] | Exception]:
        for s, sc, note in zip(batch.slots, scores, notes, strict=True):
            cands = candidates[s.query]
            if s.cand == -1:  # comparative: one answer for all candidates of the query
                for c, v in zip(cands, sc, strict=True):
                    c.score, c.reasoning = v, note
            else:
                cands[s.cand].score, cands[s.cand].reasoning = sc, note
        results = batch.results
        for qi, cands in enumerate(candidates):
            if not isinstance(results[qi], Exception) and cands:
                results[qi] = rerank(cands, self.cfg.top_k)
        return results

    def _second_round(self, batch: _Batch, queries: list[Query], candidates: list[list[Candidate]]) -> _Batch:
        """``scoring.facts_relations``: the first round's reasoning names every candidate; the requests are rebuilt
        with facts that say whose closest candidate each one is (the images are the same)."""
        t0 = time.perf_counter()
        said = self.backend.generate(batch.requests, self.cfg.max_reasoning_tokens, stop=[REASONING_STOP])
        self.timings["first_round"] += time.perf_counter() - t0
        names: list[list[str]] = [[""] * len(c) for c in candidates]
        for slot, text in zip(batch.slots, said, strict=True):
            names[slot.query][slot.cand] = parse_description(text)
        # The first round's facts, related by the names (the masks are not measured again).
        prompts = {qi: self.candidate_prompts(queries[qi], relate(copy.deepcopy(facts), names[qi], shape))
                   for qi, (facts, shape) in batch.facts.items()}  # fmt: skip
        batch.requests = [ScoreRequest(prompts[s.query][s.cand], r.images, r.image_keys)
                          for s, r in zip(batch.slots, batch.requests, strict=True)]  # fmt: skip
        return batch

    def _run(self, requests: list[ScoreRequest], ks: list[int] | None):
        """-> (score per request (list of K for comparative), note per request: reasoning or an error message)."""
        be, cfg = self.backend, self.cfg
        if ks is not None:
            texts = [""] * len(requests)
            by_k: dict[int, list[int]] = defaultdict(list)
            for i, k in enumerate(ks):
                by_k[k].append(i)
            for k, idx in by_k.items():  # one schema per K
                out = be.generate([requests[i] for i in idx], cfg.max_answer_tokens, comparative_schema(k))
                for i, t in zip(idx, out, strict=True):
                    texts[i] = t
            scores, notes = [], []
            for t, k in zip(texts, ks, strict=True):
                try:
                    scores.append(parse_comparative(t, k))
                    notes.append(t)
                except AnswerError as e:
                    scores.append([float("nan")] * k)
                    notes.append(f"unparseable answer: {e}")
            return scores, notes
        reasoning = [""] * len(requests)
        if cfg.reasoning:
            reasoning = be.generate(requests, cfg.max_reasoning_tokens, stop=[REASONING_STOP])
            requests = [
                ScoreRequest(r.prompt + with_final_question(t), r.images, r.image_keys)
                for r, t in zip(requests, reasoning, strict=True)
            ]
        if cfg.answer == "yesno":
            return be.yes_no(requests, self.yes_id, self.no_id), reasoning
        texts = be.generate(requests, cfg.max_answer_tokens, NUMERIC_SCHEMA)
        scores, notes = [], []
        for t, r in zip(texts, reasoning, strict=True):
            try:
                scores.append(parse_numeric(t))
                notes.append(r)
            except AnswerError as e:
                scores.append(float("nan"))
                notes.append(f"unparseable answer: {e}")
        return scores, notes


def single_token_id(tok, text: str) -> int:
    """The id of a scorer answer word (Yes / No), which must be exactly one token: its logit is the score."""
    ids = tok.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"scorer answer word {text!r} is {len(ids)} tokens for this tokenizer; it must be one"
        )
    return ids[0]


def model_input_size_fn(model_dir):
    """(h, w) -> the (h, w) a Qwen2-VL-style processor resizes an image to (``smart_resize`` with the model's
    patch, merge and pixel bounds); None for processors without such a rule (then ``image_max_side`` applies)."""
    import json
    from pathlib import Path

    d = Path(model_dir)
    cfg = None
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        if (d / name).exists():
            data = json.loads((d / name).read_text())
            cfg = data.get(key) if key else data
            if cfg:
                break
    if not cfg or "patch_size" not in cfg or "merge_size" not in cfg:
        return None
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    size = cfg.get("size") or {}
    lo = int(cfg.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
    hi = int(cfg.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
    factor = int(cfg["patch_size"]) * int(cfg["merge_size"])
    return lambda h, w: tuple(smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi))


class _ChatFormatter:
    """Applies the tokenizer's chat template to multimodal messages (what the processor would do)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize
        )
