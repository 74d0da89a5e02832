"""Checks on the real embedded model (SmolLM2-135M-Instruct) and the shipped SAEs; run with --slow."""

from __future__ import annotations

import pytest
import torch

from gradsae.cli import main
from gradsae.models import load_model
from gradsae.objectives import NextTokenProb
from gradsae.pretrained import SHIPPED_LAYERS, resolve_sae, shipped_sae_path
from gradsae.scores import ScoreOptions, score_latents
from gradsae.splice import splice

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    return load_model()


def _inputs(lm):
    enc = lm.tokenizer(
        ["The capital of France is", "I watched the movie and it was"], return_tensors="pt", padding=True
    )
    return enc["input_ids"], enc["attention_mask"]


def test_error_splice_is_exact_on_the_real_model(real):
    ids, mask = _inputs(real)
    sae, layer, _ = resolve_sae(real, None, 6, default_model=True)
    with torch.no_grad():
        clean = real.model(input_ids=ids, attention_mask=mask).logits
        with splice(real, sae, layer, mode="error"):
            spliced = real.model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(spliced, clean, atol=1e-3, rtol=1e-4)


def test_shipped_saes_load_and_reconstruct(real):
    from gradsae.models import residuals

    ids, mask = _inputs(real)
    for layer in SHIPPED_LAYERS:
        if shipped_sae_path(layer) is None:
            pytest.skip("no trained SAE shipped yet")
        sae, _, label = resolve_sae(real, None, layer, default_model=True)
        z = residuals(real, ids, mask, [layer])[layer][:, 1:][mask[:, 1:].bool()]
        fvu = ((sae(z) - z).pow(2).sum() / (z - z.mean(0)).pow(2).sum()).item()
        assert fvu < 0.5, (label, fvu)
        assert (sae.encode(z) > 0).sum(-1).float().mean() <= sae.cfg.k


def test_gradsae_ranks_like_exact_ablation_on_the_real_model(real):
    from scipy.stats import spearmanr

    ids = real.tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"]
    sae, layer, _ = resolve_sae(real, None, 6, default_model=True)
    estimate = score_latents(
        real, sae, ids, NextTokenProb(), options=ScoreOptions(layer=layer, aggregation="sum")
    ).per_latent[0]
    exact = score_latents(
        real, sae, ids, NextTokenProb(), method="ablation", options=ScoreOptions(layer=layer)
    ).per_latent[0]
    active = exact != 0
    rho = spearmanr(estimate[active].numpy(), exact[active].numpy()).statistic
    assert rho > 0.5


def test_score_command_on_the_default(capsys):
    assert main(["score", "--prompt", "What is the capital of France?", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "Top latents by GradSAE" in out and "Top latents by activation" in out
