"""Synthetic scenes: deterministic, exact ground truth through LISA's loader, all four categories, bundled copy."""

import json

import numpy as np
from PIL import Image

from rea2seg_ray.datasets import SAMPLE_SCENES, load_ground_truth, read_queries
from rea2seg_ray.datasets.synthetic import CATEGORIES, make_scene, write_scenes
from rea2seg_ray.masks import decode_rle


def test_scene_ground_truth_is_exact_and_reproducible():
    for i, cat in enumerate(CATEGORIES * 3):
        s = make_scene(i, cat, seed=11, width=161, height=97)  # odd sizes on purpose
        obj = s["objects"][s["target"]]
        assert s["image"].shape == (97, 161, 3)
        assert np.array_equal(s["gt"] == 1, obj.visible)
        again = make_scene(i, cat, seed=11, width=161, height=97)
        assert np.array_equal(again["image"], s["image"]) and again["annotation"] == s["annotation"]


def test_written_folder_reads_back_with_exact_masks(tmp_path, scenes_dir):
    qs = list(read_queries(str(scenes_dir)))
    assert len(qs) == 12 and {q.category for q in qs} == set(CATEGORIES)
    manifest = [json.loads(line) for line in (scenes_dir / "scenes.jsonl").read_text().splitlines()]
    by_id = {r["query_id"]: r for r in manifest}
    for q in qs:
        gt = load_ground_truth(q)  # from the LISA JSON, through LISA's rasteriser
        row = by_id[q.query_id]
        assert np.array_equal(gt == 1, decode_rle(row["gt_mask"]))
        # The target is one of the given candidates (every object's visible mask).
        assert any(np.array_equal(gt == 1, decode_rle(c)) for c in row["candidates"])
        assert q.question == row["question"] and q.question


def test_bundled_sample_scenes_match_the_generator(tmp_path):
    out = write_scenes(tmp_path, 16, seed=0, name="manifest")
    assert out.read_text() == (SAMPLE_SCENES / "manifest.jsonl").read_text()
    for p in sorted(SAMPLE_SCENES.glob("*.json")):
        assert json.loads(p.read_text()) == json.loads((tmp_path / p.name).read_text())
        a = np.asarray(Image.open(p.with_suffix(".jpg")), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / p.with_suffix(".jpg").name), dtype=np.int16)
        assert np.abs(a - b).max() <= 2  # JPEG codecs may differ by a level


def test_bundled_dialogues_match_the_generator_and_narrow_down(tmp_path):
    from rea2seg_ray.datasets import DIALOGUE_SAMPLE
    from rea2seg_ray.datasets.synthetic import DIALOGUE

    out = write_scenes(tmp_path, 4, seed=0, categories=[DIALOGUE], name="manifest")
    assert out.read_text() == (DIALOGUE_SAMPLE / "manifest.jsonl").read_text()
    for q in read_queries(str(DIALOGUE_SAMPLE / "manifest.jsonl")):
        roles = [t["role"] for t in q.conversation]
        assert roles[0] == "user" and roles[-1] == "user" and "assistant" in roles and q.category == DIALOGUE
        named = q.meta["reasoning"].removeprefix("The question asks for the ").rstrip(".")
        colour, shape = named.split(" ", 1)
        assert f"It is {colour}." in [t["content"] for t in q.conversation]
        assert load_ground_truth(q).sum() > 0
