"""GradSAE from the generation's own passes equals decoding and then scoring prompt + prefix."""

from __future__ import annotations

import pytest
import torch

from gradsae.answer import generate_and_score
from gradsae.generate import answer_inputs, generate_batch
from gradsae.objectives import NextTokenProb
from gradsae.scores import ScoreOptions, score_latents
from gradsae.splice import splice
from tests.helpers import CharTokenizer, padded_batch, tiny_lm, tiny_sae


def _sharp_lm():
    lm = tiny_lm(torch.float64, vocab=64, tokenizer=CharTokenizer())
    with torch.no_grad():
        for param in lm.model.parameters():
            if param.ndim == 2:
                param.mul_(20)
    return lm


STEPS = {"prompt": None, "last": lambda g: len(g.token_ids) - 1, "varied": lambda g: len(g.prompt_ids) % 4}


@pytest.mark.parametrize("mode", ["error", "replace"])
@pytest.mark.parametrize("steps", list(STEPS))
@pytest.mark.parametrize("stop", [frozenset(), None])
@pytest.mark.parametrize("skip_first", [True, False])
def test_equals_decode_then_score(mode, steps, stop, skip_first):
    lm, sae = _sharp_lm(), tiny_sae("topk", dtype=torch.float64)
    ids, mask = padded_batch()
    stop = frozenset() if stop is not None else frozenset(range(40, 64))  # some rows stop early
    gens, scores = generate_and_score(
        lm, sae, ids, mask, max_new_tokens=6, step_of=STEPS[steps], layer=0, mode=mode, stop=stop, skip_first=skip_first
    )
    with splice(lm, sae, 0, mode=mode, record=False, skip_first=skip_first):
        expected_gens = generate_batch(lm, ids, mask, max_new_tokens=6, stop=stop)
    assert gens == expected_gens
    chosen = [min(STEPS[steps](g), len(g.token_ids) - 1) if STEPS[steps] else 0 for g in gens]
    a_ids, a_mask = answer_inputs(lm.tokenizer, gens, chosen)
    expected = score_latents(
        lm,
        sae,
        {"input_ids": a_ids, "attention_mask": a_mask},
        NextTokenProb(),
        options=ScoreOptions(layer=0, mode=mode, skip_first=skip_first),
    )
    assert torch.equal(scores.token_index, expected.token_index)
    assert torch.allclose(scores.per_latent, expected.per_latent, rtol=1e-8, atol=1e-14)
    assert torch.allclose(scores.token_score, expected.token_score, rtol=1e-8, atol=1e-14)
    assert torch.allclose(scores.objective, expected.objective, rtol=1e-10)
    assert torch.equal(scores.token, expected.token)
    assert torch.equal(scores.active_last, expected.active_last)
    assert torch.allclose(scores.mean_act, expected.mean_act, rtol=1e-10, atol=1e-14)
    assert scores.per_latent.abs().max() > 0


@pytest.mark.parametrize("mode", ["error", "replace"])
def test_float32_equals_decode_then_score(mode):
    """In float32 (how models run) the scores agree with ``score_latents`` to ~1e-6."""
    lm, sae = tiny_lm(vocab=64, tokenizer=CharTokenizer()), tiny_sae("topk")
    ids, mask = padded_batch()
    gens, scores = generate_and_score(lm, sae, ids, mask, max_new_tokens=5, step_of=STEPS["varied"], layer=0, mode=mode)
    chosen = [min(STEPS["varied"](g), len(g.token_ids) - 1) for g in gens]
    a_ids, a_mask = answer_inputs(lm.tokenizer, gens, chosen)
    expected = score_latents(
        lm,
        sae,
        {"input_ids": a_ids, "attention_mask": a_mask},
        NextTokenProb(),
        options=ScoreOptions(layer=0, mode=mode),
    )
    assert torch.equal(scores.token_index, expected.token_index)
    scale = expected.per_latent.abs().max()
    assert scale > 0
    assert (scores.per_latent - expected.per_latent).abs().max() <= 1e-6 * scale
    assert torch.allclose(scores.objective, expected.objective, rtol=1e-6)
