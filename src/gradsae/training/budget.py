"""How many training tokens an SAE would need to reach a target FVU: a saturating power law in tokens.

For SAEs of one width trained with budgets ``T_1 < ... < T_n`` (each with its own
learning-rate decay), the held-out FVU is fitted as

    FVU(T) = a + b * (T / 1M) ** (-c),    a >= 0, b >= 0, 0 < c <= 2,

by least squares on ``log FVU`` (every budget weighs the same however small its
FVU). ``a`` is the floor this width cannot go below however long it trains. The
budget that reaches a target ``f`` is ``T_f = 1M * (b / (f - a)) ** (1 / c)`` when
``a < f`` and unreachable otherwise. The fit is checked by leaving the largest
budget out and predicting it from the rest.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

MILLION = 1e6


@dataclass(frozen=True)
class BudgetFit:
    """``FVU(T) = floor + scale * (T / 1M) ** (-power)`` fitted to measured budgets."""

    floor: float
    scale: float
    power: float
    rms_log_error: float
    """Root-mean-square of ``log(measured / fitted)`` over the fitted points."""

    def fvu(self, tokens: float) -> float:
        return self.floor + self.scale * (tokens / MILLION) ** (-self.power)

    def tokens_for(self, target: float) -> float | None:
        """Tokens at which the fitted FVU reaches ``target``; None when the floor is at or above it."""
        if self.floor >= target:
            return None
        return MILLION * (self.scale / (target - self.floor)) ** (1 / self.power)


def _model(millions: np.ndarray, floor: float, scale: float, power: float) -> np.ndarray:
    return np.log(floor + scale * millions ** (-power))


def fit_budget(tokens: Sequence[float], fvu: Sequence[float]) -> BudgetFit:
    """Fit :class:`BudgetFit` to ``(tokens, fvu)`` pairs (at least three budgets)."""
    if len(tokens) != len(fvu) or len(set(tokens)) < 3:
        raise ValueError(f"need FVU at three or more distinct budgets, got {len(set(tokens))}")
    x = np.asarray(tokens, dtype=float) / MILLION
    y = np.log(np.asarray(fvu, dtype=float))
    start = (0.5 * float(min(fvu)), float(max(fvu)) - 0.5 * float(min(fvu)) + 1e-6, 0.5)
    with warnings.catch_warnings():  # three exact points leave no covariance to estimate; we use none
        warnings.simplefilter("ignore", OptimizeWarning)
        (floor, scale, power), _ = curve_fit(
            _model, x, y, p0=start, bounds=([0.0, 0.0, 1e-3], [math.inf, math.inf, 2.0]), maxfev=20_000
        )
    residual = y - _model(x, floor, scale, power)
    return BudgetFit(float(floor), float(scale), float(power), float(np.sqrt(np.mean(residual**2))))


def holdout_check(tokens: Sequence[float], fvu: Sequence[float]) -> tuple[float, float] | None:
    """(predicted, measured) FVU at the largest budget from a fit to the others; None with under four budgets."""
    order = np.argsort(tokens)
    if len(order) < 4:
        return None
    rest = order[:-1]
    fit = fit_budget([tokens[i] for i in rest], [fvu[i] for i in rest])
    last = int(order[-1])
    return fit.fvu(tokens[last]), float(fvu[last])
