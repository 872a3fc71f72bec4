"""Candidate facts: what only a comparison across a query's candidates can tell about one of them.

A per-candidate scorer sees one highlighted region at a time, so "the largest object" or "the leftmost shape" asks
it to judge a relation to regions it is not shown side by side. ``scoring.candidate_facts`` measures each candidate
against the query's others (area, thinness, centroid) and tells the scorer, in words after the candidate image,
which extremes it is ("Among the 5 candidates it is the largest and the leftmost."). When the candidates have
names (a fine-tuning example's described candidates; when serving with ``scoring.facts_relations``, what the
scorer's own first round of reasoning called each one), it also says whose closest candidate it is ("It is the
closest to the red star."), which answers "the object closest to the red star" by comparison too. Scoring and
fine-tuning both compute the facts here (mask-scoring data stores them per example, measured against every
candidate of the query before negatives are balanced away) and render them with ``prompts.facts_text``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import pyarrow as pa

# In the order they are said. Each: (word, measure, take the largest value).
SUPERLATIVES = (
    ("largest", "area", True),
    ("smallest", "area", False),
    ("thinnest", "thinness", False),
    ("leftmost", "cx", False),
    ("rightmost", "cx", True),
    ("topmost", "cy", False),
    ("lowest", "cy", True),
)
FACTS_TYPE = pa.struct(
    [
        ("n", pa.int32()),  # candidates compared (the query's, this one included)
        ("area", pa.float32()),  # fraction of the image
        ("cx", pa.float32()),  # centroid, fractions of width / height
        ("cy", pa.float32()),
        ("thinness", pa.float32()),  # short / long side of the minimum-area rectangle, in (0, 1]
        ("superlatives", pa.list_(pa.string())),  # e.g. ["largest", "leftmost"]
        # names of the candidates whose closest other candidate (centroid distance) this one is
        ("closest_to", pa.list_(pa.string())),
    ]
)


@dataclass
class CandidateFacts:
    n: int
    area: float
    cx: float
    cy: float
    thinness: float
    superlatives: list[str] = field(default_factory=list)
    closest_to: list[str] = field(default_factory=list)

    def to_struct(self) -> dict:
        return {"n": self.n, "area": self.area, "cx": self.cx, "cy": self.cy, "thinness": self.thinness,
                "superlatives": list(self.superlatives), "closest_to": list(self.closest_to)}  # fmt: skip

    @classmethod
    def from_struct(cls, s: dict | None) -> CandidateFacts | None:
        if s is None:
            return None
        return cls(**{**s, "superlatives": list(s.get("superlatives") or []),
                      "closest_to": list(s.get("closest_to") or [])})  # fmt: skip


def measure(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(H, W) bool/uint8 mask -> (area fraction, centroid x, centroid y (fractions of width / height), thinness).
    An empty mask measures (0, 0.5, 0.5, 1)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0.0, 0.5, 0.5, 1.0
    pts = np.stack([xs, ys], axis=1).astype(np.float32)
    (_, _), (a, b), _ = cv2.minAreaRect(pts)
    # A one-pixel-wide line has a zero side in pixel centres: count pixels as unit squares.
    a, b = a + 1.0, b + 1.0
    return len(xs) / (h * w), (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h, float(min(a, b) / max(a, b))


def candidate_facts(masks: list[np.ndarray], names: list[str] | None = None) -> list[CandidateFacts]:
    """The query's candidate masks (each (H, W), any size) -> one ``CandidateFacts`` per candidate, in order. A
    superlative goes to the one candidate with the extreme value, and only when no other shares it (to 1e-6) and
    there are at least two candidates. ``names``: see ``relate``."""
    facts = [CandidateFacts(len(masks), *measure(m)) for m in masks]
    if len(facts) < 2:
        return facts
    if names is not None:
        relate(facts, names, masks[0].shape)
    for word, attr, largest in SUPERLATIVES:
        vals = np.array([getattr(f, attr) for f in facts], dtype=np.float64)
        best = vals.max() if largest else vals.min()
        winners = np.flatnonzero(np.abs(vals - best) <= 1e-6)
        if len(winners) == 1:
            facts[int(winners[0])].superlatives.append(word)
    return facts


def relate(facts: list[CandidateFacts], names: list[str], shape: tuple[int, int]) -> list[CandidateFacts]:
    """``names`` (one per candidate, "" for unnamed): each named candidate's closest other candidate (centroid
    distance in pixels of an (H, W) ``shape`` image, a unique one) gets its name in ``closest_to``. In place; returns
    ``facts``. Needs only the measured centroids, so a second round relates without measuring the masks again."""
    if len(facts) < 2:
        return facts
    h, w = shape
    xy = np.array([[f.cx * w, f.cy * h] for f in facts])
    for i, name in enumerate(names):
        if not name:
            continue
        d = np.hypot(*(xy - xy[i]).T)
        d[i] = np.inf
        near = np.flatnonzero(d <= d.min() + 1e-6)
        if len(near) == 1:
            facts[int(near[0])].closest_to.append(name)
    return facts
