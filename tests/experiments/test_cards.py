"""Feature cards: corpus statistics, influence that predicts the effect of zeroing, logit lens."""

from __future__ import annotations

import pytest
import torch

from gradsae.cli import main
from gradsae.experiments.cards import RANK_FROM
from gradsae.experiments.results import CardSet, cards_path
from gradsae.lens import final_norm, folded_gain
from gradsae.models import residuals
from gradsae.objectives import TargetLogProb
from gradsae.scores import objective_value
from gradsae.splice import Edit, splice


def test_cards_read_back(tiny_run):
    assert CardSet.load(cards_path(tiny_run.folder, 0)) == tiny_run.cards


def test_density_and_top_activation_match_the_sae_on_the_corpus(tiny_run):
    ids = tiny_run.corpus
    with torch.inference_mode():
        h = tiny_run.sae.encode(residuals(tiny_run.lm, ids, torch.ones_like(ids), [0])[0].float())[:, 1:]
    for card in tiny_run.cards.cards:
        col = h[..., card.latent]
        assert card.density == pytest.approx(float((col > 0).float().mean()), abs=1e-6)
        assert card.max_activation == pytest.approx(float(col.max()), rel=1e-4)
        assert sum(card.hist_counts) == int((col > 0).sum())
        best = card.top_activation[0]
        assert best.value == pytest.approx(float(col[:, RANK_FROM - 1 :].max()), rel=1e-4)
        assert best.start + best.peak >= RANK_FROM
        assert best.activation[best.peak] == best.value
        values = [c.value for c in card.top_activation]
        assert values == sorted(values, reverse=True)


def _loglik(tiny_run, ids, edits):
    objective = TargetLogProb(n_target=ids.shape[1] - 1)
    with splice(tiny_run.lm, tiny_run.sae, 0, mode="error", edits=edits, record=False), torch.no_grad():
        return float(objective_value(tiny_run.lm, ids, torch.ones_like(ids), objective)[0])


def test_influence_predicts_zeroing_the_latent_at_that_token(tiny_run):
    """``g = H * dY/dH`` is the first-order change of the text's log-likelihood when the latent is zeroed there:
    shrinking ``H`` by 5% at that token changes ``Y`` by 5% of ``g``; zeroing it moves ``Y`` the same way."""
    checked = 0
    for card in tiny_run.cards.cards:
        for ctx in card.top_influence[:2]:
            ids = tiny_run.corpus[ctx.sequence : ctx.sequence + 1]
            where = torch.zeros_like(ids, dtype=torch.bool)
            where[0, ctx.start + ctx.peak] = True
            h = ctx.activation[ctx.peak]
            clean = _loglik(tiny_run, ids, [])
            shrunk = _loglik(tiny_run, ids, [Edit(latents=[card.latent], op="add", values=-0.05 * h, positions=where)])
            zeroed = _loglik(tiny_run, ids, [Edit(latents=[card.latent], op="zero", positions=where)])
            assert (clean - shrunk) / 0.05 == pytest.approx(ctx.value, rel=0.03)
            assert clean - zeroed == pytest.approx(ctx.value, rel=0.5)
            checked += 1
    assert checked >= 2


def test_logit_lens_applies_the_final_norm_weight(tiny_run):
    model = tiny_run.lm.model
    norm, name = final_norm(model)
    assert name == "model.norm" and norm is not None
    gamma, centre = folded_gain(norm, tiny_run.lm.d_model)
    assert not centre
    assert "model.norm" in tiny_run.cards.logit_lens
    w_u = model.get_output_embeddings().weight.detach()
    for card in tiny_run.cards.cards:
        v = w_u @ (gamma * tiny_run.sae.W_dec.detach()[card.latent])
        top, bottom = int(v.argmax()), int(v.argmin())
        assert card.promoted[0] == (tiny_run.lm.tokenizer.decode([top]), pytest.approx(float(v[top]), rel=1e-4))
        assert card.suppressed[0][0] == tiny_run.lm.tokenizer.decode([bottom])
        assert sum(card.logit_counts) == w_u.shape[0]


def test_in_run_lists_the_examples_whose_topk_holds_the_latent(tiny_run):
    part = tiny_run.dump.layers[0]
    for card in tiny_run.cards.cards:
        for method in ("gradsae", "activation"):
            expected = [ex.id for ex in part.examples if card.latent in [c for c, _ in ex.top[method]]]
            assert list(card.in_run[method]) == expected


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_cards_command_refuses_missing_inputs(capsys, tmp_path):
    assert "--latents" in _one_line_error(capsys, ["cards"])
    assert "examples.json" in _one_line_error(capsys, ["cards", "--run", str(tmp_path)])
