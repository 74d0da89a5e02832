"""The one logit lens (``gradsae.lens``) against hand computations: RMSNorm's gain folded in (its scale division
changes no ranking, so the top tokens equal those read through the real norm module), LayerNorm centred, Gemma's
``1 + weight``; cards, ``gradsae score`` and the steering selectors all read it."""

from __future__ import annotations

import torch
from torch import nn

from gradsae.lens import final_norm, logit_lens, top_tokens
from gradsae.steer import logit_lens_scores
from tests.helpers import char_lm, tiny_sae


def _with_gain(lm, seed: int = 3) -> torch.Tensor:
    with torch.no_grad():
        lm.model.model.norm.weight.copy_(torch.rand(lm.d_model, generator=torch.Generator().manual_seed(seed)) + 0.5)
    return lm.model.model.norm.weight.detach()


def test_rmsnorm_lens_is_the_gain_folded_and_ranks_as_the_real_norm():
    lm, sae = char_lm(), tiny_sae(d_sae=48, layer=1)
    gain = _with_gain(lm)
    latents = [0, 5, 17, 47]
    got, note = logit_lens(lm, sae, latents)
    w_u = lm.model.lm_head.weight.detach()
    for row, c in enumerate(latents):
        d = sae.W_dec.detach()[c]
        assert torch.allclose(got[row], w_u @ (gain * d), atol=1e-5)
        with torch.no_grad():  # through the real norm module: the rms division is one positive scale per row
            real = lm.model.lm_head(lm.model.model.norm(d[None, None]))[0, 0]
        assert top_tokens(lm, sae, [c], 5)[0].tolist() == real.topk(5).indices.tolist()
    assert "model.norm" in note


def test_layernorm_lens_centres_the_direction_and_drops_the_bias():
    lm, sae = char_lm(), tiny_sae(d_sae=48, layer=1)
    norm = nn.LayerNorm(lm.d_model)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, lm.d_model))
        norm.bias.copy_(torch.linspace(-1, 1, lm.d_model))
    lm.model.model.norm = norm
    assert final_norm(lm.model) == (norm, "model.norm")
    got, note = logit_lens(lm, sae, [3])
    d = sae.W_dec.detach()[3]
    want = lm.model.lm_head.weight.detach() @ (norm.weight.detach() * (d - d.mean()))
    assert torch.allclose(got[0], want, atol=1e-5) and "centred" in note
    tokens = [ord("a"), ord("b")]
    full, _ = logit_lens(lm, sae, range(48))
    assert torch.allclose(logit_lens_scores(lm, sae, tokens), full[:, tokens].mean(-1) - full.mean(-1), atol=1e-5)


def test_gemma_norm_scales_by_one_plus_weight():
    lm, sae = char_lm(), tiny_sae(d_sae=48, layer=1)
    weight = _with_gain(lm) - 0.5

    class GemmaRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(weight.clone())

    lm.model.model.norm = GemmaRMSNorm()
    got, note = logit_lens(lm, sae, [9])
    want = lm.model.lm_head.weight.detach() @ ((1 + weight) * sae.W_dec.detach()[9])
    assert torch.allclose(got[0], want, atol=1e-5) and "1 + weight" in note
