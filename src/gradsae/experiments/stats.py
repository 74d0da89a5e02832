"""Statistics over kept examples: bootstrap intervals and rank correlation.

* :func:`stat`: ``100 * mean_i x_i`` with a 95% percentile bootstrap interval
  (``resamples`` draws of the examples with replacement, seeded).
* :func:`paired_difference`: ``100 * mean_i (a_i - b_i)`` over the same examples, with a
  95% percentile bootstrap interval that resamples examples (pairs stay together):
  the comparison the paper makes (GradSAE vs activation in one cell).
* :func:`spearman`: Spearman's rank correlation (average ranks for ties).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


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


def stat(values: Sequence[float], *, seed: int, resamples: int) -> Stat:
    """Mean x 100 with a 95% percentile bootstrap interval over examples (seeded)."""
    if not values:
        return Stat(mean=float("nan"), low=float("nan"), high=float("nan"), n=0)
    data = 100 * np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Stat(mean=float(data.mean()), low=float(low), high=float(high), n=len(data))


def paired_difference(a: Sequence[float], b: Sequence[float], *, seed: int, resamples: int) -> Stat:
    """``100 * mean(a - b)`` over paired examples with a 95% bootstrap interval (in points)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return stat([x - y for x, y in zip(a, b, strict=True)], seed=seed, resamples=resamples)


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation (average ranks for ties); ``a``, ``b``: anything numpy reads (CPU tensors too)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)).statistic)
