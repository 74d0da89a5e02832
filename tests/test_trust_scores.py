"""Scores that can be trusted: the clean greedy token, latent 0 in padded edits, float32 SAE maths, position 0."""

from __future__ import annotations

import pytest
import torch

from gradsae.models import position_ids
from gradsae.splice import Edit, apply_edits, splice
from tests.helpers import tiny_sae


def _last_logits(lm, ids, mask, hook=None):
    handle = lm.layers[0].register_forward_hook(hook) if hook else None
    try:
        with torch.no_grad():
            return lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
    finally:
        if handle:
            handle.remove()


# -- 2. padding never hides latent 0 --------------------------------------------------------
@pytest.mark.parametrize("latents", [[[0, -1], [-1, 0]], [[-1, 0], [0, -1]]])
def test_padded_edit_rows_reach_latent_zero(latents):
    h = torch.rand(2, 3, 8) + 0.5
    zeroed = apply_edits(h, [Edit(latents=torch.tensor(latents))])
    assert (zeroed[..., 0] == 0).all() and torch.equal(zeroed[..., 1:], h[..., 1:])
    values = torch.where(torch.tensor(latents) == 0, 4.0, 99.0)
    set_ = apply_edits(h, [Edit(latents=torch.tensor(latents), op="set", values=values)])
    assert (set_[..., 0] == 4.0).all() and torch.equal(set_[..., 1:], h[..., 1:])
    added = apply_edits(h, [Edit(latents=torch.tensor(latents), op="add", values=values)])
    assert torch.allclose(added[..., 0], h[..., 0] + 4.0) and torch.equal(added[..., 1:], h[..., 1:])


def test_padded_edit_rows_zero_latent_zero_in_the_splice(lm, batch):
    ids, mask = batch
    sae = tiny_sae("relu")
    with torch.no_grad():
        sae.b_enc[0] = 5.0  # latent 0 fires everywhere
    with splice(lm, sae, 0, edits=[Edit(latents=torch.tensor([[0, -1], [-1, 0]]))]) as sp:
        _last_logits(lm, ids, mask)
    acts = sp.acts[0]
    assert (acts[..., 0] == 0).all() and (acts[..., 1:] != 0).any()
