"""Merging candidate sources: drop tiny (and whole-image) masks, mask NMS by prior, cap at K, and parse
Seg-Zero-style text answers into SAM prompts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from ..masks import decode_rle, encode_rle, mask_bbox, mask_nms
from ..records import Candidate


@dataclass
class RawCandidate:
    mask: np.ndarray  # (H, W) bool
    source: str
    prior: float


def merge_candidates(
    raw: list[RawCandidate], k: int, nms_iou: float, min_area: int, max_area_frac: float = 0.95
) -> list[Candidate]:
    """Union of sources -> at most ``k`` Candidates, no two above ``nms_iou``, best prior first.

    Masks smaller than ``min_area`` px or covering more than ``max_area_frac`` of the image are dropped; if that
    leaves nothing, the largest-prior non-empty mask is kept so that every query has a candidate.
    """
    if not raw:
        return []
    total = raw[0].mask.size
    areas = [int(r.mask.sum()) for r in raw]
    keep = [i for i, a in enumerate(areas) if a >= min_area and a <= max_area_frac * total]
    if not keep:
        nonempty = [i for i, a in enumerate(areas) if a > 0]
        keep = [max(nonempty, key=lambda i: raw[i].prior)] if nonempty else []
    rles = [encode_rle(raw[i].mask) for i in keep]
    order = mask_nms(rles, [raw[i].prior for i in keep], iou_threshold=nms_iou, max_keep=k)
    out = []
    for j in order:
        i = keep[j]
        out.append(
            Candidate(
                mask=rles[j],
                bbox=mask_bbox(raw[i].mask),
                area=areas[i],
                source=raw[i].source,
                prior=float(raw[i].prior),
            )
        )
    return out


def given_candidates(rles: list[dict], height: int, width: int) -> list[tuple[np.ndarray, str]]:
    """Candidate masks supplied with the query (RLE), checked against the image size."""
    out = []
    for r in rles or []:
        m = decode_rle(r)
        if m.shape != (height, width):
            raise ValueError(f"given candidate mask is {m.shape[1]}x{m.shape[0]}, image is {width}x{height}")
        out.append((m, "given"))
    return out


_JSON_RE = re.compile(r"\{.*\}", re.S)


def parse_box_answer(text: str, height: int, width: int, coords: str, resized: tuple[int, int] | None = None):
    """A Seg-Zero-style answer ``{"bbox": [x1, y1, x2, y2], "points": [[x, y], ...]}`` -> (box, points) in original
    pixels, or None when the text holds no usable box. ``coords``: normalized_1000 | resized | original.
    """
    m = _JSON_RE.search(text or "")
    if not m:
        return None
    try:
        data = json.loads(m.group(0))
        box = [float(v) for v in data["bbox"]][:4]
        points = [[float(a), float(b)] for a, b in (data.get("points") or [])]
    except (ValueError, KeyError, TypeError):
        return None
    if len(box) != 4:
        return None
    if coords == "normalized_1000":
        sx, sy = width / 1000.0, height / 1000.0
    elif coords == "resized" and resized:
        sx, sy = width / resized[1], height / resized[0]
    else:
        sx = sy = 1.0
    x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    x0, x1 = sorted((min(max(x0, 0), width), min(max(x1, 0), width)))
    y0, y1 = sorted((min(max(y0, 0), height), min(max(y1, 0), height)))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    pts = [(min(max(px * sx, 0), width - 1), min(max(py * sy, 0), height - 1)) for px, py in points]
    return [x0, y0, x1, y1], pts


_PHRASE_SPLIT = re.compile(r"[\n,;]+")


def parse_noun_phrases(text: str, k: int, max_words: int = 6) -> list[str]:
    """The MLLM's answer to the concept prompt -> up to ``k`` distinct short phrases (one per line, comma or
    semicolon; quotes, list marks and a trailing full stop dropped; a longer phrase keeps its first ``max_words``
    words, which also keeps it within SAM 3's 32 text tokens)."""
    out: list[str] = []
    for part in _PHRASE_SPLIT.split(text or ""):
        phrase = " ".join(re.sub(r"^[\s\-*•\d.)\"']+|[\s.\"']+$", "", part).split()[:max_words])
        if phrase and phrase.lower() not in (p.lower() for p in out):
            out.append(phrase)
        if len(out) >= k:
            break
    return out
