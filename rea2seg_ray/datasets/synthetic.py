"""Deterministic synthetic scenes with exact ground truth and ReasonSeg-SGDR-style questions.

Each scene holds 3-6 shapes (circle, square, triangle, ellipse, star, hexagon, diamond, bar) in named colours and
sizes; some overlap (occluded), some are thin bars, some are low-contrast grey. One target is chosen and asked
for by a templated question in one of four categories: discriminative (colour + shape), geometric (size and form
extremes), spatial (position and relations) and multi-step (two facts combined). A fifth kind, multi-target
("Segment all the red shapes."), asks for the two or three objects of one colour; its manifest rows add
``gt_instances`` (one RLE per object) and its ground truth is their union. A sixth, small-target ("Segment the
small red star."), asks for one object 3-5 % of the image's shorter side across. A seventh, dialogue, narrows
down to one object over a conversation (colour, then shape when the colour is shared): its row has a
``conversation`` instead of a ``question``.

Output is a ReasonSeg folder (``<id>.jpg`` + ``<id>.json`` in LISA's format, the target's visible region as
polygons) plus a manifest (``<name>.jsonl``) whose rows also carry ``gt_mask`` (RLE) and ``candidates`` (every
object's visible mask, for the ``given`` discovery source, with ``candidate_descriptions``: each one's colour and
shape) and ``reasoning`` (the target by name); mask-scoring data turns both into reasoning to train on. The
generator checks that LISA's loader reproduces the visible region from the JSON exactly, and resamples a scene when
it would not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..masks import _draw_polygon, encode_rle, shapes_to_mask
from ..scoring.prompts import spoken_list

CATEGORIES = ("discriminative", "geometric", "spatial", "multi-step")
# Questions whose answer is several objects ("all the red shapes"); asked for by name (make-scenes categories=...).
MULTI_TARGET = "multi-target"
# One small object (3-5 % of the image's shorter side across) asked for by colour and shape among larger ones: the
# kind where discovery's coarse-to-fine context pass (discovery.context) has something to zoom into.
SMALL_TARGET = "small-target"
# A progressive dialogue (MIRAS-style) that narrows down to one object: its colour first, then, when the colour is
# shared, its shape. The manifest row has a `conversation` instead of a `question`.
DIALOGUE = "dialogue"
ALL_CATEGORIES = (*CATEGORIES, MULTI_TARGET, SMALL_TARGET, DIALOGUE)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 185),
    "orange": (240, 135, 30),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
LOW_CONTRAST = "grey"  # drawn close to the background
SHAPES = ("circle", "square", "triangle", "ellipse", "star", "hexagon", "diamond", "bar")
BACKGROUND = np.array([128, 128, 128], dtype=np.float64)
# The scene's chain of thought (manifest `reasoning`): what the question asks for, by name when the question names
# it, else by the criterion the question states ("the largest object", "the red object that is not a star"): what a
# reader can tell from the question's words alone. Mask-scoring data puts it before what each candidate is, so a
# scorer trained on it compares the two a fixed distance apart (and, with scoring.candidate_facts, the criterion
# with the candidate's stated extremes).
REASONING = "The question asks for the {target}."


@dataclass
class SceneObject:
    shape: str
    colour: str
    rgb: tuple[int, int, int]
    points: list[list[float]]  # polygon as drawn (vertices truncated to int32 by the rasteriser)
    full_area: int = 0
    visible: np.ndarray | None = None  # (H, W) bool, after occlusion

    @property
    def area(self) -> int:
        return int(self.visible.sum()) if self.visible is not None else 0

    def centroid(self) -> tuple[float, float]:
        ys, xs = np.nonzero(self.visible)
        return float(xs.mean()), float(ys.mean())

    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def _polygon(
    shape: str, cx: float, cy: float, r: float, angle: float, rng: np.random.Generator
) -> np.ndarray:
    def regular(n: int, rot: float, rx: float = r, ry: float = r) -> np.ndarray:
        t = rot + np.arange(n) * 2 * np.pi / n
        return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)

    if shape == "circle":
        return regular(48, 0.0)
    if shape == "ellipse":
        pts = regular(48, 0.0, r, r * 0.55)
    elif shape == "square":
        pts = regular(4, np.pi / 4, r * 0.9, r * 0.9)
    elif shape == "triangle":
        pts = regular(3, -np.pi / 2)
    elif shape == "hexagon":
        pts = regular(6, 0.0)
    elif shape == "diamond":
        pts = regular(4, 0.0, r * 0.7, r)
        return pts
    elif shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        pts = np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], axis=1)
    elif shape == "bar":
        half_w = max(1.5, r * rng.uniform(0.06, 0.12))
        pts = np.array(
            [[cx - r, cy - half_w], [cx + r, cy - half_w], [cx + r, cy + half_w], [cx - r, cy + half_w]]
        )
    else:
        raise ValueError(f"unknown shape {shape}")
    c, s = math.cos(angle), math.sin(angle)
    d = pts - [cx, cy]
    return np.stack([cx + d[:, 0] * c - d[:, 1] * s, cy + d[:, 0] * s + d[:, 1] * c], axis=1)


def _sample_objects(
    rng: np.random.Generator,
    width: int,
    height: int,
    palette: list[str] | None = None,
    small_last: bool = False,
) -> list[SceneObject] | None:
    n = int(rng.integers(3, 7))
    base = min(width, height)
    objs: list[SceneObject] = []
    label = np.zeros((height, width), dtype=np.uint8)
    for k in range(n):
        shape = str(rng.choice(SHAPES))
        if rng.random() < 0.12:
            colour, rgb = (
                LOW_CONTRAST,
                tuple(int(v) for v in BACKGROUND + rng.choice([-1, 1]) * rng.uniform(28, 40)),
            )
        else:
            colour = str(rng.choice(palette or list(COLOURS)))
            rgb = COLOURS[colour]
        r = base * (rng.uniform(0.03, 0.05) if small_last and k == n - 1 else rng.uniform(0.07, 0.2))
        margin = r + 2
        cx = rng.uniform(margin, width - margin)
        cy = rng.uniform(margin, height - margin)
        pts = np.round(_polygon(shape, cx, cy, r, float(rng.uniform(0, np.pi)), rng), 2)
        pts[:, 0] = np.clip(pts[:, 0], 0, width - 1)
        pts[:, 1] = np.clip(pts[:, 1], 0, height - 1)
        tmp = np.zeros_like(label)
        _draw_polygon(tmp, pts.tolist(), 1)
        # Occlusion is allowed but bounded: reject a new shape that would hide most of an earlier one.
        objs.append(SceneObject(shape, colour, rgb, pts.tolist(), full_area=int(tmp.sum())))
        _draw_polygon(label, pts.tolist(), k + 1)
    for k, o in enumerate(objs):
        o.visible = label == k + 1
        if o.area < 40 or o.area < 0.45 * o.full_area:
            return None
        if cv2.connectedComponents(o.visible.astype(np.uint8), connectivity=8)[0] - 1 != 1:
            return None  # split in two by an occluder: ambiguous to describe
    return objs


def _unique(objs: list[SceneObject], key) -> list[int]:
    counts: dict = {}
    for o in objs:
        counts[key(o)] = counts.get(key(o), 0) + 1
    return [i for i, o in enumerate(objs) if counts[key(o)] == 1]


def _extreme(values: list[float], largest: bool, margin: float) -> int | None:
    """Index of a clear extreme: beats the runner-up by ``margin`` (relative for areas, absolute px for positions)."""
    if len(values) < 2:
        return None
    order = np.argsort(values)
    best, second = (order[-1], order[-2]) if largest else (order[0], order[1])
    gap = abs(values[best] - values[second])
    return int(best) if gap >= margin else None


def _question(
    category: str, objs: list[SceneObject], rng: np.random.Generator, width: int
) -> tuple[int | list[int], str | list[dict], str | None] | None:
    """-> (target index or indices, question or dialogue, the criterion the reasoning restates: None to name the
    target(s)), or None when this scene has no such question."""
    uniq_cs = _unique(objs, lambda o: (o.colour, o.shape))
    areas = [float(o.area) for o in objs]
    cents = [o.centroid() for o in objs]
    if category == "discriminative":
        if not uniq_cs:
            return None
        t = int(rng.choice(uniq_cs))
        tmpl = rng.choice(
            [
                "Segment the {n}.",
                "Which object is the {n}?",
                "Find the {n} in this picture.",
                "Where is the {n}?",
            ]
        )
        return t, str(tmpl).format(n=objs[t].name()), None
    if category == "geometric":
        kinds = ["largest", "smallest", "thinnest"]
        for kind in rng.permutation(kinds):
            if kind in ("largest", "smallest"):
                t = _extreme(areas, kind == "largest", margin=0.25 * max(areas))
                if t is not None:
                    return (
                        t,
                        f"Which object covers the {'most' if kind == 'largest' else 'least'} area in the image?"
                        if rng.random() < 0.5
                        else f"Segment the {kind} object.",
                        f"{kind} object",
                    )
            else:
                bars = [i for i, o in enumerate(objs) if o.shape == "bar"]
                if len(bars) == 1:
                    return bars[0], "Segment the long thin object.", "thinnest object"
        return None
    if category == "spatial":
        xs = [c[0] for c in cents]
        ys = [c[1] for c in cents]
        options = [
            ("leftmost", xs, False),
            ("rightmost", xs, True),
            ("topmost", ys, False),
            ("lowest", ys, True),
        ]
        for idx in rng.permutation(len(options)):
            word, vals, largest = options[idx]
            t = _extreme(vals, largest, margin=0.06 * width)
            if t is not None:
                return (
                    t,
                    f"Segment the {word} object in the scene."
                    if rng.random() < 0.5
                    else f"Which shape is {word}?",
                    f"{word} object",
                )
        return None
    if category == "multi-step":
        # "same colour as the X but a different shape" / "the object nearest to the X"
        for ref in rng.permutation(uniq_cs).tolist() if uniq_cs else []:
            ro = objs[ref]
            same = [
                i for i, o in enumerate(objs) if i != ref and o.colour == ro.colour and o.shape != ro.shape
            ]
            if len(same) == 1 and ro.colour != LOW_CONTRAST:
                return (
                    same[0],
                    f"Find the object with the same colour as the {ro.name()} that is not a {ro.shape}.",
                    f"{ro.colour} object that is not a {ro.shape}",
                )
            dists = [math.dist(cents[ref], c) if i != ref else float("inf") for i, c in enumerate(cents)]
            order = np.argsort(dists)
            if len(objs) > 2 and dists[order[1]] - dists[order[0]] > 0.08 * width:
                return (
                    int(order[0]),
                    f"First find the {ro.name()}; then segment the object closest to it.",
                    f"object closest to the {ro.name()}",
                )
        return None
    if category == DIALOGUE:
        named = [i for i in uniq_cs if objs[i].colour != LOW_CONTRAST]
        if not named:
            return None
        t = int(rng.choice(named))
        return t, dialogue(objs, t, rng), None
    if category == SMALL_TARGET:
        t = len(objs) - 1  # drawn last, so never occluded
        if t not in uniq_cs or objs[t].colour == LOW_CONTRAST or objs[t].shape == "bar":
            return None
        tmpl = rng.choice(["Segment the small {n}.", "Where is the little {n}?", "Find the tiny {n}."])
        return t, str(tmpl).format(n=objs[t].name()), None
    if category == MULTI_TARGET:
        # "all the red shapes": a colour that two or three objects share (never the low-contrast grey)
        by_colour: dict[str, list[int]] = {}
        for i, o in enumerate(objs):
            if o.colour != LOW_CONTRAST:
                by_colour.setdefault(o.colour, []).append(i)
        shared = sorted(c for c, idx in by_colour.items() if 2 <= len(idx) <= 3)
        if not shared:
            return None
        colour = str(rng.choice(shared))
        tmpl = rng.choice(["Segment all the {c} shapes.", "Find every {c} object.", "Which objects are {c}?"])
        return by_colour[colour], str(tmpl).format(c=colour), None
    raise ValueError(f"unknown category {category!r} (choose from {', '.join(ALL_CATEGORIES)})")


def dialogue(objs: list[SceneObject], t: int, rng: np.random.Generator) -> list[dict]:
    """A conversation that narrows down to ``objs[t]``: the user wants something, the assistant asks its colour,
    and (when other objects share it) then its shape. Deterministic given ``rng``'s state."""
    o = objs[t]
    opener = str(rng.choice(["I'm looking for something in this picture.", "Can you find an object for me?",
                             "Help me pick out one of these shapes."]))  # fmt: skip
    turns = [{"role": "user", "content": opener}, {"role": "assistant", "content": "Sure. What colour is it?"},
             {"role": "user", "content": f"It is {o.colour}."}]  # fmt: skip
    if sum(x.colour == o.colour for x in objs) > 1:
        turns += [{"role": "assistant", "content": f"There is more than one {o.colour} object. What shape is it?"},
                  {"role": "user", "content": f"The {o.shape}."}]  # fmt: skip
    return turns


