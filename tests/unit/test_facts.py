"""Candidate facts (scoring.candidate_facts): each candidate's extremes among its query's candidates, the sentence
the scorer reads after the candidate image, and the same sentence in fine-tuning rows."""

import numpy as np
import pytest

from rea2seg_ray.config import ScoringConfig
from rea2seg_ray.scoring.facts import CandidateFacts, candidate_facts, measure
from rea2seg_ray.scoring.prompts import candidate_messages, facts_text

from .scoring_rows import label_scene


def _box(y0, y1, x0, x1, shape=(40, 60)):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_each_extreme_goes_to_the_one_candidate_that_has_it():
    big = _box(2, 30, 2, 30)  # largest, leftmost, topmost
    bar = _box(18, 20, 35, 58)  # thinnest
    small = _box(32, 38, 50, 56)  # smallest, rightmost, lowest
    mid = _box(20, 28, 34, 42)  # no extreme
    facts = candidate_facts([big, bar, small, mid])
    assert [f.superlatives for f in facts] == [
        ["largest", "leftmost", "topmost"],
        ["thinnest"],
        ["smallest", "rightmost", "lowest"],
        [],
    ]
    assert all(f.n == 4 for f in facts)
    area, cx, cy, thin = measure(bar)
    assert (
        area == pytest.approx(2 * 23 / (40 * 60))
        and cx == pytest.approx(46.5 / 60)
        and cy == pytest.approx(19 / 40)
    )
    assert thin == pytest.approx(2 / 23)
    # The facts depend on the masks only, not on their resolution.
    up = [np.kron(m, np.ones((2, 2), bool)) for m in (big, bar, small, mid)]
    assert [f.superlatives for f in candidate_facts(up)] == [f.superlatives for f in facts]


def test_ties_and_a_lone_candidate_state_no_extreme():
    a, b = _box(0, 10, 0, 10), _box(0, 10, 20, 30)  # same size, shape and height
    fa, fb = candidate_facts([a, b])
    assert fa.superlatives == ["leftmost"] and fb.superlatives == ["rightmost"]
    (only,) = candidate_facts([a])
    assert only.superlatives == [] and facts_text(only) == "It is the only candidate."
    assert facts_text(CandidateFacts(5, 0.1, 0.5, 0.5, 0.5, [])) == (
        "Among the 5 candidates it is in between in size, form and position."
    )
    assert facts_text(CandidateFacts(3, 0.1, 0.1, 0.1, 0.5, ["largest", "leftmost", "topmost"])) == (
        "Among the 3 candidates it is the largest, the leftmost and the topmost."
    )
    assert facts_text(CandidateFacts(3, 0.1, 0.1, 0.1, 0.5, ["lowest"])) == (
        "Among the 3 candidates it is the lowest."
    )
    # Round trip through the Arrow struct the training rows carry.
    s = CandidateFacts(3, 0.1, 0.2, 0.3, 0.4, ["lowest"]).to_struct()
    assert CandidateFacts.from_struct(s) == CandidateFacts(3, 0.1, 0.2, 0.3, 0.4, ["lowest"])


def test_the_facts_sentence_follows_the_candidate_image():
    f = CandidateFacts(4, 0.1, 0.1, 0.1, 0.5, ["largest"])
    msgs = candidate_messages(
        "Segment the largest object.", "overlay", reasoning=True, show_original=False, facts=f
    )
    content = msgs[-1]["content"]
    assert [c["type"] for c in content] == ["text", "text", "image", "text"]
    assert content[-1]["text"] == "\nAmong the 4 candidates it is the largest."
    # Without facts the prompt is what it was: the candidate image last.
    plain = candidate_messages("Segment the largest object.", "overlay", reasoning=True, show_original=False)
    assert plain[-1]["content"] == content[:-1]
    with pytest.raises(ValueError, match="candidate_facts needs scoring.mode=per_candidate"):
        ScoringConfig(candidate_facts=True, mode="comparative")


