"""Every mask decoder (segment-anything's SAM; SAM 2.1, SAM-HQ and SAM 3 through transformers) behind one prompt
interface: the kind is read from the folder, one image embedding serves every prompt, prompts are batched, and masks
come back at the original image size."""

import numpy as np
import pytest
import torch

from rea2seg_ray.discovery.sam_prompts import HFSamPrompter, SamPrompter, load_prompter
from rea2seg_ray.models.loading import resolve_model
from rea2seg_ray.models.mask_decoders import mask_decoder_kind

DECODERS = {"tiny-sam": None, "tiny-sam2": "sam2.1", "tiny-sam-hq": "sam-hq", "tiny-sam3": "sam3"}


@pytest.mark.parametrize("preset", list(DECODERS))
def test_one_interface_for_every_mask_decoder(model_cache, preset, monkeypatch):
    kind = mask_decoder_kind(resolve_model(preset))
    assert (kind.name if kind else None) == DECODERS[preset]
    prompter = load_prompter(preset, "cpu", torch.float32)
    assert isinstance(prompter, SamPrompter if kind is None else HFSamPrompter)
    prompter.prompt_batch = 3  # 5 points -> two decoder calls
    rng = np.random.default_rng(1)
    images = [
        rng.integers(0, 255, (240, 320, 3), dtype=np.uint8),
        rng.integers(0, 255, (300, 200, 3), dtype=np.uint8),
    ]
    embs = prompter.embed(images, batch_size=2)
    assert [e.original_size for e in embs] == [(240, 320), (300, 200)]
    # Prompts reuse the embedding: no encoder call after embed().
    encoder = prompter.model if kind else prompter.sam.image_encoder
    name = "get_image_embeddings" if kind else "forward"
    monkeypatch.setattr(encoder, name, lambda *a, **k: pytest.fail("image encoded again"))
    for emb, (h, w) in zip(embs, [(240, 320), (300, 200)], strict=True):
        pts = [(10.0, 20.0), (w / 2, h / 2), (w - 5.0, h - 5.0), (30.0, h - 30.0), (w / 3, h / 4)]
        masks = prompter.predict_points(emb, pts, negatives=[(1.0, 1.0)])
        masks += prompter.predict_boxes(emb, [[5, 5, w / 2, h / 2], [w / 3, h / 3, w - 1, h - 1]])
        masks += prompter.predict_grid(emb, 2)
        masks += prompter.predict_box_and_points(emb, [0, 0, w - 1, h - 1], [(w / 2, h / 2)])
        assert len(masks) == 5 + 2 + 4 + 1
        for m in masks:
            assert m.mask.shape == (h, w) and m.mask.dtype == bool and np.isfinite(m.iou)
        assert any(m.mask.any() for m in masks)


def test_sam_image_encoder_through_sdpa_equals_segment_anything(model_cache):
    """The SDPA image encoder (relative positions as the additive mask) computes segment_anything's function."""
    from rea2seg_ray.models.loading import load_sam
    from rea2seg_ray.models.sam import use_sdpa

    sam = load_sam("tiny-sam")
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if "rel_pos" in name:  # non-zero relative positions, so the mask matters
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
        x = torch.randn(2, 3, 512, 512, generator=torch.Generator().manual_seed(0))
        want = sam.image_encoder(x)
        got = use_sdpa(sam).image_encoder(x)
    assert got.shape == want.shape and float((got - want).abs().max()) < 1e-4


def test_a_detector_only_sam3_checkpoint_is_refused_by_name(tmp_path):
    """A SAM 3 detector-only folder has no tracker weights: refusing it beats a silently random mask decoder."""
    (tmp_path / "config.json").write_text('{"model_type": "sam3"}')
    with pytest.raises(ValueError, match="'sam3' is not a supported mask decoder.*sam3_video"):
        mask_decoder_kind(tmp_path)


def test_concept_source_adds_sam3_instances_of_the_mllms_phrases(model_cache, monkeypatch):
    """Source `concept`: the MLLM's noun phrases go to SAM 3 (each distinct image encoded once) and every instance
    over the threshold joins the candidates, at image size."""
    from rea2seg_ray.config import DiscoveryConfig, ModelsConfig
    from rea2seg_ray.discovery.discoverer import Discoverer
    from rea2seg_ray.records import Query

    d = Discoverer(
        DiscoveryConfig(sources=["attention", "concept"], concept_threshold=0.0, max_candidates=64),
        ModelsConfig(discovery="tiny-qwen3-vl", sam="tiny-sam3"),
    )
    monkeypatch.setattr(
        d.mapper, "generate_text", lambda images, *a, **k: ["the red circle, a cup"] * len(images)
    )
    encoded = []
    real_embed = d.concept.embed
    monkeypatch.setattr(d.concept, "embed", lambda im: encoded.append(im.shape) or real_embed(im))
    rng = np.random.default_rng(2)
    shared, other = (
        rng.integers(0, 255, (240, 320, 3), np.uint8),
        rng.integers(0, 255, (200, 260, 3), np.uint8),
    )
    qs = [Query("a", "x", "the red circle"), Query("b", "x", "a cup"), Query("c", "y", "the red circle")]
    results = d.discover(qs, [shared, shared, other])
    assert encoded == [(240, 320, 3), (200, 260, 3)]  # one SAM 3 encoding per distinct image
    assert d.counts["concept_phrases"] == 6
    for r, (h, w) in zip(results, [(240, 320), (240, 320), (200, 260)], strict=True):
        concept = [c for c in r if c.source == "concept"]
        assert concept and all(c.mask["size"] == [h, w] for c in concept)
