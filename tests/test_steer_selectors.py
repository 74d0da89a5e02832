"""Norm-matched steering vectors and the new selectors, each against an independent hand computation.

* every selector's added vector has the stated norm ``alpha x R`` (measured on the residual, through the splice);
* ``R`` is the median token norm of the block output (first token and padding left out);
* Arad et al.'s output score: a hand hook adds ``amp x max activation x W_dec[c]`` at the last position; the score
  is the rank-weighted probability after minus before (their §3.2), or after alone (their code);
* ΔToken Confidence: a hand hook adds ``(alpha - 1) H[n, c] W_dec[c]`` at every position but the first (the
  latent's coefficient scaled by alpha); the score is ``-log`` of the top-k probabilities, after minus before;
* GradSAE on target positions: dense autograd through a hand hook, restricted to the target-predicting positions.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from gradsae.errors import GradSAEError
from gradsae.experiments.concepts import sweep_edit
from gradsae.generate import encode_prompts, generate_batch
from gradsae.models import LoadedModel, block_output, position_ids
from gradsae.splice import splice
from gradsae.steer import (
    arad_output_scores,
    delta_token_confidence,
    norm_matched_edit,
    residual_norm,
    target_position_influence,
    target_rows,
    token_confidence,
    token_confidence_change,
    top_latents,
)
from tests.helpers import char_lm, tiny_sae

PROMPTS = ["hello there", "a b", "the quick brown fox"]
CODE_PROMPT = "From my experience,"
"""The neutral prompt of Arad et al.'s released code (``src/output_score.py``)."""


def _capture(lm: LoadedModel, layer: int, into: list[torch.Tensor]) -> Any:
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        into.append(block_output(output).detach().clone())

    return lm.layers[layer].register_forward_hook(hook)