def test_training_rows_carry_facts_measured_against_every_candidate():
    """Negatives balanced away still count: the kept candidate is 'the smallest' of all three found."""
    from rea2seg_ray.masks import encode_rle
    from rea2seg_ray.records import Query

    target, big, other = _box(30, 36, 50, 56), _box(2, 30, 2, 30), _box(5, 20, 35, 50)
    q = Query("q1", "img.png", "Segment the smallest object.", gt_mask=encode_rle(target))
    # One negative per positive: one of the two negatives is dropped.
    out = label_scene(q, [target, big, other], max_neg_per_pos=1)
    assert len(out) == 2
    by_id = {r["example_id"]: r["facts"] for r in out}
    assert by_id["q1#0"]["n"] == 3 and by_id["q1#0"]["superlatives"] == ["smallest", "rightmost", "lowest"]
    assert all(f["n"] == 3 and f["closest_to"] == [] for f in by_id.values())  # no described candidates


def test_fine_tuning_rows_end_with_the_facts_the_scorer_is_served(model_cache):
    from transformers import AutoProcessor

    from rea2seg_ray.datasets import SAMPLE_SCENES, read_queries
    from rea2seg_ray.models.families import family_of_dir
    from rea2seg_ray.models.loading import resolve_model
    from rea2seg_ray.scoring.prompts import render_chat, with_final_question
    from rea2seg_ray.scoring.scorer import model_input_size_fn
    from rea2seg_ray.train.loop import ImageCache, answer_token_ids, collate

    path = resolve_model("tiny-qwen2-vl-scorer")
    proc = AutoProcessor.from_pretrained(path)
    proc.tokenizer.padding_side = "left"
    scfg = ScoringConfig(reasoning=True, show_original=False, candidate_facts=True)
    (q,) = list(read_queries(str(SAMPLE_SCENES / "manifest.jsonl")))[:1]
    facts = CandidateFacts(4, 0.1, 0.2, 0.3, 0.4, ["smallest", "lowest"], ["red star"])
    e = {"image_uri": q.image, "mask": q.candidates[0], "question": q.question, "label": "Yes",
         "reasoning": "The question asks for the smallest object.", "facts": facts.to_struct()}  # fmt: skip
    args = (proc, scfg, model_input_size_fn(path), ImageCache(), answer_token_ids(proc.tokenizer, scfg),
            family_of_dir(path))  # fmt: skip
    # Served without a naming round (scoring.facts_relations=false), whose closest candidate it is goes unsaid.
    inputs, _ = collate([e], *args)
    row = proc.tokenizer.decode(inputs["input_ids"][0][inputs["attention_mask"][0] == 1])
    assert "closest" not in row
    inputs, _ = collate([e], proc, ScoringConfig(reasoning=True, show_original=False, candidate_facts=True,
                                                 facts_relations=True), *args[2:])  # fmt: skip
    row = proc.tokenizer.decode(inputs["input_ids"][0][inputs["attention_mask"][0] == 1])
    served = render_chat(proc, candidate_messages(q.question, "overlay", reasoning=True, show_original=False,
                                                  facts=facts))  # fmt: skip
    pad = "<|image_pad|>"
    # ... and the reasoning it learns to write ends by restating the relation, worded like the question's criterion.
    reasoning = "The question asks for the smallest object. It is the object closest to the red star."
    assert (
        row.replace(pad, "") == served.replace(pad, "") + with_final_question(reasoning) + "Yes<|im_end|>\n"
    )
    assert (
        "Among the 4 candidates it is the smallest and the lowest. It is the closest to the red star."
        in served
    )
    with pytest.raises(ValueError, match="has no `facts`: rebuild the mask-scoring data"):
        collate([{**e, "facts": None}], *args)


