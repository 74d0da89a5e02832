"""Faithfulness curves against hand computation on a tiny model with eight latents."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gradsae.errors import GradSAEError
from gradsae.experiments.curves import budget, faithfulness, full_order, pinned_token_prob, recall
from gradsae.experiments.results import CurveResult, auc, from_data, normalise
from gradsae.models import position_ids
from gradsae.report.curves import curves_markdown, plot_curves
from gradsae.splice import Edit, splice
from tests.helpers import padded_batch, tiny_lm, tiny_sae

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def setup():
    lm = tiny_lm(torch.float64, seed=1)
    sae = tiny_sae("relu", d_sae=8, seed=3, dtype=torch.float64, layer=0)
    ids, mask = padded_batch()
    result = faithfulness(lm, sae, ids, mask, layer=0, grid=GRID, seed=5, batch_size=4)
    return lm, sae, ids, mask, result


def _p(lm, sae, ids, mask, token, zeroed):
    """``p(token)`` at the last position with the latents ``zeroed`` at every position: a plain full forward."""
    edits = [Edit(latents=list(zeroed))] if zeroed else []
    with splice(lm, sae, 0, mode="error", edits=edits) as sp, torch.no_grad():
        logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
    return float(logits[0, -1].softmax(-1)[token]), sp.latents[0].to_dense()[0], sp.valid[0][0]


@pytest.mark.parametrize("row", [0, 1])
def test_curves_equal_explicit_forwards(setup, row):
    lm, sae, ids, mask, result = setup
    ids, mask = ids[row : row + 1], mask[row : row + 1]
    ex = result.examples[row]
    with torch.no_grad():
        plain = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    token = int(plain[0, -1].argmax())  # error mode without edits is the model itself
    clean, acts, valid = _p(lm, sae, ids, mask, token, [])
    active = sorted(int(c) for c in torch.nonzero(acts.sum(0) > 0).squeeze(-1))
    assert (ex.token, ex.n_active) == (token, len(active))
    assert 3 <= len(active) <= 8, "the hand check needs a few active latents"
    assert ex.clean == pytest.approx(clean, abs=1e-12)
    assert ex.ks == tuple(round(f * len(active)) for f in GRID)
    effect = {c: clean - _p(lm, sae, ids, mask, token, [c])[0] for c in active}
    by_effect = sorted(active, key=lambda c: (-effect[c], c))
    mean_act = acts.sum(0) / valid.sum()
    by_activation = sorted(active, key=lambda c: (-float(mean_act[c]), c))
    for method, order in (("ablation", by_effect), ("activation", by_activation)):
        for j, k in enumerate(ex.ks):
            assert ex.deletion[method][j] == pytest.approx(_p(lm, sae, ids, mask, token, order[:k])[0], abs=1e-12)
            assert ex.sufficiency[method][j] == pytest.approx(_p(lm, sae, ids, mask, token, order[k:])[0], abs=1e-12)
    assert len(active) < 10  # fewer than the top 10: recall and budget are undefined (nan), not 1 and a
    assert math.isnan(ex.budget["ablation"]) and math.isnan(ex.recall["ablation"])
    assert ex.spearman["ablation"] == pytest.approx(1.0)


def test_curve_ends_are_shared(setup):
    *_, result = setup
    for ex in result.examples:
        for method in result.methods:
            assert ex.deletion[method][0] == pytest.approx(ex.clean)
            assert ex.sufficiency[method][-1] == pytest.approx(ex.clean)
            assert ex.deletion[method][-1] == pytest.approx(ex.sufficiency[method][0])
            assert ex.curve("deletion", method)[0] == pytest.approx(0.0)


def test_normalised_area_is_one_for_ablation_and_zero_for_random(setup):
    *_, result = setup
    for name in ("deletion", "sufficiency"):
        assert result.normalised_area(name, "ablation") == pytest.approx(1.0)
        assert result.normalised_area(name, "random") == pytest.approx(0.0)
    areas = {m: sum(result.areas("deletion", m)) for m in ("activation", "random", "ablation")}
    expected = (areas["activation"] - areas["random"]) / (areas["ablation"] - areas["random"])
    assert result.normalised_area("deletion", "activation") == pytest.approx(expected)


def test_area_and_normalisation_by_hand():
    assert auc((0.0, 0.5, 1.0), (0.0, 1.0, 1.0)) == pytest.approx(0.75)
    assert auc((0.0, 0.1, 1.0), (2.0, 0.0, 0.0)) == pytest.approx(0.1)
    assert normalise(3.0, 1.0, 5.0) == 0.5
    assert math.isnan(normalise(3.0, 1.0, 1.0))


def test_budget_and_recall_by_hand():
    order = [5, 3, 9, 1, 7]
    assert budget(order, [3, 7]) == 5
    assert budget(order, [5, 3]) == 2
    assert budget(order, []) == 0
    assert recall(order, [3, 5, 1, 2], 2) == 1.0
    assert recall(order, [9, 1, 2], 2) == 0.0
    with pytest.raises(GradSAEError, match="not in the ranking"):
        budget(order, [4])


def test_full_order_breaks_ties_by_index():
    score = torch.tensor([0.0, 2.0, 1.0, 2.0, 0.0, 0.0])
    assert full_order(score, torch.tensor([4, 3, 1, 2, 0])) == [1, 3, 2, 0, 4]


def test_pinned_token_reads_its_probability_not_the_argmax():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1]], [[0.1, 0.3, 0.6]]], dtype=torch.float64))
    value = pinned_token_prob(1)(logits, torch.zeros(2, 1, dtype=torch.long))
    assert value.tolist() == pytest.approx([0.2, 0.3])


def test_grid_must_run_from_zero_to_one(setup):
    lm, sae, ids, mask, _ = setup
    for grid in [(0.0, 0.5), (0.1, 1.0), (0.0, 0.5, 0.5, 1.0)]:
        with pytest.raises(GradSAEError, match="grid"):
            faithfulness(lm, sae, ids, mask, layer=0, grid=grid)
    with pytest.raises(GradSAEError, match="unknown rankings"):
        faithfulness(lm, sae, ids, mask, layer=0, rankings=("bogus",))


def test_round_trip_table_and_plot(setup, tmp_path):
    *_, result = setup
    data = json.loads(json.dumps(result.to_dict()))
    again = from_data(CurveResult, data)
    assert json.dumps(again.to_dict()) == json.dumps(result.to_dict())  # (nan != nan, so not by ==)
    assert set(data["summary"]) == set(result.methods)
    lines = curves_markdown(result)
    assert sum(line.startswith("| ") for line in lines) == 2 * (1 + len(result.methods))  # two tables
    assert any(line.startswith("| exact ablation | 1.00 [1.00, 1.00] |") for line in lines)
    path = plot_curves(result, tmp_path / "curves.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_log_area_by_hand():
    from gradsae.experiments.results import log_area

    # points at K = 1, 10, 100 (100 > 50 is left out): trapezoid over ln K from 1 to 10, divided by ln 10
    assert log_area([(0, 9.0), (1, 2.0), (10, 4.0), (100, 7.0)]) == pytest.approx(3.0)
    assert log_area([(1, 2.0), (2, 2.0), (4, 5.0)]) == pytest.approx(
        (2.0 * math.log(2) + 3.5 * math.log(2)) / math.log(4)
    )
    assert math.isnan(log_area([(1, 2.0)]))


def test_new_figures_against_hand_computation(setup):
    """Fixed K points, the random anchor's draws, Spearman variants and threshold budgets, from the scores."""
    from scipy.stats import spearmanr

    from gradsae.experiments.curves import LOG_KS, RANDOM_DRAWS, THRESHOLDS

    lm, sae, ids, mask, result = setup
    for row, ex in enumerate(result.examples):
        a = ex.n_active
        assert ex.fixed_ks == tuple(sorted({min(max(1, k), a) for k in LOG_KS}))
        assert ex.random_draws == RANDOM_DRAWS
        one = ids[row : row + 1][:, mask[row].bool()]
        ones = torch.ones_like(one)
        exact_order = _orders(lm, sae, one, ones, ex)
        for j, k in enumerate(ex.fixed_ks):  # Y(top K zeroed) at the fixed K, exact ranking, by a plain forward
            assert ex.deletion_at["ablation"][j] == pytest.approx(_p(lm, sae, one, ones, ex.token, exact_order[:k])[0])
        effect = {c: ex.clean - _p(lm, sae, one, ones, ex.token, [c])[0] for c in exact_order}
        for x, n, spent in zip(THRESHOLDS, ex.threshold_targets, ex.threshold_budget["ablation"], strict=True):
            targets = [c for c in exact_order if abs(effect[c]) >= x * ex.clean]
            assert n == len(targets)
            by_size = sorted(exact_order, key=lambda c: (-effect[c], c))
            if targets:
                assert spent == max(by_size.index(c) + 1 for c in targets)
            else:  # no latent reaches the threshold: no budget (was 0, averaged in as a perfect score)
                assert math.isnan(spent)
        acts = [float(effect[c]) for c in exact_order]
        assert ex.spearman_abs["ablation"] == pytest.approx(spearmanr(acts, [abs(v) for v in acts]).statistic)
    # the random anchor is the mean of its draws: normalised log area 0 for random, 1 for exact ablation
    assert result.normalised_log_area("deletion", "random") == pytest.approx(0.0, abs=1e-12)
    assert result.normalised_log_area("deletion", "ablation") == pytest.approx(1.0)
    figure = result.metric("deletion_log", "gradsae")
    assert figure.low <= figure.mean <= figure.high
    # eight latents, fewer than the top 10: recall and budget would be 1 and a for every ranking; nan instead
    assert all(e.n_active < 10 for e in result.examples)
    for e in result.examples:
        assert all(math.isnan(e.recall[m]) and math.isnan(e.budget[m]) for m in e.recall)


def _orders(lm, sae, ids, mask, ex):
    """The exact-ablation order (descending effect, ties by index) by plain forwards."""
    clean, acts, _ = _p(lm, sae, ids, mask, ex.token, [])
    active = sorted(int(c) for c in torch.nonzero(acts.sum(0) > 0).squeeze(-1))
    effect = {c: clean - _p(lm, sae, ids, mask, ex.token, [c])[0] for c in active}
    return sorted(active, key=lambda c: (-effect[c], c))
