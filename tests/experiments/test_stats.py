"""Exact tests and intervals against hand computations."""

from __future__ import annotations

import math

import pytest

from gradsae.experiments.stats import Stat, clopper_pearson, holm, mcnemar, proportion, resolved, wilson


def _pairs(a_only: int, b_only: int, both: int = 3, neither: int = 2) -> tuple[list[float], list[float]]:
    a = [1.0] * a_only + [0.0] * b_only + [1.0] * both + [0.0] * neither
    b = [0.0] * a_only + [1.0] * b_only + [1.0] * both + [0.0] * neither
    return a, b


def test_mcnemar_four_to_none_is_one_eighth():
    """facts layer 24, K = 50%: 4 discordant pairs all one way: p = 2 / 2^4 = 0.125."""
    test = mcnemar(*_pairs(4, 0))
    assert (test.a_only, test.b_only) == (4, 0)
    assert test.p == pytest.approx(0.125, abs=1e-12)


@pytest.mark.parametrize(("a_only", "b_only"), [(5, 1), (1, 5), (7, 2), (3, 3), (10, 0), (0, 1)])
def test_mcnemar_is_the_two_sided_binomial_sum(a_only, b_only):
    n, low = a_only + b_only, min(a_only, b_only)
    hand = min(1.0, 2 * sum(math.comb(n, j) for j in range(low + 1)) / 2**n)
    assert mcnemar(*_pairs(a_only, b_only)).p == pytest.approx(hand, abs=1e-12)


def test_mcnemar_five_to_one_by_hand_and_no_discordance():
    assert mcnemar(*_pairs(5, 1)).p == pytest.approx(14 / 64, abs=1e-12)  # 2 (1 + 6) / 64
    assert mcnemar(*_pairs(0, 0)).p == 1.0
    with pytest.raises(ValueError, match="binary"):
        mcnemar([0.5, 1.0], [0.0, 1.0])


def test_clopper_pearson_zero_of_22_reaches_15_4_percent():
    low, high = clopper_pearson(0, 22)
    assert low == 0.0
    assert high == pytest.approx(1 - 0.025 ** (1 / 22), abs=1e-10)  # solves (1 - p)^22 = 0.025
    assert round(100 * high, 1) == 15.4
    low, high = clopper_pearson(30, 30)
    assert (low, high) == (pytest.approx(0.025 ** (1 / 30), abs=1e-10), 1.0)


def test_clopper_pearson_middle_against_binomial_tails():
    """At the bounds the binomial tail is exactly alpha / 2."""
    from scipy.stats import binom

    low, high = clopper_pearson(7, 20)
    assert binom.sf(6, 20, low) == pytest.approx(0.025, abs=1e-9)  # P(X >= 7 | low)
    assert binom.cdf(7, 20, high) == pytest.approx(0.025, abs=1e-9)  # P(X <= 7 | high)


def test_wilson_by_hand():
    z2 = 1.959963984540054**2
    low, high = wilson(0, 22)
    assert low == 0.0 and high == pytest.approx(z2 / (22 + z2), abs=1e-12)  # 0 / n: z^2 / (n + z^2)
    low, high = wilson(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))


def test_proportion_replaces_a_degenerate_bootstrap_interval():
    out = proportion(Stat(mean=0.0, low=0.0, high=0.0, n=22))
    assert (out.mean, out.low, round(out.high, 1), out.n) == (0.0, 0.0, 15.4, 22)
    assert proportion(Stat(mean=math.nan, low=math.nan, high=math.nan, n=0)).n == 0


def test_holm_on_a_known_vector():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    out = holm([0.01, math.nan])
    assert out[0] == pytest.approx(0.01) and math.isnan(out[1])


def test_resolved_counts_cells_directions_and_example_sets():
    # Holm over 4 tested cells: 0.001 -> 0.004, 0.004 -> 0.012, 0.02 -> 0.04, 0.3 -> 0.3 (nan: untested)
    out = resolved(
        [0.02, 0.001, 0.3, 0.004, math.nan],
        [-5.0, -3.0, -1.0, +2.0, -9.0],
        ["sst2", "sst2", "facts", "capitals", "facts"],
    )
    assert (out.cells, out.resolved, out.negative, out.positive) == (4, 3, 2, 1)
    assert (out.example_sets, out.resolved_sets) == (3, 2)
