"""Statistics over kept examples: bootstrap intervals and rank correlation.

* :func:`stat`: ``100 * mean_i x_i`` with a 95% percentile bootstrap interval
  (``resamples`` draws of the examples with replacement, seeded).
* :func:`paired_difference`: ``100 * mean_i (a_i - b_i)`` over the same examples, with a
  95% percentile bootstrap interval that resamples examples (pairs stay together):
  the comparison the paper makes (GradSAE vs activation in one cell).
* :func:`spearman`: Spearman's rank correlation (average ranks for ties).

Exact tests and intervals for binary outcomes (exact match: 0 or 1 per example), where a
percentile bootstrap undercovers at these counts (it returns ``[0, 0]`` for ``0 / 22``):

* :func:`mcnemar`: paired binary outcomes ``a_i, b_i``; the discordant pairs ``n_10 = #{a=1, b=0}``
  and ``n_01 = #{a=0, b=1}``; under ``H_0`` each discordant pair goes either way with probability 1/2, so
  ``p = min(1, 2 sum_{j <= min(n_10, n_01)} C(n, j) / 2^n)`` with ``n = n_10 + n_01`` (two-sided exact,
  ``scipy.stats.binomtest``); ``p = 1`` when no pair is discordant.
* :func:`clopper_pearson`: the exact interval for ``x`` successes in ``n``:
  ``[B(alpha/2; x, n-x+1), B(1-alpha/2; x+1, n-x)]`` (``B`` the beta quantile; 0 / 1 at the ends).
* :func:`wilson`: ``(p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``.
* :func:`holm`: Holm's step-down adjustment of ``m`` p-values: sorted ``p_(1) <= ... <= p_(m)``,
  ``q_(i) = min(1, max_{j <= i} (m - j + 1) p_(j))``; a cell is resolved at level ``alpha`` when
  ``q <= alpha`` (family-wise error at most ``alpha``).
* :func:`resolved`: how many cells are resolved after Holm, in which direction, and over how many
  independent example sets (cells that share their examples count once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

ALPHA = 0.05
"""Level of every test and (``1 - ALPHA``) of every interval."""


@dataclass(frozen=True)
class Stat:
    """A task score (0-100) over examples, with its 95% bootstrap interval."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> Stat:
        return cls(mean=float(data["mean"]), low=float(data["low"]), high=float(data["high"]), n=int(data["n"]))


def bootstrap(
    values: Sequence[float],
    statistic: Callable[[Any], float] = np.mean,
    *,
    seed: int,
    resamples: int,
    scale: float = 1.0,
) -> Stat:
    """``scale * statistic(values)`` with a 95% percentile bootstrap interval over the values: the house's one
    resampler. The ``resamples`` index rows are drawn in one seeded call; draws where ``statistic`` is ``nan``
    are left out of the percentiles."""
    if not len(values):
        return Stat(mean=math.nan, low=math.nan, high=math.nan, n=0)
    data = np.asarray(values, dtype=float)
    rows = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    if statistic is np.mean:
        draws = data[rows].mean(axis=1)
    else:
        draws = np.array([statistic(data[row]) for row in rows], dtype=float)
    known = draws[~np.isnan(draws)]
    low, high = np.percentile(known, [2.5, 97.5]) if len(known) else (math.nan, math.nan)
    return Stat(mean=scale * float(statistic(data)), low=scale * float(low), high=scale * float(high), n=len(data))


def stat(values: Sequence[float], *, seed: int, resamples: int) -> Stat:
    """Mean x 100 with a 95% percentile bootstrap interval over examples (seeded; :func:`bootstrap`)."""
    return bootstrap([100 * float(v) for v in values], seed=seed, resamples=resamples)