def test_named_candidates_say_whose_closest_candidate_each_one_is():
    star, near, far, unnamed = (
        _box(0, 6, 0, 6),
        _box(0, 6, 10, 16),
        _box(30, 36, 50, 56),
        _box(30, 36, 30, 36),
    )
    facts = candidate_facts([star, near, far, unnamed], ["red star", "blue circle", "green bar", ""])
    # The star's closest is `near`, near's is the star, far's is `unnamed`; the unnamed one names nobody.
    assert [f.closest_to for f in facts] == [["blue circle"], ["red star"], [], ["green bar"]]
    assert (
        facts_text(facts[1])
        == "Among the 4 candidates it is in between in size, form and position. It is the closest to the red star."
    )
    two = CandidateFacts(3, 0.1, 0.1, 0.1, 0.5, ["largest"], ["red star", "blue circle"])
    assert facts_text(two) == (
        "Among the 3 candidates it is the largest. It is the closest to the red star and the blue circle."
    )
    # Without names, no relations.
    assert all(f.closest_to == [] for f in candidate_facts([star, near, far]))


def test_what_reasoning_calls_the_highlighted_region():
    from rea2seg_ray.scoring.prompts import parse_description

    said = "The question asks for the largest object. The highlighted region is the red star."
    assert parse_description(said) == "red star"
    assert parse_description("The highlighted region is the blue") == "blue"  # cut short by the token budget
    assert parse_description("I think it is a cat.") == ""
    assert parse_description("") == ""
    with pytest.raises(
        ValueError, match="facts_relations needs scoring.candidate_facts=true and scoring.reasoning"
    ):
        ScoringConfig(facts_relations=True, candidate_facts=True)


class _ScriptedBackend:
    """Stands in for the model only: the first round names each candidate as scripted, the second is recorded."""

    def __init__(self, tokenizer, names):
        self.tokenizer, self.names, self.rounds = tokenizer, names, []

    def generate(self, requests, max_tokens, schema=None, stop=None):
        self.rounds.append([r.prompt for r in requests])
        if len(self.rounds) == 1:
            return [f"The question asks for it. The highlighted region is the {n}." for n in self.names]
        return ["The question asks for the object closest to the red star."] * len(requests)

    def yes_no(self, requests, yes_id, no_id):
        return [0.9 if "It is the closest to the red star" in r.prompt else 0.1 for r in requests]


def test_reasoning_twice_names_the_candidates_then_relates_them(model_cache):
    """scoring.facts_relations: round one's reasoning names each candidate; round two's prompts say whose closest
    candidate each one is, and the answer is read after round two's reasoning."""
    from transformers import AutoTokenizer

    from rea2seg_ray.config import ModelsConfig
    from rea2seg_ray.masks import encode_rle, mask_bbox
    from rea2seg_ray.models.loading import resolve_model
    from rea2seg_ray.records import Candidate, Query
    from rea2seg_ray.scoring.scorer import Scorer

    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-qwen2-vl-scorer"))
    masks = [_box(0, 6, 0, 6), _box(0, 6, 10, 16), _box(30, 36, 50, 56)]  # red star, its neighbour, far away
    be = _ScriptedBackend(tok, ["red star", "blue circle", "green bar"])
    cfg = ScoringConfig(reasoning=True, candidate_facts=True, facts_relations=True, show_original=False)
    s = Scorer(cfg, ModelsConfig(), backend=be)
    cands = [Candidate(mask=encode_rle(m), bbox=mask_bbox(m), area=int(m.sum())) for m in masks]
    q = Query("q", "img", "First find the red star; then segment the object closest to it.")
    (ranked,) = s.score([q], [np.full((40, 60, 3), 128, np.uint8)], [cands])
    first, second = be.rounds
    assert not any("It is the closest" in p for p in first)
    # The star's closest candidate and the bar's is the circle; the circle's is the star.
    assert [p.split("<|vision_end|>")[-1].split("<|im_end|>")[0] for p in second] == [
        "\nAmong the 3 candidates it is the leftmost. It is the closest to the blue circle.",
        "\nAmong the 3 candidates it is in between in size, form and position. It is the closest to the red star and "
        "the green bar.",
        "\nAmong the 3 candidates it is the rightmost and the lowest.",
    ]
    assert ranked[0].mask == cands[1].mask and ranked[0].score == 0.9
    assert ranked[0].reasoning == "The question asks for the object closest to the red star."
