"""Steering primitives: the add edit is exactly alpha x decoder row; each scorer returns K distinct latents."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from gradsae.experiments.results import Concept
from gradsae.generate import encode_prompts, generate_batch
from gradsae.lens import folded_gain
from gradsae.models import LoadedModel, block_output
from gradsae.splice import splice
from gradsae.steer import (
    latent_scales,
    logit_lens_scores,
    random_latents,
    steering_edit,
    steering_vector,
    target_rows,
    top_latents,
    typical_activation,
)
from tests.helpers import char_lm, tiny_sae

PROMPTS = ["hello there", "a b", "the quick brown fox"]
LATENTS = [3, 17, 40]


def _capture(lm: LoadedModel, layer: int, into: list[torch.Tensor]) -> Any:
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        into.append(block_output(output).detach().clone())

    return lm.layers[layer].register_forward_hook(hook)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_add_edit_is_alpha_times_decoder_rows_at_every_position_and_step(dtype, atol):
    lm, sae, layer = char_lm(dtype=dtype), tiny_sae(dtype=dtype, d_sae=48, layer=1), 1
    scales = torch.tensor([0.5, 2.0, 1.25])
    edit = steering_edit(LATENTS, 3.0, scales)
    expected = 3.0 * (scales.to(dtype)[:, None] * sae.W_dec.detach()[LATENTS]).sum(0)
    assert torch.allclose(steering_vector(sae, LATENTS, 3.0, scales), expected, atol=atol, rtol=0)
    ids, mask = encode_prompts(lm.tokenizer, PROMPTS)
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    handle = _capture(lm, layer, before)  # registered first: sees the block's own output
    try:
        with splice(lm, sae, layer, mode="error", edits=[edit]) as state:
            inner = _capture(lm, layer, after)  # registered after the splice: sees its output
            try:
                generate_batch(lm, ids, mask, max_new_tokens=5, stop=frozenset())
            finally:
                inner.remove()
    finally:
        handle.remove()
    assert [z.shape[1] for z in before] == [ids.shape[1], 1, 1, 1, 1]  # prompt pass + 4 cached steps
    for z, z_edit, valid in zip(before, after, state.valid, strict=True):
        added = z_edit.double() - z.double()
        want = valid[..., None].double() * expected.double()
        assert torch.allclose(added, want, atol=atol, rtol=0)
    assert not state.valid[0][:, 0].any()  # the first token (and padding) is never edited
    assert all(v.all() for v in state.valid[1:])  # every generated token is


def test_unedited_error_splice_leaves_the_residual_bit_for_bit():
    lm, sae = char_lm(), tiny_sae(d_sae=48, layer=1)
    ids, mask = encode_prompts(lm.tokenizer, PROMPTS)
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    handle = _capture(lm, 1, before)
    try:
        with splice(lm, sae, 1, mode="error", edits=[steering_edit(LATENTS, 0.0, torch.ones(3))]):
            inner = _capture(lm, 1, after)
            try:
                generate_batch(lm, ids, mask, max_new_tokens=3, stop=frozenset())
            finally:
                inner.remove()
    finally:
        handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_logit_lens_score_equals_a_hand_computation():
    lm, sae = char_lm(), tiny_sae(d_sae=48, layer=1)
    with torch.no_grad():
        lm.model.model.norm.weight.copy_(torch.rand(16, generator=torch.Generator().manual_seed(3)) + 0.5)
    tokens = [ord("w"), ord("e"), ord("d")]
    got = logit_lens_scores(lm, sae, tokens)
    gain = lm.model.model.norm.weight.detach()
    unembed = lm.model.lm_head.weight.detach()
    for c in range(sae.cfg.d_sae):
        logits = unembed @ (gain * sae.W_dec.detach()[c])  # [vocab]: the direction through the final norm's gain
        want = logits[tokens].mean() - logits.mean()
        assert torch.isclose(got[c], want, atol=1e-5, rtol=1e-5)
    assert top_latents(got, 5).tolist() == sorted(range(48), key=lambda c: -float(got[c]))[:5]


def test_folded_gain_for_layernorm_and_gemma():
    gain, centre = folded_gain(nn.LayerNorm(4), 4)
    assert centre and torch.equal(gain, torch.ones(4))

    class GemmaRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.tensor([0.0, 1.0, -0.5, 2.0]))

    gain, centre = folded_gain(GemmaRMSNorm(), 4)
    assert not centre and torch.equal(gain, torch.tensor([1.0, 2.0, 0.5, 3.0]))


def test_top_and_random_latents_are_k_distinct():
    scores = torch.tensor([0.0, 3.0, 3.0, -1.0, 5.0])
    assert top_latents(scores, 3).tolist() == [4, 1, 2]
    for seed in range(5):
        picked = random_latents(48, 8, seed=seed)
        assert len(set(picked.tolist())) == 8 and int(picked.max()) < 48
    assert torch.equal(random_latents(48, 8, seed=1), random_latents(48, 8, seed=1))
    with pytest.raises(Exception, match="K must be between"):
        top_latents(scores, 6)


def test_target_rows_end_with_each_target():
    lm = char_lm()
    ids, mask, lengths = target_rows(lm.tokenizer, ["ab", "cde"], ["xy", "z"])
    assert lengths == (2, 1, 2, 1)
    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    assert rows[0] == [1, *map(ord, "abxy")] and rows[3] == [1, *map(ord, "cdez")]


def test_typical_activation_is_the_mean_over_firing_tokens():
    lm, sae = char_lm(), tiny_sae(d_sae=48, layer=1)
    texts = ["hello there", "abc"]
    got = typical_activation(lm, sae, texts, layer=1)
    ids, mask = encode_prompts(lm.tokenizer, texts)
    with splice(lm, sae, 1) as state, torch.no_grad():
        lm.model(input_ids=ids, attention_mask=mask)
    acts = state.acts[0].reshape(-1, 48)
    fired = acts > 0
    want = torch.where(fired.any(0), acts.sum(0) / fired.sum(0).clamp(min=1), torch.zeros(48))
    assert torch.allclose(got, want, atol=1e-6)
    scales, missing = latent_scales(
        got, torch.tensor([int(fired.any(0).int().argmax()), int((~fired.any(0)).int().argmax())])
    )
    assert missing.tolist() == [False, True] and scales[1] == got[got > 0].median()


def test_concept_checks_its_fields():
    with pytest.raises(Exception, match="no words"):
        Concept(name="x", words=())
    with pytest.raises(Exception, match="judge"):
        Concept(name="x", words=("a",), judge="happy")
    assert Concept(name="x", words=("a", "b")).targets == ("a, b",)


@pytest.mark.slow
def test_add_edit_identity_on_the_real_model():
    """The shipped layer-6 SAE on SmolLM2: the residual moves by exactly the steering vector (float32)."""
    from gradsae.models import load_model
    from gradsae.pretrained import resolve_sae

    lm = load_model()
    sae, layer, _ = resolve_sae(lm, None, 6, default_model=True)
    scales = torch.tensor([5.0, 7.0, 9.0])
    edit = steering_edit([10, 200, 3000], 2.0, scales)
    ids, mask = encode_prompts(lm.tokenizer, ["The wedding was", "Hello"])
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    handle = _capture(lm, layer, before)
    try:
        with splice(lm, sae, layer, edits=[edit]) as state:
            inner = _capture(lm, layer, after)
            try:
                generate_batch(lm, ids, mask, max_new_tokens=3, stop=frozenset())
            finally:
                inner.remove()
    finally:
        handle.remove()
    vector = steering_vector(sae, [10, 200, 3000], 2.0, scales)
    for z, z_edit, valid in zip(before, after, state.valid, strict=True):
        want = valid[..., None] * vector
        assert torch.allclose(z_edit - z, want, atol=1e-3, rtol=0)  # |Z| ~ 100: float32 rounding of Z + v
