"""Every prompt the scorer sees, in one place (scoring and fine-tuning both build them here).

Per-candidate prompts put the original image and the question first and the candidate last, so all candidates of
a query share one prefix that vLLM's prefix cache serves once.
"""

from __future__ import annotations

import json
import re

TEMPLATES = {
    "question": "Question: {question}\n",
    "overlay": "The next image shows the same picture with one candidate region highlighted: everything else is "
    "dimmed and the region is outlined.",
    "overlay_tint": "The next image shows the same picture with one candidate region tinted and outlined.",
    "crop": "The next image is a close-up of one candidate region, outlined.",
    "overlay_only": "The image shows one candidate region highlighted: everything else is dimmed and the region is "
    "outlined.",
    "ask_yesno": "Is the highlighted region the object the question asks for? Answer Yes or No.",
    "ask_numeric": 'How well does the highlighted region answer the question? Reply with JSON {"score": s}, '
    "s between 0 and 1.",
    "comparative": "The image shows {k} candidate regions, outlined and numbered 1 to {k}. Score every candidate "
    'from 0 to 1 for how well it answers the question. Reply with JSON {{"scores": [s1, ..., s{k}]}}.',
    "think": "First think step by step about what the question asks for and whether the region matches it.",
    # Short, so the answer token sits close to the reasoning's last words (a tiny scorer trained from scratch
    # learned to compare them sooner than across a restated question: README, Proving ground).
    "final_yesno": "\nAnswer Yes or No.\n",
    # Training-data reasoning for a candidate that carries a description (e.g. a given candidate's name).
    "describe": "The highlighted region is the {description}.",
    # scoring.candidate_facts: after the candidate image, which extremes of the query's candidates it is (facts.py).
    "facts": "Among the {n} candidates it is {superlatives}.",
    "facts_none": "Among the {n} candidates it is in between in size, form and position.",
    "facts_only": "It is the only candidate.",
    "facts_closest": " It is the closest to {names}.",
    # scoring.facts_relations: fine-tuning reasoning ends by restating the relation the facts give, worded like a
    # "closest to" question's restated criterion ("The question asks for the object closest to the red star."), so
    # the answer follows two sentences that match word for word, as the describe sentence matches a named target.
    "relation": "It is the object closest to {names}.",
    # scoring.select=count: asked once per query, before the top candidates are taken.
    "count": 'How many separate objects does the question ask for? Reply with JSON {{"count": n}}, n from 1 to '
    "{most}.",
}
# Reasoning ends where the final question begins: a model trained on `with_final_question` texts writes that
# question itself, and generation stops there (the scorer appends the exact text before reading Yes/No).
REASONING_STOP = "\nAnswer Yes or No"
assert TEMPLATES["final_yesno"].startswith(REASONING_STOP)

NUMERIC_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["score"],
    "additionalProperties": False,
}


def comparative_schema(k: int) -> dict:
    return {
        "type": "object",
        "properties": {
            "scores": {
                "type": "array",
                "items": {"type": "number", "minimum": 0, "maximum": 1},
                "minItems": k,
                "maxItems": k,
            }
        },
        "required": ["scores"],
        "additionalProperties": False,
    }


ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
         "system": "system"}  # fmt: skip


def dialogue_turns(question) -> list[dict]:
    """A question (str) or a dialogue ([{role, content}]) -> its turns up to and including the last user turn, roles
    normalised (``human`` -> user, ``gpt`` -> assistant): the target is the intent after that turn."""
    if isinstance(question, str):
        return [{"role": "user", "content": question}]
    turns = [{"role": ROLES.get(str(t.get("role") or "user").lower(), "user"), "content": str(t.get("content") or "")}
             for t in question]  # fmt: skip
    users = [i for i, t in enumerate(turns) if t["role"] == "user"]
    return (
        turns[: users[-1] + 1]
        if users
        else [{"role": "user", "content": "\n".join(t["content"] for t in turns)}]
    )


def dialogue_messages(question, head: list[dict], text: str, tail: list[dict]) -> list[dict]:
    """Chat messages for a question or a whole dialogue, roles kept. A question is one user message
    ``[*head, text.format(question=...), *tail]``. In a dialogue the earlier turns are their own messages, ``head``
    (the image) opens the first user turn, so everything before the last turn stays a shared prefix, and the last
    user turn is ``text`` formatted with its content, then ``tail``. Discovery, scoring and training all build
    their prompts here."""
    turns = dialogue_turns(question)
    users = [i for i, t in enumerate(turns) if t["role"] == "user"]
    first, last = users[0], users[-1]
    msgs = []
    for i, t in enumerate(turns):
        if i == last:
            content = [{"type": "text", "text": text.format(question=t["content"].strip())}, *tail]
        else:
            content = [{"type": "text", "text": t["content"]}]
        if i == first:
            content = [*head, *content]
        msgs.append({"role": t["role"], "content": content})
    return msgs


def facts_text(facts) -> str:
    """``facts.CandidateFacts`` -> the sentence said after the candidate image ("Among the 5 candidates it is the
    largest and the leftmost.")."""
    if facts.n < 2:
        return TEMPLATES["facts_only"]
    if not facts.superlatives:
        text = TEMPLATES["facts_none"].format(n=facts.n)
    else:
        text = TEMPLATES["facts"].format(
            n=facts.n, superlatives=spoken_list([f"the {w}" for w in facts.superlatives])
        )
    if facts.closest_to:
        text += TEMPLATES["facts_closest"].format(names=spoken_list([f"the {n}" for n in facts.closest_to]))
    return text


