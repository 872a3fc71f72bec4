"""Model families through the registry: every tiny VLM preset gives heat maps, the fast attention path (SDPA
everywhere, question-row weights recomputed at the chosen layers) equals eager attention within 1e-4, and each
newer family runs `rea2seg segment` as discovery model and vLLM scorer."""

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as coco

from rea2seg_ray.config import AttentionConfig, ModelsConfig, ScoringConfig
from rea2seg_ray.datasets import read_queries
from rea2seg_ray.discovery.attention import AttentionMapper, register_capture_attention
from rea2seg_ray.models.families import family_of
from rea2seg_ray.models.loading import load_vlm, resolve_model
from rea2seg_ray.models.tiny import TINY_VLM_PRESETS
from rea2seg_ray.records import Candidate
from rea2seg_ray.scoring.scorer import Scorer

from ..conftest import run_cli

DISCOVERY_PRESETS = [n for n in TINY_VLM_PRESETS if not n.endswith("-scorer")]


def _images():
    rng = np.random.default_rng(3)
    # Two sizes in one batch, so the shorter prompt is left-padded and the padding mask matters.
    return [
        rng.integers(0, 255, (200, 300, 3), dtype=np.uint8),
        rng.integers(0, 255, (330, 250, 3), dtype=np.uint8),
    ]


@pytest.mark.parametrize("preset", DISCOVERY_PRESETS)
@pytest.mark.parametrize(
    "attention",
    [
        AttentionConfig(),  # last layer, mean over heads and question tokens
        AttentionConfig(layers=[], head_reduce="max", layer_reduce="max"),  # every layer
        AttentionConfig(layers=[0], query_tokens="last_n", last_n=2),
    ],
    ids=["last-layer", "all-layers-max", "first-layer-last2"],
)
def test_fast_attention_equals_eager(model_cache, preset, attention):
    eager_model, processor = load_vlm(preset, attn_implementation="eager")
    fast_model, fast_processor = load_vlm(preset, attn_implementation=register_capture_attention())
    assert fast_model.config.text_config._attn_implementation != "eager"
    texts = [
        "Which shape is the largest red one?",
        "Segment the thing you would use to open a bottle, please.",
    ]
    eager = AttentionMapper(eager_model, processor, attention)
    fast = AttentionMapper(fast_model, fast_processor, attention)
    assert not eager.fast and fast.fast
    want = eager.heat_maps(_images(), texts)
    got = fast.heat_maps(_images(), texts)
    for w, g in zip(want, got, strict=True):
        assert w.grid.shape == g.grid.shape and (w.height, w.width) == (g.height, g.width)
        assert np.abs(w.grid - g.grid).max() <= 1e-4 * max(1.0, float(np.abs(w.grid).max()))
        assert np.ptp(g.grid) > 0  # structured, not flat