def _render(objs: list[SceneObject], width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    grad = (xx / width - 0.5) * rng.uniform(-20, 20) + (yy / height - 0.5) * rng.uniform(-20, 20)
    img = BACKGROUND[None, None, :] + grad[..., None]
    for o in objs:
        img[o.visible] = o.rgb
    img += rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _target_shapes(target: SceneObject) -> list[dict]:
    tmp = np.zeros(target.visible.shape, dtype=np.uint8)
    _draw_polygon(tmp, target.points, 1)
    if np.array_equal(tmp.astype(bool), target.visible):
        return [{"label": "target", "points": target.points, "shape_type": "polygon"}]
    contours, _ = cv2.findContours(target.visible.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [
        {"label": "target", "points": c.reshape(-1, 2).astype(float).tolist(), "shape_type": "polygon"}
        for c in contours
        if len(c) >= 3
    ]


def make_scene(index: int, category: str, seed: int = 0, width: int = 320, height: int = 240) -> dict:
    """One scene: {image (H, W, 3) uint8, annotation (LISA dict), objects, target, gt (H, W) uint8}. Deterministic."""
    rng = np.random.default_rng(
        [seed, index, ALL_CATEGORIES.index(category) if category in ALL_CATEGORIES else 99]
    )
    for _ in range(400):
        # multi-target scenes draw from fewer colours, so that two or three objects share one
        palette = list(rng.choice(list(COLOURS), 3, replace=False)) if category == MULTI_TARGET else None
        objs = _sample_objects(rng, width, height, palette, small_last=category == SMALL_TARGET)
        if objs is None:
            continue
        q = _question(category, objs, rng, width)
        if q is None:
            continue
        t, question, criterion = q
        targets = t if isinstance(t, list) else [t]
        conversation = None
        if isinstance(question, list):  # a dialogue: the LISA JSON's text is its user turns, joined
            conversation = question
            question = " ".join(turn["content"] for turn in conversation if turn["role"] == "user")
        shapes = [s for i in targets for s in _target_shapes(objs[i])]
        gt = shapes_to_mask(shapes, height, width)
        union = np.logical_or.reduce([objs[i].visible for i in targets])
        if not shapes or not np.array_equal(gt == 1, union):
            continue  # LISA's rasteriser would not give back this region exactly: resample
        image = _render(objs, width, height, rng)
        anno = {
            "text": [question],
            "is_sentence": category == "multi-step",
            "category": category,
            "shapes": shapes,
            "objects": [{"shape": o.shape, "colour": o.colour, "area": o.area} for o in objs],
            "target_index": targets[0],
        }
        if len(targets) > 1:
            anno["target_indices"] = targets  # multi-target: every object the question asks for
        scene = {"image": image, "annotation": anno, "objects": objs, "target": targets[0], "targets": targets,
                 "gt": gt, "criterion": criterion}  # fmt: skip
        if conversation is not None:
            scene["conversation"] = conversation
        return scene
    raise RuntimeError(f"could not make a valid {category} scene for index {index} (seed {seed})")


def _names(objs: list[SceneObject]) -> str:
    """'red star' / 'red star and red circle' / 'red star, red circle and red bar'."""
    return spoken_list([o.name() for o in objs])


def write_scenes(
    output: str | Path,
    n: int,
    seed: int = 0,
    width: int = 320,
    height: int = 240,
    categories: tuple[str, ...] | list[str] = CATEGORIES,
    name: str = "scenes",
) -> Path:
    """Write ``n`` scenes (categories round-robin) as a ReasonSeg folder plus ``<name>.jsonl``. Returns the manifest."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        category = categories[i % len(categories)]
        scene = make_scene(i, category, seed=seed, width=width, height=height)
        stem = f"scene-{seed}-{i:05d}"
        Image.fromarray(scene["image"]).save(out / f"{stem}.jpg", quality=95)
        (out / f"{stem}.json").write_text(json.dumps(scene["annotation"]))
        rows.append(
            {
                "query_id": stem,
                "image": f"{stem}.jpg",
                "question": scene["annotation"]["text"][0],
                "category": category,
                "gt_json": f"{stem}.json",
                "gt_mask": encode_rle(scene["gt"] == 1),
                "candidates": [encode_rle(o.visible) for o in scene["objects"]],
                "candidate_descriptions": [o.name() for o in scene["objects"]],
                "reasoning": REASONING.format(
                    target=scene["criterion"] or _names([scene["objects"][i] for i in scene["targets"]])
                ),
            }
        )
        if "conversation" in scene:
            rows[-1]["conversation"] = scene["conversation"]
            del rows[-1]["question"]
        if len(scene["targets"]) > 1:
            rows[-1]["gt_instances"] = [encode_rle(scene["objects"][i].visible) for i in scene["targets"]]
    manifest = out / f"{name}.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest
