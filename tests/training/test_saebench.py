"""SAEBench ``core`` figures and JSON: exact for a perfect SAE, consistent for a random one, SAEBench's shape."""

from __future__ import annotations

import pytest
import torch

from gradsae.training.evaluate import evaluate_all, patch_residual
from gradsae.training.saebench import core_output, max_cosine
from tests.helpers import padded_batch, tiny_lm, tiny_sae
from tests.training.test_train import D_MODEL, _exact_sae

METRICS = {
    "model_behavior_preservation": {"kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"},
    "model_performance_preservation": {
        "ce_loss_score",
        "ce_loss_with_ablation",
        "ce_loss_with_sae",
        "ce_loss_without_sae",
    },
    "reconstruction_quality": {"explained_variance", "explained_variance_legacy", "mse", "cossim"},
    "shrinkage": {"l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"},
    "sparsity": {"l0", "l1"},
    "token_stats": {"total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"},
    "misc_metrics": {
        "freq_over_1_percent",
        "freq_over_10_percent",
        "normalized_freq_over_1_percent",
        "normalized_freq_over_10_percent",
        "average_max_encoder_cosine_sim",
        "average_max_decoder_cosine_sim",
        "frac_alive",
    },
}


@pytest.fixture
def ids() -> torch.Tensor:
    ids, _ = padded_batch()
    return torch.cat([ids, ids.flip(1)])[:, :10].clamp(min=3)


def test_a_perfect_sae_scores_perfectly(ids):
    lm = tiny_lm(hidden=D_MODEL, intermediate=64, heads=4, kv_heads=2)
    (_, core) = evaluate_all(lm, {0: _exact_sae()}, ids, batch=2)[0]
    assert core.kl_sae == pytest.approx(0, abs=1e-6) and core.kl_zero > 0
    assert core.explained_variance == pytest.approx(1, abs=1e-5) and core.cossim == pytest.approx(1, abs=1e-5)
    assert core.l2_ratio == pytest.approx(1, abs=1e-5)
    assert core.relative_reconstruction_bias == pytest.approx(1, abs=1e-5)


def test_random_sae_figures_agree_with_a_direct_computation(ids):
    lm, sae = tiny_lm(), tiny_sae(d_sae=48)
    result, core = evaluate_all(lm, {1: sae}, ids, batch=3)[1]
    assert core.tokens == result.tokens == ids.shape[0] * (ids.shape[1] - 1) and core.sequences == ids.shape[0]
    assert core.l0 == pytest.approx(sum(core.density)) == pytest.approx(result.l0)
    assert 1 - sum(d > 0 for d in core.density) / 48 == pytest.approx(result.dead_fraction)
    with torch.no_grad():
        clean = lm.model(input_ids=ids).logits[:, 1:-1].log_softmax(-1)
        with patch_residual(lm, 1, lambda x: sae(x)):
            spliced = lm.model(input_ids=ids).logits[:, 1:-1].log_softmax(-1)
    kl = (clean.exp() * (clean - spliced)).sum(-1).mean()
    assert core.kl_sae == pytest.approx(float(kl), rel=1e-4)


def test_legacy_explained_variance_is_saebenchs_per_token_ratio(ids):
    """``mean_t 1 - |x_t - x^_t|^2 / |x_t - mean_batch x|^2``, by hand from the model's hidden states."""
    lm, sae = tiny_lm(), tiny_sae(d_sae=48)
    _, core = evaluate_all(lm, {0: sae}, ids, batch=3)[0]
    ratios = []
    with torch.no_grad():
        for first in range(0, ids.shape[0], 3):
            hidden = lm.model(input_ids=ids[first : first + 3], output_hidden_states=True).hidden_states[1]
            x = hidden[:, 1:].reshape(-1, hidden.shape[-1]).double()
            err = (x - sae(x.float()).double()).pow(2).sum(-1)
            ratios += (1 - err / (x - x.mean(0)).pow(2).sum(-1)).tolist()
    assert core.explained_variance_legacy == pytest.approx(sum(ratios) / len(ratios), rel=1e-4)
    assert core.explained_variance_legacy != pytest.approx(core.explained_variance, rel=1e-3)


def test_core_json_has_saebench_shape(ids):
    lm, sae = tiny_lm(), tiny_sae(d_sae=48)
    result, core = evaluate_all(lm, {1: sae}, ids, batch=3)[1]
    out = core_output(sae, result, core, dataset="tiny", context=10, batch=3)
    assert out["eval_type_id"] == "core"
    assert {k: set(v) for k, v in out["eval_result_metrics"].items()} == METRICS
    metrics = out["eval_result_metrics"]
    assert metrics["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1 - core.kl_sae / core.kl_zero)
    assert metrics["model_performance_preservation"]["ce_loss_score"] == result.ce_recovered
    assert metrics["misc_metrics"]["frac_alive"] == pytest.approx(1 - result.dead_fraction)
    assert len(out["eval_result_details"]) == 48 and out["eval_result_details"][5]["index"] == 5
    assert out["sae_cfg_dict"]["d_sae"] == 48 and out["eval_config"]["context_size"] == 10


def test_max_cosine_ignores_the_row_itself():
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(max_cosine(rows, chunk=2), torch.tensor([0.5**0.5, 0.5**0.5, 0.5**0.5]))
