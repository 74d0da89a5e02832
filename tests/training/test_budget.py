"""The saturating power law of FVU in training tokens: recovered from exact points, and refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradsae.training.budget import BudgetFit, fit_budget, holdout_check

TOKENS = [125e3, 250e3, 500e3, 1e6, 3e6]


def test_fit_recovers_a_known_law_and_its_budget() -> None:
    law = BudgetFit(floor=0.12, scale=0.08, power=0.6, rms_log_error=0.0)
    fit = fit_budget(TOKENS, [law.fvu(t) for t in TOKENS])
    assert fit.floor == pytest.approx(0.12, abs=1e-4) and fit.power == pytest.approx(0.6, abs=1e-3)
    # (0.08 / (0.15 - 0.12)) ** (1 / 0.6) million tokens, worked by hand: 2.667 ** 1.667 = 5.13
    assert fit.tokens_for(0.15) == pytest.approx(5.13e6, rel=2e-3)
    assert fit.tokens_for(0.10) is None and fit.rms_log_error < 1e-6


def test_holdout_predicts_the_largest_budget_of_an_exact_law() -> None:
    law = BudgetFit(floor=0.05, scale=0.2, power=0.4, rms_log_error=0.0)
    predicted, measured = holdout_check(TOKENS, [law.fvu(t) for t in TOKENS])
    assert predicted == pytest.approx(measured, rel=1e-3)
    assert holdout_check(TOKENS[:3], [0.3, 0.2, 0.1]) is None


def test_too_few_budgets_are_refused() -> None:
    with pytest.raises(ValueError, match="three or more"):
        fit_budget([1e5, 1e5, 2e5], [0.3, 0.3, 0.2])


def test_budget_curve_script_tabulates_eval_sae_runs(tmp_path) -> None:
    """scripts/sae_budget_curve.py on eval-sae outputs made from a known law: fit, table and plot."""
    law = BudgetFit(floor=0.2, scale=0.1, power=0.5, rms_log_error=0.0)
    args = []
    for tokens in TOKENS:
        figures = [
            {"layer": layer, "set": name, "fvu": law.fvu(tokens) / 4, "fvu_typical": law.fvu(tokens)}
            for layer in (15, 24)
            for name in ("news", "chat", "generated")
        ]
        path = tmp_path / f"{tokens:.0f}.json"
        path.write_text(json.dumps({"figures": figures}))
        args += ["--point", f"{tokens:.0f}={path}"]
    script = Path(__file__).resolve().parents[2] / "scripts" / "sae_budget_curve.py"
    args += ["--other", f"wide:1M={path}"]  # the 3M figures set beside the curve at 1M
    subprocess.run([sys.executable, str(script), *args, "--out", str(tmp_path / "out")], check=True)
    data = json.loads((tmp_path / "out" / "curve.json").read_text())
    rows, others = data["rows"], data["others"]
    assert len(others) == 6 and all(o["curve_fvu_typical"] == pytest.approx(law.fvu(1e6)) for o in others)
    assert all(o["fvu_typical"] == pytest.approx(law.fvu(3e6)) for o in others)
    typical = [r for r in rows if r["metric"] == "fvu_typical"]
    assert len(rows) == 12 and all(r["tokens_for_target"] is None for r in typical)  # floor 0.2 > 0.15
    assert all(r["fit"]["floor"] == pytest.approx(0.2, abs=1e-3) for r in typical)
    pooled = next(r for r in rows if r["metric"] == "fvu")  # a quarter of the law: floor 0.05, reaches 0.15
    assert pooled["tokens_for_target"] == pytest.approx(1e6 * (0.025 / 0.1) ** 2, rel=1e-2)
    table = (tmp_path / "out" / "curve.md").read_text()
    assert "unreachable" in table and (tmp_path / "out" / "curve.png").stat().st_size > 10_000
