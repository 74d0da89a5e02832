"""The estimators of issue 23 as faithfulness-curve rankings, reproduce/sweep options, and the sweep table."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from gradsae.cli import main
from gradsae.experiments.curves import faithfulness, pinned_token_prob
from gradsae.experiments.stats import spearman
from gradsae.report.curves import curves_markdown
from gradsae.report.sweep import curve_methods
from gradsae.scores import ScoreOptions, score_methods
from tests.helpers import padded_batch, tiny_lm, tiny_sae

GRID = (0.0, 0.25, 0.5, 1.0)


def test_ig_and_relp_rank_the_curves_by_their_summed_scores() -> None:
    lm = tiny_lm(torch.float64, seed=1)
    sae = tiny_sae("relu", d_sae=8, seed=3, dtype=torch.float64, layer=0)
    ids, mask = padded_batch()
    rankings = ("gradsae", "gradsae_sum", "activation", "random", "ablation", "ig", "relp")
    result = faithfulness(lm, sae, ids[:1], mask[:1], layer=0, grid=GRID, rankings=rankings, ig_steps=4)
    assert set(result.methods) == set(rankings)
    summary = result.summary()
    assert all(not math.isnan(summary[m]["spearman"]) for m in ("ig", "relp"))
    assert all(math.isnan(summary[m]["recall"]) for m in ("ig", "relp"))  # 8 latents: no top 10 to recall
    row = ids[:1]
    token = result.examples[0].token
    by = score_methods(
        lm,
        sae,
        row,
        torch.ones_like(row),
        pinned_token_prob(token),
        methods=("ig", "relp", "ablation"),
        options=ScoreOptions(layer=0, aggregation="sum", ig_steps=4),
    )
    active = torch.nonzero(by["ablation"].mean_act[0] > 0).squeeze(-1)
    for m in ("ig", "relp"):
        rho = spearman(by[m].per_latent[0, active], by["ablation"].per_latent[0, active])
        assert result.examples[0].spearman[m] == rho  # the curves rank by the summed per-token score
    assert any("integrated gradients" in line for line in curves_markdown(result))


def test_sweep_table_lists_the_estimators_a_run_measured() -> None:
    with_ig = SimpleNamespace(methods=("gradsae", "activation", "random", "ablation", "ig"))
    plain = SimpleNamespace(methods=("gradsae", "activation", "random"))
    assert curve_methods([plain, with_ig]) == ("gradsae", "gradsae_sum", "activation", "ig")  # type: ignore[list-item]
    assert curve_methods([plain]) == ("gradsae", "gradsae_sum", "activation")  # type: ignore[list-item]


def test_reproduce_and_sweep_refuse_unknown_methods(tmp_path, capsys) -> None:
    for argv in (
        ["reproduce", "--out", str(tmp_path / "r"), "--methods", "gradsae,bogus"],
        ["reproduce", "--out", str(tmp_path / "r"), "--methods", "ig", "--ig-steps", "0"],
        ["sweep", "--out", str(tmp_path / "s"), "--methods", "ig,ig"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        assert "--methods" in err or "--ig-steps" in err
