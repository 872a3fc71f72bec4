"""Discoverer: (images, queries) -> de-duplicated candidate masks per query. Plain class, no Ray (the pipeline wraps
it in an actor). bf16 on GPU, fp32 on CPU; model paths from config (tiny presets or real checkpoints).
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch

from ..config import DiscoveryConfig, ModelsConfig
from ..models.loading import default_dtype
from ..records import Candidate, Query
from .attention import AttentionMapper
from .merge import RawCandidate, given_candidates, merge_candidates, parse_box_answer, parse_noun_phrases
from .prompts import HeatMap, blob_boxes, coldest_points, find_peaks
from .sam_prompts import SamMask, load_concept_segmenter, load_prompter

SOURCES = ("attention", "automatic", "text_box", "given", "concept")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"discovery.dtype must be auto or one of {list(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


def discovery_models(cfg: DiscoveryConfig, models: ModelsConfig) -> dict[str, str]:
    """{role: model spec} of the models discovery loads for ``cfg.sources``: the MLLM (``discovery``) when its
    attention or its text answers are a source, SAM (``sam``) when a source prompts it, SAM 3's detector
    (``concept``) for concept candidates; `given` candidates alone need none. The Discoverer loads exactly these and
    the run record lists exactly these."""
    src = set(cfg.sources)
    roles = {
        "discovery": (models.discovery, {"attention", "text_box", "concept"}),
        "sam": (models.sam, {"attention", "automatic", "text_box"}),
        "concept": (models.concept, {"concept"}),
    }
    return {role: spec for role, (spec, needed_by) in roles.items() if src & needed_by}


class DiscoveryError(RuntimeError):
    """Discovery failed for one query; the pipeline turns it into an error row."""


class Discoverer:
    """Stage one of Rea2Seg. ``discover`` batches the MLLM over queries and SAM over distinct images."""

    def __init__(self, cfg: DiscoveryConfig, models: ModelsConfig):
        from ..models.loading import load_vlm

        bad = [s for s in cfg.sources if s not in SOURCES]
        if bad or not cfg.sources:
            raise ValueError(f"discovery.sources {list(cfg.sources)}: each must be one of {SOURCES}")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        cache = models.cache_dir or None
        self.model_name = models.discovery
        specs = discovery_models(cfg, models)
        self.needs_mllm, self.needs_sam = "discovery" in specs, "sam" in specs
        self.mapper = None
        if self.needs_mllm:
            impl = "eager"
            if cfg.attention.implementation == "sdpa":
                from .attention import register_capture_attention

                impl = register_capture_attention()
            vlm, processor = load_vlm(
                specs["discovery"], self.device, self.dtype, impl, cache, models.allow_hub
            )
            self.mapper = AttentionMapper(vlm, processor, cfg.attention)
        self.prompter = None
        if self.needs_sam:
            self.prompter = load_prompter(specs["sam"], self.device, self.dtype, cache, models.allow_hub)
        self.concept = None
        if "concept" in specs:
            self.concept = load_concept_segmenter(
                specs["concept"], self.device, self.dtype, cfg.concept_threshold, cache, models.allow_hub
            )
        self.timings: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def warmup(self) -> None:
        """One tiny query through every model, so first-call costs (allocations, kernel selection) are paid at start-up,
        not by the first real batch."""
        rng = np.random.default_rng(0)
        image = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        self.discover([Query("warmup", "warmup", "warm up")], [image])
        self.timings.clear()
        self.counts.clear()

    def question_tokens(self, text: str) -> int | None:
        """Length of ``text`` in the discovery model's tokens (None when no MLLM is loaded)."""
        if self.mapper is None:
            return None
        return len(self.mapper.adapter.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- helpers -------------------------------------------------------------------------------------------------

    def _heat_maps(self, images: list[np.ndarray], texts: list[str]) -> list[HeatMap | Exception]:
        """Heat maps in MLLM batches; a failing batch is retried one query at a time to isolate the bad one."""
        out: list[HeatMap | Exception] = []
        bs = max(1, self.cfg.mllm_batch_size)
        for i in range(0, len(images), bs):
            try:
                out += self.mapper.heat_maps(images[i : i + bs], texts[i : i + bs])
            except Exception:  # noqa: BLE001 - isolate per query below
                for im, t in zip(images[i : i + bs], texts[i : i + bs], strict=True):
                    try:
                        out += self.mapper.heat_maps([im], [t])
                    except Exception as e:  # noqa: BLE001
                        out.append(DiscoveryError(f"MLLM attention failed: {type(e).__name__}: {e}"))
        return out

    def _attention_masks(self, emb, heat: HeatMap) -> list[SamMask]:
        p = self.cfg.prompts
        peaks = find_peaks(heat, p.num_points, p.min_distance, p.rel_threshold)
        negs = coldest_points(heat, p.negative_points, p.min_distance)
        masks = self.prompter.predict_points(emb, [(x, y) for x, y, _ in peaks], negs, multimask=p.multimask)
        boxes = [b for b, _ in blob_boxes(heat, p.box_threshold, p.max_boxes)]
        masks += self.prompter.predict_boxes(emb, boxes, multimask=False)
        for m in masks:
            m.source = "attention_" + m.source
        return masks

    # -- main entry ----------------------------------------------------------------------------------------------

    def discover(self, queries: list[Query], images: list[np.ndarray]) -> list[list[Candidate] | Exception]:
        """Candidates for each (query, image). images: (H, W, 3) uint8 RGB; several queries may share one array
        (the same image is embedded once). Returns, per query, 1..K Candidates or the exception that stopped it.
        With ``discovery.context`` a second pass runs inside each query's context region (see ``context_pass``).
        """
        if len(queries) != len(images):
            raise ValueError(f"{len(queries)} queries but {len(images)} images")
        results, heats, boxes = self._discover_pass(queries, images)
        if self.cfg.context:
            results = self.context_pass(queries, images, results, heats, boxes)
        return results

    def context_box(self, heat: HeatMap | None, box: list[float] | None, h: int, w: int) -> list[int] | None:
        """The crop (x0, y0, x1, y1, pixels) of the coarse-to-fine pass: the MLLM's box, else the dominant
        attention blob, grown by ``context_margin`` and to ``context_min_frac`` of the image; None when there is no
        region or it is too large to gain from zooming in."""
        cfg = self.cfg
        if box is None and heat is not None:
            blobs = blob_boxes(heat, cfg.prompts.box_threshold, 1)
            box = blobs[0][0] if blobs else None
        if box is None:
            return None
        x0, y0, x1, y1 = box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        bw = max((x1 - x0) * (1 + 2 * cfg.context_margin), cfg.context_min_frac * w)
        bh = max((y1 - y0) * (1 + 2 * cfg.context_margin), cfg.context_min_frac * h)
        if bw * bh > cfg.context_max_area * w * h:
            return None
        x0, x1 = int(max(0, round(cx - bw / 2))), int(min(w, round(cx + bw / 2)))
        y0, y1 = int(max(0, round(cy - bh / 2))), int(min(h, round(cy + bh / 2)))
        return [x0, y0, x1, y1] if x1 - x0 >= 8 and y1 - y0 >= 8 else None

    def context_pass(
        self,
        queries: list[Query],
        images: list[np.ndarray],
        first: list[list[Candidate] | Exception],
        heats: list,
        boxes: list,
    ) -> list[list[Candidate] | Exception]:
        """CoReS's second step: discovery again inside each query's context region, at the model's full
        resolution; the crop's candidates, pasted back at full size (source ``context_<source>``), merge with the
        first pass's (the same NMS and cap). A query whose crop fails keeps its first-pass candidates."""
        import dataclasses

        from ..masks import decode_rle

        todo, crops, where = [], [], []
        for i, (im, res) in enumerate(zip(images, first, strict=True)):
            if isinstance(res, Exception):
                continue
            heat = heats[i] if isinstance(heats[i], HeatMap) else None
            crop = self.context_box(heat, boxes[i], *im.shape[:2])
            if crop is None:
                continue
            x0, y0, x1, y1 = crop
            todo.append(
                dataclasses.replace(queries[i], candidates=None)
            )  # given masks are full-size: not inside
            crops.append(np.ascontiguousarray(images[i][y0:y1, x0:x1]))
            where.append((i, crop))
        if not todo:
            return first
        second, _, _ = self._discover_pass(todo, crops)
        self.counts["context_crops"] += len(todo)
        out = list(first)
        t0 = time.perf_counter()
        for (i, (x0, y0, x1, y1)), res in zip(where, second, strict=True):
            if isinstance(res, Exception):
                continue
            h, w = images[i].shape[:2]
            raw = [RawCandidate(decode_rle(c.mask), c.source, c.prior) for c in first[i]]
            for c in res:
                full = np.zeros((h, w), bool)
                full[y0:y1, x0:x1] = decode_rle(c.mask)
                raw.append(RawCandidate(full, "context_" + c.source, c.prior))
            min_area = max(self.cfg.min_area, int(self.cfg.min_area_frac * h * w))
            out[i] = merge_candidates(raw, self.cfg.max_candidates, self.cfg.nms_iou, min_area) or first[i]
        self.timings["merge"] += time.perf_counter() - t0
        return out

    def _discover_pass(
        self, queries: list[Query], images: list[np.ndarray]
    ) -> tuple[list[list[Candidate] | Exception], list, list]:
        """One discovery pass: (candidates or the exception per query, heat maps, the MLLM's parsed boxes)."""
        n = len(queries)
        results: list[list[Candidate] | Exception] = [[] for _ in range(n)]
        heats: list[HeatMap | Exception | None] = [None] * n
        if self.needs_mllm:
            t0 = time.perf_counter()
            heats = self._heat_maps(images, [q.dialogue() for q in queries])
            self.timings["mllm"] += time.perf_counter() - t0
        answers: list[str] = [""] * n
        if "text_box" in self.cfg.sources:
            t0 = time.perf_counter()
            try:
                answers = self.mapper.generate_text(
                    images, [q.dialogue() for q in queries], "\n" + self.cfg.text_box_prompt
                )
            except Exception:  # noqa: BLE001 - the text source is optional; attention still gives candidates
                answers = [""] * n
            self.timings["mllm"] += time.perf_counter() - t0

        phrases: list[list[str]] = [[] for _ in range(n)]
        if self.concept is not None:
            t0 = time.perf_counter()
            try:
                said = self.mapper.generate_text(
                    images,
                    [q.dialogue() for q in queries],
                    "\n" + self.cfg.concept_prompt,
                    self.cfg.concept_tokens,
                )
                phrases = [parse_noun_phrases(a, self.cfg.concept_max_phrases) for a in said]
            except Exception:  # noqa: BLE001 - like text_box, an optional source: the others still give candidates
                pass
            self.timings["mllm"] += time.perf_counter() - t0

        # One SAM embedding per distinct image array.
        t0 = time.perf_counter()
        uniq: dict[int, int] = {}
        distinct: list[np.ndarray] = []
        for im in images:
            if id(im) not in uniq:
                uniq[id(im)] = len(distinct)
                distinct.append(im)
        embs = (
            self.prompter.embed(distinct, batch_size=self.cfg.sam_batch_size)
            if self.needs_sam
            else [None] * len(distinct)
        )
        # SAM 3's encoding of each distinct image that has phrases to look for.
        concept_embs: dict[int, object] = {}
        if self.concept is not None:
            for i, im in enumerate(images):
                if phrases[i] and uniq[id(im)] not in concept_embs:
                    concept_embs[uniq[id(im)]] = self.concept.embed(im)
        self.timings["sam"] += time.perf_counter() - t0

        boxes: list[list[float] | None] = [None] * n
        for i, (q, im) in enumerate(zip(queries, images, strict=True)):
            try:
                if isinstance(heats[i], Exception):
                    raise heats[i]
                extra = []
                if phrases[i]:
                    extra = self.concept.segment(concept_embs[uniq[id(im)]], im.shape[:2], phrases[i])
                    self.counts["concept_phrases"] += len(phrases[i])
                results[i], boxes[i] = self._discover_one(
                    q, im, embs[uniq[id(im)]], heats[i], answers[i], extra
                )
            except Exception as e:  # noqa: BLE001 - one query's failure never sinks the batch
                results[i] = (
                    e if isinstance(e, DiscoveryError) else DiscoveryError(f"{type(e).__name__}: {e}")
                )
        self.counts["queries"] += n
        self.counts["images"] += len(distinct)
        return results, heats, boxes

    def _discover_one(
        self, q: Query, im: np.ndarray, emb, heat: HeatMap | None, answer: str, concept: list[SamMask] = ()
    ) -> tuple[list[Candidate], list[float] | None]:
        """(candidates, the MLLM's parsed box or None). ``concept``: SAM 3's instances of the MLLM's noun phrases
        for this query (source ``concept``)."""
        box = None
        h, w = im.shape[:2]
        t0 = time.perf_counter()
        sam_masks: list[SamMask] = list(concept)
        if "attention" in self.cfg.sources and heat is not None:
            sam_masks += self._attention_masks(emb, heat)
        if "automatic" in self.cfg.sources:
            sam_masks += self.prompter.predict_grid(
                emb, self.cfg.automatic_points_per_side, self.cfg.automatic_pred_iou_thresh
            )
        if "text_box" in self.cfg.sources and answer:
            resized = self.mapper.resized_size(heat.grid.shape) if heat is not None else None
            coords = self.cfg.text_box_coords
            if coords == "auto":
                coords = self.mapper.adapter.family.box_coords
            parsed = parse_box_answer(answer, h, w, coords, resized)
            if parsed is not None:
                box = list(parsed[0])
                sam_masks += self.prompter.predict_box_and_points(emb, parsed[0], parsed[1])
                self.counts["text_box_parsed"] += 1
        self.timings["sam"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        raw: list[RawCandidate] = []
        for m in sam_masks:
            mass = heat.mass_in(m.mask) if heat is not None else 1.0
            raw.append(RawCandidate(m.mask, m.source, mass * float(np.clip(m.iou, 0.05, 1.0))))
        if "given" in self.cfg.sources and q.candidates:
            for mask, src in given_candidates(q.candidates, h, w):
                raw.append(RawCandidate(mask, src, heat.mass_in(mask) if heat is not None else 1.0))
        if not raw and heat is not None:
            # Nothing from SAM (e.g. every prompt gave an empty mask): the thresholded heat map itself.
            raw.append(
                RawCandidate(heat.to_image() >= np.quantile(heat.to_image(), 0.8), "attention_map", 0.0)
            )
        min_area = max(self.cfg.min_area, int(self.cfg.min_area_frac * h * w))
        cands = merge_candidates(raw, self.cfg.max_candidates, self.cfg.nms_iou, min_area)
        self.timings["merge"] += time.perf_counter() - t0
        if not cands:
            raise DiscoveryError("no candidate masks (every source returned empty masks)")
        return cands, box