@pytest.mark.parametrize("preset", DISCOVERY_PRESETS)
def test_family_spans_cover_the_image_and_the_question(model_cache, preset):
    model, processor = load_vlm(preset, attn_implementation=register_capture_attention())
    mapper = AttentionMapper(model, processor, AttentionConfig())
    family = family_of(model.config.model_type)
    question = "Where is the blue square?"
    prompt = mapper.adapter.prompt(question)
    inputs = mapper.adapter.encode([_images()[0]], [prompt])
    (span,) = mapper.adapter.spans(inputs)
    gh, gw = span.grid
    assert len(span.image) == gh * gw and np.all(np.diff(span.image) == 1)
    text = processor.tokenizer.decode(inputs["input_ids"][0][span.question])
    assert text.strip() == question, (family.name, text)
    # The grid tiles the processor's resized image: cell size x grid = the resized image's sides.
    ch, cw = mapper.resized_size(span.grid)
    assert ch == gh * family.cell_pixels(model.config) and cw == gw * family.cell_pixels(model.config)


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset,sam,concept",
    [
        ("tiny-qwen3-vl", "tiny-sam3", True),  # + the concept source: SAM 3 segments the MLLM's noun phrases
        ("tiny-internvl3", "tiny-sam2", False),
        ("tiny-llava-onevision", "tiny-sam-hq", False),
        ("tiny-qwen2.5-vl", "tiny-sam", False),
    ],
)
def test_segment_cli_with_a_family_and_a_mask_decoder(ray_driver, scenes_dir, tmp_path, preset, sam, concept):
    """`rea2seg segment` with one VLM preset as discovery model (sdpa attention path) and as vLLM scorer, and a
    transformers mask decoder: ok rows, masks at image size, a provenance record naming the exact weights."""
    rows = [
        {
            "query_id": r["query_id"],
            "image": str(scenes_dir / Path(r["image"]).name),
            "question": r["question"],
        }
        for r in map(json.loads, (scenes_dir / "scenes.jsonl").read_text().splitlines()[:2])
    ]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    concept_args = ["discovery.sources=[attention,concept]", "discovery.concept_threshold=0.0",
                    "discovery.max_candidates=32"]  # fmt: skip
    r = run_cli(
        "segment", f"input={tmp_path / 'two.jsonl'}", f"output={out}", f"models.discovery={preset}",
        f"models.scorer={preset}", f"models.sam={sam}", *(concept_args if concept else []),
        f"ray.address={ray_driver['address']}", "ray.progress_bars=false", "evaluate=false",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    got = pads.dataset(str(out / "predictions"), format="parquet").to_table().to_pylist()
    assert sorted(g["query_id"] for g in got) == sorted(r["query_id"] for r in rows)
    for g in got:
        assert g["status"] == "ok", g["error"]
        assert g["discovery_model"] == preset and g["scorer_model"] == preset
        assert any(c["source"].startswith("attention") for c in g["candidates"])
    if concept:
        assert any(c["source"] == "concept" for g in got for c in g["candidates"])
        m = coco.decode({"size": g["mask"]["size"], "counts": g["mask"]["counts"].encode()})
        assert m.shape == (g["height"], g["width"]) == (240, 320)
    # Provenance: the run's record names the exact weights, and every file it wrote carries the run id and hash.
    (run_id,) = {g["run_id"] for g in got}
    record = json.loads((out / "runs" / f"{run_id}.json").read_text())
    weights = resolve_model(preset) / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["models"]["discovery"]["files"] == {"model.safetensors": digest}
    assert record["models"]["scorer"]["files"] == {"model.safetensors": digest}
    assert record["models"]["sam"]["spec"] == sam and record["config"]["models"]["scorer"] == preset
    assert record["packages"]["transformers"] and record["packages"]["ray"]
    assert ("concept" in record["models"]) == concept
    for f in (out / "predictions").glob("*.parquet"):
        meta = pq.ParquetFile(f).metadata.metadata
        assert meta[b"rea2seg.run_id"].decode() == run_id
        assert meta[b"rea2seg.config_hash"].decode() == record["config_hash"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset", ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-internvl3", "tiny-llava-onevision"]
)
def test_scorer_family_serves_trains_exports_and_reloads_in_vllm(ray_driver, scoring_data, tmp_path, preset):
    """Per scorer family: vLLM and transformers agree within 1e-3; a few steps of `rea2seg finetune` (the family's
    own chat template and turn tokens) export a folder vLLM loads, scoring differently from the base model."""
    root, manifest, _ = scoring_data
    qs = list(read_queries(str(manifest)))[:3]
    images = [np.asarray(Image.open(q.image).convert("RGB")) for q in qs]
    cands = [[Candidate(mask=m, bbox=[0, 0, 0, 0], area=1) for m in q.candidates] for q in qs]

    def scores(backend: str, model: str) -> list[float]:
        got = Scorer(ScoringConfig(backend=backend), ModelsConfig(scorer=model)).score(
            qs, images, copy.deepcopy(cands)
        )
        return [c.score for r in got for c in sorted(r, key=lambda c: c.mask["counts"])]

    base = scores("vllm", preset)
    assert len(base) >= 6 and all(0 <= s <= 1 for s in base)
    assert max(abs(a - b) for a, b in zip(base, scores("hf", preset), strict=True)) < 1e-3

    out = tmp_path / "run"
    r = run_cli(
        "finetune", f"data={root / 'data'}", f"output={out}", f"models.scorer={preset}", "train.max_steps=3",
        "train.num_workers=1", "train.batch_size=4", "train.lr=5e-3", "train.checkpoint_every=3",
        "ray.progress_bars=false", f"ray.address={ray_driver['address']}", timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "trained to step 3" in r.stdout
    tuned = scores("vllm", str(out / "export"))
    assert max(abs(a - b) for a, b in zip(tuned, base, strict=True)) > 1e-3
