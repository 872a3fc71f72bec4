"""Mask-scoring labels and balancing; the training prompt is the scoring prompt plus the answer."""

import numpy as np
import pytest

from rea2seg_ray.train.data import balance, label_for

from .scoring_rows import label_scene


def test_labels_drop_the_ambiguous_band():
    assert label_for(0.9, 0.7, 0.3) == "Yes" and label_for(0.7, 0.7, 0.3) == "Yes"
    assert label_for(0.3, 0.7, 0.3) == "No" and label_for(0.0, 0.7, 0.3) == "No"
    assert label_for(0.5, 0.7, 0.3) is None


def _ex(label, iou, example_id="q#0"):
    return {"label": label, "iou": iou, "example_id": example_id}


def test_balance_keeps_positives_and_hardest_negatives():
    rng = np.random.default_rng(0)
    ex = [_ex("Yes", 0.9), _ex("No", 0.1), _ex("No", 0.25), _ex("No", 0.0), _ex("No", 0.2)]
    out = balance(ex, 1.0, True, rng)
    assert [e["label"] for e in out] == ["Yes", "No"] and out[1]["iou"] == 0.25
    assert len(balance(ex, 2.0, True, rng)) == 3
    assert len(balance(ex, 0, True, rng)) == 5  # 0 keeps everything
    # Among negatives of equal IoU, the one the question names comes first.
    tied = [_ex("Yes", 1.0)] + [_ex("No", 0.0, f"q#{k}") for k in range(1, 5)]
    assert all(
        balance(tied, 1.0, True, np.random.default_rng(s), {"q#3"})[1]["example_id"] == "q#3"
        for s in range(8)
    )
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
    from rea2seg_ray.models.families import family_of_dir
    from rea2seg_ray.models.loading import resolve_model
    from rea2seg_ray.scoring.scorer import model_input_size_fn
    from rea2seg_ray.train.loop import ImageCache, answer_token_ids, collate

    path = resolve_model("tiny-qwen2-vl-scorer")
    proc = AutoProcessor.from_pretrained(path)
    proc.tokenizer.padding_side = "left"
    ex = _sample_examples(2, label=label)
    ex[1]["question"] += " please"  # prompts of different lengths
    ids = answer_token_ids(proc.tokenizer, ScoringConfig())
    inputs, labels = collate(
        ex, proc, ScoringConfig(), model_input_size_fn(path), ImageCache(), ids, family_of_dir(path)
    )
    assert (labels != -100).sum() == 2  # one answer token per example, whatever the prompt lengths
    assert set(labels[labels != -100].tolist()) == {ids[label]}
    assert inputs["input_ids"].shape == labels.shape


def _sample_examples(n, **extra):
    from rea2seg_ray.datasets import SAMPLE_SCENES, read_queries

    qs = list(read_queries(str(SAMPLE_SCENES / "manifest.jsonl")))[:n]
    return [{"image_uri": q.image, "mask": q.candidates[0], "question": q.question, **extra} for q in qs]


def test_collate_with_reasoning_trains_the_turn_the_scorer_is_served(model_cache):
    """scoring.reasoning: the row is the scorer's think-first prompt + reasoning + final question + answer, and the
    loss covers exactly that assistant turn (so the model learns to write the reasoning, then to answer)."""
    from transformers import AutoProcessor

    from rea2seg_ray.config import ScoringConfig
    from rea2seg_ray.models.families import family_of_dir
    from rea2seg_ray.models.loading import resolve_model
    from rea2seg_ray.scoring.prompts import candidate_messages, render_chat, with_final_question
    from rea2seg_ray.scoring.scorer import model_input_size_fn
    from rea2seg_ray.train.loop import ImageCache, answer_token_ids, collate

    path = resolve_model("tiny-qwen2-vl-scorer")
    proc = AutoProcessor.from_pretrained(path)
    proc.tokenizer.padding_side = "left"
    scfg = ScoringConfig(reasoning=True, show_original=False)
    ex = _sample_examples(3)
    for e, (why, label) in zip(
        ex,
        [("The highlighted region is the red circle.", "Yes"), ("", "No"), ("It is the blue bar.", "No")],
        strict=True,
    ):
        e.update(reasoning=why, label=label)
    inputs, labels = collate(
        ex, proc, scfg, model_input_size_fn(path), ImageCache(), answer_token_ids(proc.tokenizer, scfg),
        family_of_dir(path),
    )  # fmt: skip
    tok = proc.tokenizer
    for i, e in enumerate(ex):
        trained = tok.decode(labels[i][labels[i] != -100])
        # Trained from the first token after the assistant header, which the served prompt already ends with.
        assert trained == with_final_question(e["reasoning"]) + e["label"]
        served = render_chat(
            proc, candidate_messages(e["question"], "overlay", reasoning=True, show_original=False)
        )
        row = tok.decode(inputs["input_ids"][i][inputs["attention_mask"][i] == 1])
        # The served think-first prompt (image placeholders aside: the processor expands them), then the turn.
        pad = "<|image_pad|>"
        turn = with_final_question(e["reasoning"]) + e["label"] + "<|im_end|>\n"
        assert row.replace(pad, "") == served.replace(pad, "") + turn and "step by step" in served
    # Without scoring.reasoning the reasoning column is ignored: one answer token per row.
    _, plain = collate(ex, proc, ScoringConfig(show_original=False), model_input_size_fn(path), ImageCache(),
                       answer_token_ids(tok, scfg), family_of_dir(path))  # fmt: skip
    assert (plain != -100).sum() == 3