def _added(lm: LoadedModel, sae: Any, edit: Any, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Residual after the splice minus before it, for each pass of a short generation, and the edited positions."""
    ids, mask = encode_prompts(lm.tokenizer, PROMPTS)
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    handle = _capture(lm, layer, before)
    try:
        with splice(lm, sae, layer, mode="error", edits=[edit]) as state:
            inner = _capture(lm, layer, after)
            try:
                generate_batch(lm, ids, mask, max_new_tokens=3, stop=frozenset())
            finally:
                inner.remove()
    finally:
        handle.remove()
    return [a.double() - b.double() for a, b in zip(after, before, strict=True)], list(state.valid)


@pytest.mark.parametrize(
    ("latents", "weights"),
    [
        ([3, 17, 40], [0.5, 2.0, 1.25]),  # a set like activation's: modest typical activations
        ([1, 2, 5, 9, 11], [70.0, 69.0, 75.0, 7.0, 15.0]),  # like GradSAE's: generic latents firing ~70
        ([30], [0.01]),  # one weak latent
    ],
)
@pytest.mark.parametrize("norm", [0.5, 3.0])
def test_every_selectors_added_vector_has_the_stated_norm(latents, weights, norm):
    lm, sae, layer = char_lm(dtype=torch.float64), tiny_sae(dtype=torch.float64, d_sae=48, layer=1), 1
    edit = norm_matched_edit(sae, latents, torch.tensor(weights, dtype=torch.float64), norm)
    added, valid = _added(lm, sae, edit, layer)
    direction = torch.tensor(weights, dtype=torch.float64) @ sae.W_dec.detach()[latents]
    for delta, v in zip(added, valid, strict=True):
        at = delta[v]
        assert torch.allclose(at.norm(dim=-1), torch.full((len(at),), norm, dtype=torch.float64), atol=1e-9)
        cosine = (at @ direction) / (at.norm(dim=-1) * direction.norm())
        assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-9)  # the method's own direction
        assert torch.all(delta[~v] == 0)


def test_the_sweep_batch_gives_each_row_block_its_own_norm():
    lm, sae, layer = char_lm(dtype=torch.float64), tiny_sae(dtype=torch.float64, d_sae=48, layer=1), 1
    weights = torch.tensor([3.0, 1.0], dtype=torch.float64)
    norms = [0.25, 1.0, 4.0]
    edit = sweep_edit(sae, [4, 8], weights, norms, rows=1)
    ids, mask = encode_prompts(lm.tokenizer, ["same prompt"] * 3)
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    handle = _capture(lm, layer, before)
    try:
        with splice(lm, sae, layer, mode="error", edits=[edit]) as state:
            inner = _capture(lm, layer, after)
            try:
                generate_batch(lm, ids, mask, max_new_tokens=2, stop=frozenset())
            finally:
                inner.remove()
    finally:
        handle.remove()
    for a, b, v in zip(after, before, state.valid, strict=True):
        got = (a.double() - b.double()).norm(dim=-1)
        for row, norm in enumerate(norms):
            assert torch.allclose(got[row][v[row]], torch.full_like(got[row][v[row]], norm), atol=1e-9)


def test_residual_norm_is_the_median_token_norm_without_the_first_token():
    lm = char_lm()
    got = residual_norm(lm, PROMPTS, layer=1)
    norms = []
    for text in PROMPTS:  # one row at a time: no padding to leave out
        ids, mask = encode_prompts(lm.tokenizer, [text])
        seen: list[torch.Tensor] = []
        handle = _capture(lm, 1, seen)
        with torch.no_grad():
            lm.model(input_ids=ids, attention_mask=mask)
        handle.remove()
        norms += seen[0][0, 1:].norm(dim=-1).tolist()
    assert got == pytest.approx(float(torch.tensor(norms).median()), rel=1e-5)


def _hand_probs(lm: LoadedModel, sae: Any, prompt: str, latent: int | None, amp: float, layer: int) -> torch.Tensor:
    """Next-token distribution with ``amp x max_c h_last[c] x W_dec[latent]`` added at the last position."""
    ids, mask = encode_prompts(lm.tokenizer, [prompt])
    seen: list[torch.Tensor] = []
    handle = _capture(lm, layer, seen)
    with torch.no_grad():
        clean = lm.model(input_ids=ids, attention_mask=mask).logits[0, -1]
    handle.remove()
    if latent is None:
        return clean.double().softmax(-1)
    with torch.no_grad():
        top = float(sae.encode(seen[0][0, -1].to(sae.W_dec.dtype)).max())
    shift = amp * top * sae.W_dec.detach()[latent]

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        z = block_output(output).clone()
        z[:, -1] += shift.to(z.dtype)
        return (z, *output[1:]) if isinstance(output, tuple) else z

    handle = lm.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=ids, attention_mask=mask).logits[0, -1]
    finally:
        handle.remove()
    return logits.double().softmax(-1)


def _hand_top_tokens(lm: LoadedModel, sae: Any, latent: int, k: int) -> list[int]:
    """Logit lens of a decoder row by hand: RMS-normalise, multiply by the final norm's gain, unembed, top k."""
    row = sae.W_dec.detach()[latent].double()
    norm = lm.model.model.norm
    normed = row * torch.rsqrt(row.pow(2).mean() + norm.variance_epsilon) * norm.weight.detach().double()
    logits = lm.model.lm_head.weight.detach().double() @ normed
    return logits.topk(k).indices.tolist()


def _hand_rank_weighted(p: torch.Tensor, tokens: list[int]) -> float:
    """Arad et al.'s ``(1 - rank(l*) / V) p(l*)`` by hand: ``l*`` the most likely of ``tokens``, rank 0 = top."""
    best = max(tokens, key=lambda t: float(p[t]))
    rank = int((p > p[best]).sum())
    return (1 - rank / len(p)) * float(p[best])


def test_arad_output_score_equals_a_hand_computation():
    """S_out = P(after) - P(before) on "In my experience," (the paper's §3.2); the code's variant is P(after) alone."""
    lm, sae, layer = char_lm(dtype=torch.float64), tiny_sae(dtype=torch.float64, d_sae=48, layer=1), 1
    latents = [0, 5, 11, 23, 40]
    got = arad_output_scores(lm, sae, latents, layer=layer, amp=4.0, top_k=5)
    code = arad_output_scores(lm, sae, latents, layer=layer, amp=4.0, top_k=5, prompt=CODE_PROMPT, subtract_prior=False)
    prior = _hand_probs(lm, sae, "In my experience,", None, 4.0, layer)
    priors = []
    for i, c in enumerate(latents):
        tokens = _hand_top_tokens(lm, sae, c, 5)
        after = _hand_rank_weighted(_hand_probs(lm, sae, "In my experience,", c, 4.0, layer), tokens)
        priors.append(_hand_rank_weighted(prior, tokens))
        assert float(got[i]) == pytest.approx(after - priors[-1], rel=1e-6, abs=1e-12)
        code_after = _hand_rank_weighted(_hand_probs(lm, sae, CODE_PROMPT, c, 4.0, layer), tokens)
        assert float(code[i]) == pytest.approx(code_after, rel=1e-6, abs=1e-12)
    assert min(priors) > 1e-3  # the prior term is not negligible here: the test tells the two definitions apart
    assert len(set(got.tolist())) > 1  # the score tells the latents apart


def _hand_scaled_probs(lm: LoadedModel, sae: Any, prompt: str, latent: int | None, factor: float, layer: int) -> Any:
    """Next-token distribution with ``H[n, latent]`` multiplied by ``factor`` at every position but the first."""
    ids, mask = encode_prompts(lm.tokenizer, [prompt])
    seen: list[torch.Tensor] = []
    handle = _capture(lm, layer, seen)
    with torch.no_grad():
        clean = lm.model(input_ids=ids, attention_mask=mask).logits[0, -1]
    handle.remove()
    if latent is None:
        return clean.double().softmax(-1)
    with torch.no_grad():
        h = sae.encode(seen[0][0].to(sae.W_dec.dtype))[:, latent]  # [pos]
    shift = (factor - 1) * h[:, None] * sae.W_dec.detach()[latent]  # error mode: Z + (H' - H) W_dec
    shift[0] = 0  # the splice leaves the first token alone

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        z = block_output(output).clone()
        z[0] += shift.to(z.dtype)
        return (z, *output[1:]) if isinstance(output, tuple) else z

    handle = lm.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=ids, attention_mask=mask).logits[0, -1]
    finally:
        handle.remove()
    return logits.double().softmax(-1)