def reasoning_with_relations(reasoning: str, facts) -> str:
    """Training reasoning for a candidate served with relations (``scoring.facts_relations``): the example's
    reasoning, then whose closest candidate it is when the facts say so ("... The highlighted region is the blue
    circle. It is the object closest to the red star."); unchanged without relations. The scorer learns to copy the
    relation from the facts sentence into its reasoning, next to the answer."""
    if not facts.closest_to:
        return reasoning
    relation = TEMPLATES["relation"].format(names=spoken_list([f"the {n}" for n in facts.closest_to]))
    return f"{reasoning} {relation}" if reasoning else relation


def spoken_list(words: list[str]) -> str:
    """['the red star'] -> 'the red star'; ['a', 'b', 'c'] -> 'a, b and c'."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def parse_description(reasoning: str) -> str:
    """What reasoning says the highlighted region is ("... The highlighted region is the red star." -> "red star"),
    in the ``describe`` form a fine-tuned scorer writes; "" when it does not say."""
    prefix, suffix = TEMPLATES["describe"].split("{description}")
    at = (reasoning or "").find(prefix)
    if at < 0:
        return ""
    said = reasoning[at + len(prefix) :]
    end = said.find(suffix)
    return " ".join(said[: end if end >= 0 else len(said)].split()[:4])


def candidate_messages(
    question,
    render: str,
    answer: str = "yesno",
    reasoning: bool = False,
    style: str = "dim",
    show_original: bool = True,
    facts=None,
) -> list[dict]:
    """Chat messages for one candidate: [image, question, what the next image shows + the ask, candidate image,
    and with ``facts`` (``facts.CandidateFacts``) what it is among the query's candidates]. ``question``: the text,
    or a dialogue ([{role, content}], see ``dialogue_messages``). ``show_original=False`` drops the first image (an
    overlay already shows the whole picture, dimmed)."""
    show = TEMPLATES["overlay_tint" if render == "overlay" and style == "tint" else render]
    if not show_original and render == "overlay" and style == "dim":
        show = TEMPLATES["overlay_only"]
    ask = TEMPLATES["ask_numeric" if answer == "numeric" else "ask_yesno"]
    if reasoning:
        ask = f"{ask} {TEMPLATES['think']}"
    # Everything shared by the query's candidates comes before the candidate image, so the cached prefix is as
    # long as it can be; only the candidate image and the turn's closing tokens differ between prompts.
    head = [{"type": "image"}] if show_original else []
    tail = [{"type": "text", "text": f"{show} {ask}\n"}, {"type": "image"}]
    if facts is not None:
        # After the candidate image: the only text that differs between a query's candidates, closest to the answer.
        tail.append({"type": "text", "text": "\n" + facts_text(facts)})
    return dialogue_messages(question, head, TEMPLATES["question"], tail)


def with_final_question(reasoning: str) -> str:
    """Reasoning text (generated or from training data) + the final Yes/No question: the assistant turn up to the
    answer token. Scoring and fine-tuning both build it here, so the model reads the answer after the same text."""
    return reasoning.rstrip() + TEMPLATES["final_yesno"]


def count_schema(most: int) -> dict:
    return {
        "type": "object",
        "properties": {"count": {"type": "integer", "minimum": 1, "maximum": most}},
        "required": ["count"],
        "additionalProperties": False,
    }


def count_messages(question, most: int) -> list[dict]:
    """How many objects the question asks for (``scoring.select=count``): the image, the question, the ask."""
    tail = [{"type": "text", "text": TEMPLATES["count"].format(most=most) + "\n"}]
    return dialogue_messages(question, [{"type": "image"}], TEMPLATES["question"], tail)


def parse_count(text: str, most: int) -> int:
    m = _JSON.search(text or "")
    try:
        n = int(json.loads(m.group(0))["count"]) if m else int(re.search(r"\d+", text or "").group(0))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise AnswerError(f"answer {text[:80]!r} has no count") from e
    return min(most, max(1, n))


def comparative_messages(question, k: int) -> list[dict]:
    tail = [{"type": "image"}, {"type": "text", "text": TEMPLATES["comparative"].format(k=k)}]
    return dialogue_messages(question, [], TEMPLATES["question"], tail)


def render_chat(processor, messages: list[dict], answer: str | None = None) -> str:
    """The model's own chat template; with ``answer`` the assistant turn is appended (fine-tuning targets)."""
    if answer is None:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return processor.apply_chat_template(full, add_generation_prompt=False, tokenize=False)


class AnswerError(ValueError):
    """A model answer that does not parse; becomes a per-candidate error value, never a batch failure."""


_JSON = re.compile(r"\{.*\}", re.S)


def parse_numeric(text: str) -> float:
    m = _JSON.search(text or "")
    if not m:
        raise AnswerError(f"no JSON object in answer {text[:80]!r}")
    try:
        v = float(json.loads(m.group(0))["score"])
    except (ValueError, KeyError, TypeError) as e:
        raise AnswerError(f"answer {text[:80]!r} has no numeric 'score'") from e
    if v != v:  # NaN
        raise AnswerError("score is NaN")
    return min(1.0, max(0.0, v))


def parse_comparative(text: str, k: int) -> list[float]:
    m = _JSON.search(text or "")
    if not m:
        raise AnswerError(f"no JSON object in answer {text[:80]!r}")
    try:
        scores = [float(s) for s in json.loads(m.group(0))["scores"]]
    except (ValueError, KeyError, TypeError) as e:
        raise AnswerError(f"answer {text[:80]!r} has no list of 'scores'") from e
    if len(scores) != k:
        raise AnswerError(f"expected {k} scores, got {len(scores)}")
    return [min(1.0, max(0.0, s)) if s == s else 0.0 for s in scores]