def test_candidates_with_descriptions_become_reasoning():
    from rea2seg_ray.masks import encode_rle
    from rea2seg_ray.records import Query

    h, w = 40, 60
    target, other, stray = (np.zeros((h, w), bool) for _ in range(3))
    target[5:20, 5:25], other[25:38, 30:55], stray[0:4, 50:60] = True, True, True
    nearly = target.copy()
    nearly[5, 5:25] = False  # IoU 0.93 with the described target: inherits its description
    q = Query(
        "q1", "img.png", "Segment the red square.", gt_mask=encode_rle(target),
        candidates=[encode_rle(target), encode_rle(other)],
        meta={"candidate_descriptions": ["red square", "blue circle"], "reasoning": "Squares have four corners."},
    )  # fmt: skip
    out = label_scene(q, [nearly, other, stray])
    why = {r["example_id"]: (r["label"], r["reasoning"]) for r in out}
    assert why == {
        "q1#0": ("Yes", "Squares have four corners. The highlighted region is the red square."),
        "q1#1": ("No", "Squares have four corners. The highlighted region is the blue circle."),
        "q1#2": ("No", "Squares have four corners."),  # matches no described candidate
    }


def test_export_records_the_prompt_settings_to_serve_with():
    from rea2seg_ray.config import FinetuneConfig, load_config
    from rea2seg_ray.train.trainer import serving_overrides

    cfg = load_config(
        FinetuneConfig, None, ["data=d", "output=o", "scoring.reasoning=true", "scoring.show_original=false"]
    )
    assert serving_overrides(cfg) == {"show_original": False, "reasoning": True}
    assert serving_overrides(load_config(FinetuneConfig, None, ["data=d", "output=o"])) == {}


def test_each_instance_of_a_multi_object_answer_is_a_yes():
    """With gt_instances a candidate is labelled by the instance it overlaps best: one of several red shapes is a
    right answer (its IoU with the union alone would make it a No); the conversation rides along."""
    from rea2seg_ray.masks import encode_rle
    from rea2seg_ray.records import Query

    h, w = 40, 60
    a, b, c = (np.zeros((h, w), bool) for _ in range(3))
    a[2:12, 2:12], b[20:30, 30:40], c[30:38, 2:10] = True, True, True
    conv = [{"role": "user", "content": "Shapes?"}, {"role": "assistant", "content": "Which?"},
            {"role": "user", "content": "All the red ones."}]  # fmt: skip
    q = Query("m1", "img.png", conversation=conv, gt_instances=[encode_rle(a), encode_rle(b)])
    out = label_scene(q, [a, b, c])
    assert {r["example_id"]: (r["label"], r["iou"]) for r in out} == {
        "m1#0": ("Yes", 1.0), "m1#1": ("Yes", 1.0), "m1#2": ("No", 0.0)}  # fmt: skip
    assert out[0]["conversation"] == conv


def test_the_negative_a_question_names_is_kept():
    """'closest to the red star': of the wrong candidates (all IoU 0) the red star is the one kept, so the scorer
    learns that the named object is not the answer."""
    from rea2seg_ray.masks import encode_rle
    from rea2seg_ray.records import Query

    h, w = 40, 60
    masks = [np.zeros((h, w), bool) for _ in range(4)]
    for m, x in zip(masks, (2, 16, 30, 44), strict=True):
        m[10:20, x : x + 10] = True
    for qid in ("q1", "q2", "q3", "q4", "q5", "q6"):  # the random tie-break is seeded by the query id
        q = Query(
            qid, "img.png", "First find the red star; then segment the object closest to it.",
            gt_mask=encode_rle(masks[1]), candidates=[encode_rle(m) for m in masks],
            meta={"candidate_descriptions": ["blue circle", "green square", "white bar", "red star"]},
        )  # fmt: skip
        out = label_scene(q, masks, max_neg_per_pos=1)
        assert [(r["example_id"], r["label"]) for r in out] == [(f"{qid}#1", "Yes"), (f"{qid}#3", "No")]
