"""Mask-scoring labels and balancing; the training prompt is the scoring prompt plus the answer."""

import numpy as np
import pytest

from rea2seg_ray.train.data import balance, label_for


def test_labels_drop_the_ambiguous_band():
    assert label_for(0.9, 0.7, 0.3) == "Yes" and label_for(0.7, 0.7, 0.3) == "Yes"
    assert label_for(0.3, 0.7, 0.3) == "No" and label_for(0.0, 0.7, 0.3) == "No"
    assert label_for(0.5, 0.7, 0.3) is None


def _ex(label, iou):
    return {"label": label, "iou": iou}


def test_balance_keeps_positives_and_hardest_negatives():
    rng = np.random.default_rng(0)
    ex = [_ex("Yes", 0.9), _ex("No", 0.1), _ex("No", 0.25), _ex("No", 0.0), _ex("No", 0.2)]
    out = balance(ex, 1.0, True, rng)
    assert [e["label"] for e in out] == ["Yes", "No"] and out[1]["iou"] == 0.25
    assert len(balance(ex, 2.0, True, rng)) == 3
    assert len(balance(ex, 0, True, rng)) == 5  # 0 keeps everything
    only_neg = [_ex("No", 0.1), _ex("No", 0.2)]
    assert len(balance(only_neg, 1.0, True, rng)) == 1 and balance(only_neg, 1.0, False, rng) == []


def test_training_text_is_the_scoring_prompt_plus_answer(model_cache):
    from transformers import AutoProcessor

    from rea2seg_ray.models.loading import resolve_model
    from rea2seg_ray.scoring.prompts import candidate_messages, render_chat

    proc = AutoProcessor.from_pretrained(resolve_model("tiny-qwen2-vl-scorer"))
    msgs = candidate_messages("the red circle", "overlay")
    prompt = render_chat(proc, msgs)
    full = render_chat(proc, msgs, answer="Yes")
    assert full.startswith(prompt) and full[len(prompt) :] == "Yes<|im_end|>\n"


@pytest.mark.parametrize("label", ["Yes", "No"])
def test_collate_puts_the_only_label_on_the_answer_token(model_cache, label):
    from transformers import AutoProcessor

    from rea2seg_ray.config import ScoringConfig
    from rea2seg_ray.datasets import SAMPLE_SCENES, read_queries
    from rea2seg_ray.models.loading import resolve_model
    from rea2seg_ray.scoring.scorer import model_input_size_fn
    from rea2seg_ray.train.loop import ImageCache, collate

    path = resolve_model("tiny-qwen2-vl-scorer")
    proc = AutoProcessor.from_pretrained(path)
    proc.tokenizer.padding_side = "left"
    qs = list(read_queries(str(SAMPLE_SCENES / "manifest.jsonl")))[:2]
    ex = [
        {
            "image_uri": q.image,
            "mask": q.candidates[0],
            "question": q.question + " please" * i,
            "label": label,
        }
        for i, q in enumerate(qs)
    ]
    ids = {
        "Yes": proc.tokenizer.convert_tokens_to_ids("Yes"),
        "No": proc.tokenizer.convert_tokens_to_ids("No"),
    }
    inputs, labels = collate(ex, proc, ScoringConfig(), model_input_size_fn(path), ImageCache(), ids)
    assert (labels != -100).sum() == 2  # one answer token per example, whatever the prompt lengths
    assert set(labels[labels != -100].tolist()) == {ids[label]}
    assert inputs["input_ids"].shape == labels.shape
