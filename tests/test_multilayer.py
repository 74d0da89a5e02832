"""Every layer in one backward (gradsae.multilayer) equals scoring each layer alone."""

from __future__ import annotations

import pytest
import torch

from gradsae.errors import GradSAEError
from gradsae.models import position_ids
from gradsae.multilayer import rank_across_layers, score_layers
from gradsae.objectives import NextTokenProb
from gradsae.scores import ScoreOptions, score_latents
from tests.helpers import padded_batch, tiny_lm, tiny_sae


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aggregation", ["paper", "sum"])
def test_one_backward_equals_each_layer_alone(dtype: torch.dtype, aggregation: str) -> None:
    lm = tiny_lm(dtype=dtype, layers=3)
    saes = {layer: tiny_sae(dtype=dtype, layer=layer, seed=layer) for layer in (0, 1, 2)}
    ids, mask = padded_batch()
    together = score_layers(lm, saes, ids, mask, NextTokenProb(), aggregation=aggregation)
    for layer, sae in saes.items():
        alone = score_latents(
            lm,
            sae,
            {"input_ids": ids, "attention_mask": mask},
            NextTokenProb(),
            options=ScoreOptions(aggregation=aggregation),
        )
        scale = alone.per_latent.abs().max()
        assert torch.equal(together[layer].token_index, alone.token_index)
        assert (together[layer].per_latent - alone.per_latent).abs().max() <= 1e-6 * scale
        assert (together[layer].token_score - alone.token_score).abs().max() <= 1e-6 * scale * 10
        torch.testing.assert_close(together[layer].objective, alone.objective)
        assert torch.equal(together[layer].token, alone.token)


def test_the_model_stays_exact_and_rankings_merge() -> None:
    lm = tiny_lm(layers=3)
    saes = {layer: tiny_sae(layer=layer, seed=layer) for layer in (0, 2)}
    ids, mask = padded_batch()
    together = score_layers(lm, saes, ids, mask, NextTokenProb())
    with torch.no_grad():
        plain = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
    assert torch.equal(together[0].objective, NextTokenProb()(plain[:, None], ids))
    ranked = rank_across_layers(together, row=0)
    assert {layer for layer, _, _ in ranked} == {0, 2}
    assert [s for _, _, s in ranked] == sorted((s for _, _, s in ranked), reverse=True)
    n_positive = sum(int((together[layer].per_latent[0] > 0).sum()) for layer in (0, 2))
    assert len(ranked) == n_positive


def test_refuses_an_empty_set() -> None:
    with pytest.raises(GradSAEError, match="at least one layer"):
        score_layers(tiny_lm(), {}, *padded_batch(), NextTokenProb())
