"""The estimators of issue 23 on the real embedded model and its shipped SAEs; run with --slow."""

from __future__ import annotations

import pytest
import torch

from gradsae.models import load_model
from gradsae.multilayer import score_layers
from gradsae.objectives import NextTokenProb
from gradsae.pretrained import resolve_sae
from gradsae.scores import ScoreOptions, score_latents, score_methods
from gradsae.splice import Edit, splice

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    return load_model()


def _ids(lm):
    return lm.tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"]


def test_ig_completeness_on_the_real_model(real):
    """10 midpoint steps: ``sum a`` is within 5% of ``Y(H) - Y(H = 0)`` at layer 15 (float32)."""
    ids = _ids(real)
    mask = torch.ones_like(ids)
    sae, layer, _ = resolve_sae(real, None, 15, default_model=True)
    by = score_methods(
        real,
        sae,
        ids,
        mask,
        NextTokenProb(),
        methods=("gradsae", "ig"),
        options=ScoreOptions(layer=layer, aggregation="sum"),
    )
    objective = NextTokenProb().pinned(by["ig"].token)
    every = Edit(latents=torch.arange(sae.cfg.d_sae), op="zero")
    with splice(real, sae, layer, edits=[every], record=False), torch.no_grad():
        zeroed = objective(real.model(input_ids=ids, attention_mask=mask).logits, ids)
    target = float(by["ig"].objective[0] - zeroed[0])
    total = float(by["ig"].per_latent.sum())
    assert abs(total - target) <= 0.05 * abs(target), (total, target)


def test_every_layer_in_one_backward_on_the_real_model(real):
    ids = _ids(real)
    saes = {layer: resolve_sae(real, None, layer, default_model=True)[0] for layer in (6, 15, 24)}
    together = score_layers(real, saes, ids, None, NextTokenProb())
    for layer, sae in saes.items():
        alone = score_latents(real, sae, ids, NextTokenProb(), options=ScoreOptions(layer=layer)).per_latent
        assert (together[layer].per_latent - alone).abs().max() <= 1e-5 * alone.abs().max()
