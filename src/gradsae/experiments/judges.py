"""Judges of steered text: whole-word topic matches and the model's own sentiment judgement.

* :func:`concept_hits`: the words of a text (lower-cased runs of letters, so a
  possessive ``team's`` reads as ``team``) that *equal* one of the concept's listed words.
  The list spells out every inflection that counts (``wedding, weddings``), so a
  prefix never matches: ``sea`` does not match *season*, *search* or *seat*;
  ``team`` does not match *teamwork*.
* :func:`sentiment_probs`: the model, asked the SST-2 question about the text
  (:data:`JUDGE_TEMPLATE`), gives a next-token distribution ``p`` over the whole
  vocabulary. Each label's mass is summed over the first tokens of its casing and
  leading-space variants (:func:`label_variants`: ``positive``, ``Positive``,
  ``POSITIVE``, each with and without a leading space; a token that starts a
  variant of both labels is dropped), so an answer spelled ``Positive`` counts as
  much as ``positive``::

      success = P(label) / (P(positive) + P(negative)),  P(l) = sum_{t in variants(l)} p(t).

  ``P(positive) + P(negative)`` is kept as the label mass: how much of the
  distribution the judge's answer tokens hold.
* :func:`emitted_labels`: what the judge actually emits greedily (its first
  answer word), to check that the variants cover the answers it gives.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from gradsae.generate import chat_text, encode_prompts, generate
from gradsae.models import LoadedModel, position_ids
from gradsae.tasks import classification_template

JUDGE_LABELS = ("negative", "positive")
JUDGE_TEMPLATE = classification_template("Is the sentiment of this review", "Review", JUDGE_LABELS)
"""The SST-2 question of :mod:`gradsae.tasks`, asked about a generated text."""

WORD = re.compile(r"[a-z]+")


def words_of(text: str) -> list[str]:
    """Lower-cased runs of letters of ``text`` (``team's`` -> ``team``, ``s``)."""
    return WORD.findall(text.lower())


def concept_hits(text: str, words: Sequence[str]) -> tuple[int, int]:
    """``(hits, words)``: words of ``text`` equal to a listed concept word, and all its words."""
    found = words_of(text)
    listed = {w.lower().strip() for w in words}
    return sum(1 for w in found if w in listed), len(found)


def label_variants(label: str) -> tuple[str, ...]:
    """Casing and leading-space spellings of an answer label."""
    forms = dict.fromkeys((label.lower(), label.capitalize(), label.upper()))
    return tuple(f"{space}{form}" for form in forms for space in ("", " "))


def variant_tokens(tokenizer: Any, label: str) -> tuple[int, ...]:
    """The first token of each variant of ``label``, each once."""
    out: list[int] = []
    for text in label_variants(label):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if ids and int(ids[0]) not in out:
            out.append(int(ids[0]))
    return tuple(out)


def judge_tokens(tokenizer: Any) -> tuple[tuple[int, ...], ...]:
    """Each label's variant tokens, less any token that starts a variant of the other label too (ambiguous)."""
    sets = [variant_tokens(tokenizer, label) for label in JUDGE_LABELS]
    shared = set(sets[0]) & set(sets[1])
    return tuple(tuple(t for t in ids if t not in shared) for ids in sets)


def judge_prompts(lm: LoadedModel, texts: Sequence[str]) -> list[str]:
    """Each text as the review of the SST-2 question, through the chat template."""
    return [chat_text(JUDGE_TEMPLATE.replace("{prompt}", t.strip()), lm.tokenizer) for t in texts]


@torch.no_grad()
def label_masses(lm: LoadedModel, texts: Sequence[str], *, batch_size: int) -> torch.Tensor:
    """``[len(texts), 2]`` the judge's summed-variant mass on (negative, positive) for each text."""
    tokens = [torch.as_tensor(ids) for ids in judge_tokens(lm.tokenizer)]
    prompts = judge_prompts(lm, texts)
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(lm.tokenizer, prompts[start : start + batch_size])
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        logits = lm.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False, logits_to_keep=1
        ).logits[:, -1]
        probs = logits.double().softmax(-1).cpu()
        out.append(torch.stack([probs[:, t].sum(-1) for t in tokens], dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.float64)


def sentiment_probs(lm: LoadedModel, texts: Sequence[str], label: str, *, batch_size: int) -> list[float]:
    """The judge's ``P(label) / (P(negative) + P(positive))`` for each text (module docstring)."""
    mass = label_masses(lm, texts, batch_size=batch_size)
    share = mass[:, JUDGE_LABELS.index(label)] / mass.sum(-1).clamp(min=1e-300)
    return [float(v) for v in share]


def emitted_labels(lm: LoadedModel, texts: Sequence[str], *, batch_size: int) -> list[str]:
    """The first word the judge emits greedily for each text (lower-cased, stripped)."""
    gens = generate(lm, judge_prompts(lm, texts), max_new_tokens=3, batch_size=batch_size)
    return [(words_of(g.text) or [""])[0] for g in gens]
