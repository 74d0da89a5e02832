"""Judges of steered text (whole listed words; the sentiment judge summed over spellings) and the paired tests."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gradsae.experiments.judges import (
    JUDGE_LABELS,
    concept_hits,
    judge_prompts,
    judge_tokens,
    label_masses,
    label_variants,
    sentiment_probs,
    variant_tokens,
)
from gradsae.experiments.stats import holm, mcnemar, paired_p, sign_flip_p
from gradsae.generate import encode_prompts
from tests.helpers import char_lm


@pytest.mark.parametrize(
    ("text", "words", "hits"),
    [
        ("The season of search: take a seat.", ["sea", "seas"], 0),  # a prefix never matches
        ("Good teamwork wins.", ["team", "teams"], 0),
        ("The sea, the Sea! Two seas.", ["sea", "seas"], 3),
        ("Our team's coach and both teams.", ["team", "teams"], 2),  # the possessive reads as the word
        ("A seaside walk by the SEASHORE", ["sea", "seaside", "seashore"], 2),
        ("Married in May; the marriage lasted.", ["married", "marriage"], 2),
        ("They marry.", ["married"], 0),  # only listed inflections count
    ],
)
def test_whole_word_matches_on_tricky_words(text, words, hits):
    assert concept_hits(text, words)[0] == hits


def test_label_variants_cover_casing_and_leading_space():
    assert set(label_variants("positive")) == {
        "positive",
        " positive",
        "Positive",
        " Positive",
        "POSITIVE",
        " POSITIVE",
    }


def test_ambiguous_variant_tokens_are_dropped():
    lm = char_lm()  # one token per character: " positive" and " negative" both start with " "
    neg, pos = judge_tokens(lm.tokenizer)
    assert ord(" ") not in neg and ord(" ") not in pos
    assert set(pos) == {ord("p"), ord("P")} and set(neg) == {ord("n"), ord("N")}
    assert set(variant_tokens(lm.tokenizer, "positive")) == {ord("p"), ord(" "), ord("P")}


def test_sentiment_is_the_label_share_of_the_summed_variant_mass():
    lm = char_lm(dtype=torch.float64)
    texts = ["what a day", "bad", "a longer review of the film"]
    got = sentiment_probs(lm, texts, "positive", batch_size=2)
    masses = label_masses(lm, texts, batch_size=2)
    for i, prompt in enumerate(judge_prompts(lm, texts)):
        ids, mask = encode_prompts(lm.tokenizer, [prompt])
        with torch.no_grad():
            p = lm.model(input_ids=ids, attention_mask=mask).logits[0, -1].double().softmax(-1)
        pos = float(p[ord("p")] + p[ord("P")])  # by hand: the spellings' first characters
        neg = float(p[ord("n")] + p[ord("N")])
        assert float(masses[i, JUDGE_LABELS.index("positive")]) == pytest.approx(pos, rel=1e-9)
        assert float(masses[i, JUDGE_LABELS.index("negative")]) == pytest.approx(neg, rel=1e-9)
        assert got[i] == pytest.approx(pos / (pos + neg), rel=1e-9)


@pytest.mark.slow
def test_real_judge_reads_the_labels_it_emits():
    """SmolLM2: every spelling the judge emits is among the summed variants, which hold real mass."""
    from gradsae.experiments.concepts import CONCEPTS, judge_check
    from gradsae.experiments.results import SteerConfig
    from gradsae.models import load_model

    lm = load_model()
    check = judge_check(lm, CONCEPTS["positive"], SteerConfig())
    assert check["emitted_covered"] == 1.0 and check["label_mass"] > 0.2
    assert check["p_texts"] > check["p_negatives"]
    assert len(judge_tokens(lm.tokenizer)[1]) >= 4  # positive, Positive, " positive", " Positive" are distinct tokens


# -- paired tests ------------------------------------------------------------------------------------------------
def mcnemar_exact(b: int, c: int) -> float:
    """McNemar's p from discordant counts, through the one implementation (pairs made to order)."""
    return mcnemar([1.0] * b + [0.0] * c, [0.0] * b + [1.0] * c).p


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(1, 6) == pytest.approx(2 * (1 + 7) / 128)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_sign_flip_is_exact_enumeration_and_mcnemar_on_binary_outcomes():
    diffs = [0.5, 0.2, -0.1, 0.4, 0.3, 0.0]
    nonzero = [d for d in diffs if d]
    patterns = list(itertools.product((1, -1), repeat=len(nonzero)))
    observed = abs(sum(nonzero))
    want = sum(abs(sum(s * d for s, d in zip(p, nonzero, strict=True))) >= observed - 1e-12 for p in patterns)
    assert sign_flip_p(diffs) == pytest.approx(want / len(patterns))
    a = [1, 1, 1, 1, 1, 0, 0, 1]
    b = [0, 0, 0, 0, 1, 0, 1, 1]
    p, test = paired_p([float(x) for x in a], [float(x) for x in b])
    assert test == "McNemar exact" and p == pytest.approx(mcnemar_exact(4, 1))
    assert sign_flip_p([x - y for x, y in zip(a, b, strict=True)]) == pytest.approx(p)
    assert paired_p([0.5, 0.7], [0.1, 0.2])[1] == "sign-flip"


def test_sign_flip_monte_carlo_for_many_pairs():
    diffs = [0.1 * (i % 3 - 0.5) for i in range(40)]
    p = sign_flip_p(diffs, seed=1, resamples=4000)
    assert 0 < p <= 1 and p == sign_flip_p(diffs, seed=1, resamples=4000)
    assert sign_flip_p([1.0] * 30, resamples=2000) == pytest.approx(1 / 2001)


def test_holm_by_hand():
    got = holm([0.01, 0.04, 0.03, 0.5])
    assert got == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([]) == [] and all(0 <= q <= 1 for q in holm([0.9, 0.8, 0.7]))
    assert not math.isnan(holm([0.0])[0])