def paired_difference(a: Sequence[float], b: Sequence[float], *, seed: int, resamples: int) -> Stat:
    """``100 * mean(a - b)`` over paired examples with a 95% bootstrap interval (in points)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return stat([x - y for x, y in zip(a, b, strict=True)], seed=seed, resamples=resamples)


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation (average ranks for ties); ``a``, ``b``: anything numpy reads (CPU tensors too)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)).statistic)


# -- exact tests and intervals for binary outcomes ----------------------------------------------------
@dataclass(frozen=True)
class McNemar:
    """An exact McNemar test of paired binary outcomes ``a`` vs ``b``."""

    a_only: int
    """``n_10``: pairs where ``a`` succeeded and ``b`` did not."""
    b_only: int
    """``n_01``: pairs where ``b`` succeeded and ``a`` did not."""
    p: float
    """Two-sided exact p (binomial on the discordant pairs)."""


def is_binary(values: Sequence[float]) -> bool:
    """Every value is 0 or 1 (exact match), so the exact binomial statistics apply."""
    return all(v in (0.0, 1.0) for v in values)


def mcnemar(a: Sequence[float], b: Sequence[float]) -> McNemar:
    """Exact two-sided McNemar test of paired binary outcomes (see the module docstring)."""
    from scipy.stats import binomtest

    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    if not (is_binary(a) and is_binary(b)):
        raise ValueError("McNemar needs binary outcomes (0 or 1 per example)")
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x > y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if x < y)
    n = a_only + b_only
    p = 1.0 if n == 0 else float(binomtest(a_only, n, 0.5, alternative="two-sided").pvalue)
    return McNemar(a_only=a_only, b_only=b_only, p=min(1.0, p))


def smallest_p(n: int) -> float:
    """The smallest two-sided p of an exact McNemar test on ``n`` discordant pairs, or of the enumerated sign-flip
    test on ``n`` nonzero differences: all ``n`` of one sign, ``2 / 2^n`` (1 for none). A cell whose bound exceeds
    the level it is tested at cannot be resolved, whatever the data."""
    return min(1.0, 2.0 / 2**n) if n > 0 else 1.0


def sign_flip_p(diffs: Sequence[float], *, seed: int = 0, resamples: int = 20000, exact_max: int = 16) -> float:
    """Two-sided paired sign-flip permutation ``p`` of ``mean(diffs)``.

    Under the null each difference ``d_i`` is as likely ``-d_i``: ``p`` is the share of the ``2^n`` sign
    patterns whose ``|sum|`` reaches the observed one (exact when at most ``exact_max`` differences are
    non-zero; otherwise ``resamples`` seeded patterns, ``p = (1 + hits) / (1 + resamples)``). On binary
    outcomes the exact version is McNemar's exact test.
    """
    import itertools

    d = np.asarray([x for x in diffs if x != 0], dtype=float)
    if not len(d):
        return 1.0
    observed = abs(d.sum()) - 1e-12 * max(1.0, float(np.abs(d).sum()))
    if len(d) <= exact_max:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        return float(np.mean(np.abs(signs @ d) >= observed))
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(resamples, len(d)))
    hits = int(np.sum(np.abs(signs @ d) >= observed))
    return (1 + hits) / (1 + resamples)


def paired_p(a: Sequence[float], b: Sequence[float], *, seed: int = 0) -> tuple[float, str]:
    """``(p, test)``: the exact McNemar test when both samples are binary, else :func:`sign_flip_p`."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    if is_binary(a) and is_binary(b):
        return mcnemar(a, b).p, "McNemar exact"
    return sign_flip_p([x - y for x, y in zip(a, b, strict=True)], seed=seed), "sign-flip"


def clopper_pearson(successes: int, n: int, *, alpha: float = ALPHA) -> tuple[float, float]:
    """Exact ``1 - alpha`` interval of a proportion, as fractions (``nan`` for ``n = 0``)."""
    from scipy.stats import beta

    _check_counts(successes, n)
    if n == 0:
        return math.nan, math.nan
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, n - successes + 1))
    high = 1.0 if successes == n else float(beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return low, high


def wilson(successes: int, n: int, *, alpha: float = ALPHA) -> tuple[float, float]:
    """Wilson score interval of a proportion, as fractions (``nan`` for ``n = 0``)."""
    from scipy.stats import norm

    _check_counts(successes, n)
    if n == 0:
        return math.nan, math.nan
    z = float(norm.ppf(1 - alpha / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _check_counts(successes: int, n: int) -> None:
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")


def proportion(stat: Stat) -> Stat:
    """A :class:`Stat` of a 0/1 outcome with its Clopper-Pearson interval instead of the bootstrap one.

    The count is recovered from the mean (``x = round(mean n / 100)``); ``stat`` unchanged for ``n = 0``.
    """
    if stat.n == 0 or math.isnan(stat.mean):
        return stat
    successes = round(stat.mean * stat.n / 100)
    low, high = clopper_pearson(successes, stat.n)
    return Stat(mean=stat.mean, low=100 * low, high=100 * high, n=stat.n)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order (``nan`` stays ``nan`` and is not counted)."""
    known = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(known)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


@dataclass(frozen=True)
class Resolved:
    """Cells of a summary tested together: how many are resolved after Holm, and which way."""

    cells: int
    """Cells with a test (a p-value)."""
    resolved: int
    """Cells with Holm-adjusted ``p <= alpha``."""
    negative: int
    """Resolved cells whose difference is below 0."""
    positive: int
    """Resolved cells whose difference is above 0."""
    example_sets: int
    """Independent example sets behind the tested cells (cells sharing a set count once)."""
    resolved_sets: int
    """Example sets with at least one resolved cell."""


def resolved(
    pvalues: Sequence[float], signs: Sequence[float], example_sets: Sequence[str], *, alpha: float = ALPHA
) -> Resolved:
    """Count cells resolved after Holm over all tested cells (``nan`` p: untested, left out).

    ``signs``: each cell's difference (its sign is the direction); ``example_sets``: a key per cell naming
    the examples it was measured on (e.g. the task: error mode keeps the same examples at every layer).
    """
    if not len(pvalues) == len(signs) == len(example_sets):
        raise ValueError("pvalues, signs and example_sets differ in length")
    adjusted = holm(pvalues)
    tested = [i for i, q in enumerate(adjusted) if not math.isnan(q)]
    hits = [i for i in tested if adjusted[i] <= alpha]
    return Resolved(
        cells=len(tested),
        resolved=len(hits),
        negative=sum(1 for i in hits if signs[i] < 0),
        positive=sum(1 for i in hits if signs[i] > 0),
        example_sets=len({example_sets[i] for i in tested}),
        resolved_sets=len({example_sets[i] for i in hits}),
    )