def _hand_confidence(p: torch.Tensor, k: int) -> float:
    """``C_k(p) = -(1/k) sum of log p over the k largest`` by hand (Wang et al. §4.1)."""
    top = sorted(p.tolist(), reverse=True)[:k]
    return -sum(math.log(v) for v in top) / k


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_delta_token_confidence_equals_a_hand_computation(activation):
    """dC_k = C_k(p with the latent's coefficient x10) - C_k(p) on "From my experience,"; the selector ranks |dC_k|."""
    lm = char_lm(dtype=torch.float64)
    sae, layer = tiny_sae(activation, dtype=torch.float64, d_sae=48, layer=0), 0  # a block with one after it
    ids, mask = encode_prompts(lm.tokenizer, ["From my experience,"])
    seen: list[torch.Tensor] = []
    handle = _capture(lm, layer, seen)
    with torch.no_grad():
        lm.model(input_ids=ids, attention_mask=mask)
    handle.remove()
    h = sae.encode(seen[0][0, 1:].to(sae.W_dec.dtype))
    fires = (h > 0).any(dim=0)
    on, off = fires.nonzero().squeeze(-1).tolist(), (~fires).nonzero().squeeze(-1).tolist()
    latents = [*on[:4], off[0]]  # four that fire on the prefix, one that never does
    assert not bool((h[-1, latents[:4]] > 0).all())  # some fire only before the last position: all positions count
    prior = _hand_scaled_probs(lm, sae, "From my experience,", None, 10.0, layer)
    for k in (1, 3):
        signed = token_confidence_change(lm, sae, latents, layer=layer, k=k)
        score = delta_token_confidence(lm, sae, latents, layer=layer, k=k)
        for i, c in enumerate(latents):
            p = _hand_scaled_probs(lm, sae, "From my experience,", c, 10.0, layer)
            want = _hand_confidence(p, k) - _hand_confidence(prior, k)
            assert float(signed[i]) == pytest.approx(want, rel=1e-6, abs=1e-10)
            assert float(score[i]) == pytest.approx(abs(want), rel=1e-6, abs=1e-10)
        assert float(signed[-1]) == 0.0  # scaling a latent that is 0 everywhere changes nothing
        assert all(abs(v) > 1e-6 for v in signed[:-1].tolist()) and len(set(score.tolist())) == len(latents)
    assert torch.equal(top_latents(score, 2), score.argsort(descending=True, stable=True)[:2])


def test_token_confidence_is_the_mean_negative_log_of_the_top_k():
    p = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    assert token_confidence(p, 1).tolist() == pytest.approx([-math.log(0.5), -math.log(0.25)])
    assert token_confidence(p, 2).tolist() == pytest.approx([-(math.log(0.5) + math.log(0.3)) / 2, -math.log(0.25)])
    with pytest.raises(GradSAEError, match="k"):
        token_confidence(p, 0)


def test_target_position_influence_equals_dense_autograd_on_the_target_positions():
    lm, sae, layer = char_lm(dtype=torch.float64), tiny_sae(dtype=torch.float64, d_sae=48, layer=1), 1
    prompts, targets = ["hi you", "a longer prompt"], ["ok go", "no"]
    got = target_position_influence(lm, sae, prompts, targets, layer=layer)
    ids, mask, lengths = target_rows(lm.tokenizer, prompts, targets)
    total = torch.zeros(48, dtype=torch.float64)
    for row, length in zip(range(len(ids)), lengths, strict=True):
        seq = ids[row][mask[row].bool()][None]
        z_leaf: list[torch.Tensor] = []

        def hook(_module: nn.Module, _inputs: Any, output: Any, into: list[torch.Tensor] = z_leaf) -> Any:
            z = block_output(output).detach().requires_grad_(True)
            into.append(z)
            return (z, *output[1:]) if isinstance(output, tuple) else z

        handle = lm.layers[layer].register_forward_hook(hook)
        try:
            with torch.enable_grad():
                logits = lm.model(input_ids=seq, position_ids=position_ids(torch.ones_like(seq))).logits[0]
                logp = logits[:-1].log_softmax(-1).gather(-1, seq[0, 1:, None]).squeeze(-1)
                logp[-length:].sum().backward()
        finally:
            handle.remove()
        z = z_leaf[0]
        h = sae.encode(z.detach()[0])  # [pos, d_sae]
        g = h * (z.grad[0] @ sae.W_dec.detach().T)  # dY/dH = W_dec . dY/dZ
        n = seq.shape[1]
        total += g[n - 1 - length : n - 1].clamp(min=0).sum(0) / length  # positions predicting target tokens
    want = total / len(lengths)
    assert torch.allclose(got.double(), want, atol=1e-9, rtol=1e-6)
    assert want.abs().sum() > 0
