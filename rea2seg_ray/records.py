"""The few types every stage passes: Query (input row), Candidate (a scored mask), Prediction (output row).

``PREDICTIONS_SCHEMA`` is the binding Parquet contract (docs/contracts.md describes it, with an example).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

MASK_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
CANDIDATE_TYPE = pa.struct(
    [
        ("rank", pa.int32()),
        ("score", pa.float32()),
        ("mask", MASK_TYPE),
        ("bbox", pa.list_(pa.float32())),
        ("area", pa.int64()),
        ("source", pa.string()),
        ("prior", pa.float32()),
        ("reasoning", pa.string()),
    ]
)
PREDICTIONS_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("image_uri", pa.string()),
        ("question", pa.string()),
        ("category", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("error_stage", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("mask", MASK_TYPE),
        ("score", pa.float32()),
        ("candidates", pa.list_(CANDIDATE_TYPE)),
        ("scorer_model", pa.string()),
        ("discovery_model", pa.string()),
        ("run_id", pa.string()),
        # The ranks chosen as the answer (scoring.select), best first; `mask` is their union. [0] with top1.
        ("selected", pa.list_(pa.int32())),
    ]
)


# A query as it flows between stages (native Arrow, no JSON): the manifest's fields, where it came from (``source``
# file and 1-based ``row``: the first of a repeated query_id wins), and the error that stopped it, if any. ``found``
# holds the candidates discovery made (scored and ranked once scoring ran).
TURN_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
QUERY_FIELDS = [
    ("query_id", pa.string()),
    ("image", pa.string()),
    ("question", pa.string()),
    ("conversation", pa.list_(TURN_TYPE)),
    ("category", pa.string()),
    ("gt_json", pa.string()),
    ("gt_mask", MASK_TYPE),
    ("gt_instances", pa.list_(MASK_TYPE)),  # ground truth as separate instances (several objects answer it)
    ("candidates", pa.list_(MASK_TYPE)),  # given candidate masks (source `given`), at the original size
    ("candidate_descriptions", pa.list_(pa.string())),
    ("reasoning", pa.string()),  # the manifest's chain of thought (`reasoning` or `cot`), for training data
    ("source", pa.string()),
    ("row", pa.int64()),
    ("error", pa.string()),
    ("error_stage", pa.string()),
]
QUERY_TYPE = pa.struct(
    [*QUERY_FIELDS, ("found", pa.list_(CANDIDATE_TYPE)), ("selected", pa.list_(pa.int32()))]
)  # found: the candidates (ranked once scored); selected: the ranks chosen as the answer


def make_query_id(image: str, question: str) -> str:
    """Stable id from the image reference and the question text (used when a manifest gives none)."""
    return hashlib.sha1(f"{image}\n{question}".encode()).hexdigest()[:16]


@dataclass
class Query:
    """One input row: which object, in which image, is wanted."""

    query_id: str
    image: str  # absolute URI or path
    question: str = ""
    conversation: list[dict] | None = None  # [{role, content}]; the target is the intent after the last turn
    category: str = ""
    gt_json: str | None = None  # LISA-format annotation (URI)
    gt_mask: dict | None = None  # RLE {"size", "counts"}
    candidates: list[dict] | None = None  # optional given candidate masks (RLE dicts) for the `given` source
    meta: dict[str, Any] = field(default_factory=dict)
    # Ground truth as separate instances (RLEs), for instance precision / recall; their union is the target mask.
    gt_instances: list[dict] | None = None

    def text(self) -> str:
        """The text the models read: the question, or the whole dialogue rendered turn by turn."""
        if self.conversation:
            return "\n".join(f"{t.get('role', 'user')}: {t.get('content', '')}" for t in self.conversation)
        return self.question

    def dialogue(self) -> str | list[dict]:
        """What the prompts render: the question, or the conversation as a real dialogue (roles kept; see
        ``scoring.prompts.dialogue_messages``)."""
        return self.conversation if self.conversation else self.question

    def to_dict(self) -> dict:
        return asdict(self)

    def to_struct(self, source: str = "", row: int = 0) -> dict:
        """The query as a ``QUERY_TYPE`` row (its ``meta`` error, descriptions and reasoning as their own fields)."""
        m = self.meta
        conv = self.conversation
        return {
            "query_id": self.query_id, "image": self.image, "question": self.question,
            "conversation": [{"role": str(t.get("role", "user")), "content": str(t.get("content", ""))} for t in conv]
            if conv is not None else None,
            "category": self.category, "gt_json": self.gt_json, "gt_mask": self.gt_mask,
            "gt_instances": self.gt_instances, "candidates": self.candidates,
            "candidate_descriptions": m.get("candidate_descriptions"),
            "reasoning": str(m.get("reasoning") or m.get("cot") or "") or None,
            "source": source, "row": row, "error": m.get("error"),
            "error_stage": (m.get("error_stage") or "read") if m.get("error") else None, "found": None,
            "selected": None,
        }  # fmt: skip

    @classmethod
    def from_struct(cls, d: dict) -> Query:
        meta = {}
        for k in ("candidate_descriptions", "reasoning", "error", "error_stage"):
            if d.get(k) is not None:
                meta[k] = d[k]
        return cls(
            query_id=d["query_id"], image=d.get("image") or "", question=d.get("question") or "",
            conversation=d.get("conversation"), category=d.get("category") or "", gt_json=d.get("gt_json"),
            gt_mask=dict(d["gt_mask"]) if d.get("gt_mask") else None,
            gt_instances=[dict(m) for m in d["gt_instances"]] if d.get("gt_instances") else None,
            candidates=[dict(c) for c in d["candidates"]] if d.get("candidates") is not None else None, meta=meta,
        )  # fmt: skip


@dataclass
class Candidate:
    """A candidate mask with where it came from and, after scoring, its score and rank."""

    mask: dict  # RLE {"size": [h, w], "counts": str}
    bbox: list[float]  # x, y, w, h
    area: int
    source: str = ""
    prior: float = 0.0
    score: float = float("nan")
    rank: int = -1
    reasoning: str = ""

    def at_size(self, shape: tuple[int, int]) -> Candidate:
        """This candidate with its mask, box and area at ``shape`` (H, W) (nearest neighbour; in place)."""
        if tuple(self.mask["size"]) == tuple(shape):
            return self
        from .masks import encode_rle, mask_bbox, resize_mask

        m = resize_mask(self.mask, shape)
        self.mask, self.bbox, self.area = encode_rle(m), mask_bbox(m), int(m.sum())
        return self

    def to_row(self) -> dict:
        return {
            "rank": int(self.rank),
            "score": float(self.score),
            "mask": {"size": [int(s) for s in self.mask["size"]], "counts": self.mask["counts"]},
            "bbox": [float(v) for v in self.bbox],
            "area": int(self.area),
            "source": self.source,
            "prior": float(self.prior),
            "reasoning": self.reasoning or "",
        }

    @classmethod
    def from_row(cls, row: dict) -> Candidate:
        return cls(
            mask=dict(row["mask"]),
            bbox=list(row.get("bbox") or []),
            area=int(row.get("area") or 0),
            source=row.get("source") or "",
            prior=float(row.get("prior") or 0.0),
            score=float(row["score"]) if row.get("score") is not None else float("nan"),
            rank=int(row["rank"]) if row.get("rank") is not None else -1,
            reasoning=row.get("reasoning") or "",
        )


@dataclass
class Prediction:
    """One output row (one per input query; status ``ok`` or ``error``)."""

    query_id: str
    image_uri: str = ""
    question: str = ""
    category: str = ""
    status: str = "ok"
    error: str | None = None
    error_stage: str | None = None
    height: int = 0
    width: int = 0
    mask: dict | None = None
    score: float | None = None
    candidates: list[Candidate] = field(default_factory=list)
    scorer_model: str = ""
    discovery_model: str = ""
    run_id: str = ""
    selected: list[int] = field(default_factory=list)  # chosen ranks; [] for an error row

    @classmethod
    def failed(cls, query: Query, stage: str, error: str, **kw: Any) -> Prediction:
        return cls(
            query_id=query.query_id,
            image_uri=query.image,
            question=query.text(),
            category=query.category,
            status="error",
            error=error,
            error_stage=stage,
            **kw,
        )

    def to_row(self) -> dict:
        return {
            "query_id": self.query_id,
            "image_uri": self.image_uri,
            "question": self.question,
            "category": self.category,
            "status": self.status,
            "error": self.error,
            "error_stage": self.error_stage,
            "height": int(self.height),
            "width": int(self.width),
            "mask": self.mask,
            "score": None if self.score is None else float(self.score),
            "candidates": [c.to_row() for c in self.candidates],
            "scorer_model": self.scorer_model,
            "discovery_model": self.discovery_model,
            "run_id": self.run_id,
            "selected": [int(r) for r in self.selected],
        }

    @classmethod
    def from_row(cls, row: dict) -> Prediction:
        cands = [Candidate.from_row(c) for c in (row.get("candidates") or [])]
        return cls(
            query_id=row["query_id"],
            image_uri=row.get("image_uri") or "",
            question=row.get("question") or "",
            category=row.get("category") or "",
            status=row.get("status") or "ok",
            error=row.get("error"),
            error_stage=row.get("error_stage"),
            height=int(row.get("height") or 0),
            width=int(row.get("width") or 0),
            mask=dict(row["mask"]) if row.get("mask") else None,
            score=row.get("score"),
            candidates=cands,
            scorer_model=row.get("scorer_model") or "",
            discovery_model=row.get("discovery_model") or "",
            run_id=row.get("run_id") or "",
            # files written before the column existed chose the top candidate
            selected=list(row["selected"])
            if row.get("selected") is not None
            else ([0] if row.get("mask") else []),
        )


def predictions_table(predictions: list[Prediction]) -> pa.Table:
    """Predictions -> Arrow table with exactly ``PREDICTIONS_SCHEMA``."""
    return pa.Table.from_pylist([p.to_row() for p in predictions], schema=PREDICTIONS_SCHEMA)
