"""Paired tests for the steering comparison: exact McNemar, a sign-flip permutation test, Holm.

* :func:`mcnemar_exact`: two paired binary outcomes; ``b`` pairs where only the
  first succeeds, ``c`` where only the second does. Under the null each discordant
  pair is a fair coin: ``p = min(1, 2 P(X <= min(b, c)))``, ``X ~ Binomial(b + c, 1/2)``.
* :func:`sign_flip_p`: paired differences ``d_i`` of any outcome; under the null
  each ``d_i`` is as likely ``-d_i``. Two-sided ``p`` of ``|mean d|`` over the
  ``2^n`` sign patterns (exact when at most ``exact_max`` differences are non-zero;
  otherwise ``resamples`` seeded random patterns, ``p = (1 + hits) / (1 + resamples)``).
  On binary outcomes the exact version is McNemar's exact test.
* :func:`holm`: Holm's step-down adjustment of a family of ``p`` values.

(Written here while ``experiments/stats.py`` gains its own versions; the lead may merge them.)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar ``p`` from the discordant counts ``b`` and ``c``."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def sign_flip_p(diffs: Sequence[float], *, seed: int = 0, resamples: int = 20000, exact_max: int = 16) -> float:
    """Two-sided paired sign-flip permutation ``p`` of ``mean(diffs)`` (module docstring)."""
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
    """``(p, test)``: exact McNemar when both are binary, else the sign-flip test, on pairs ``(a_i, b_i)``."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    if all(x in (0.0, 1.0) for x in [*a, *b]):
        only_a = sum(1 for x, y in zip(a, b, strict=True) if x == 1.0 and y == 0.0)
        only_b = sum(1 for x, y in zip(a, b, strict=True) if x == 0.0 and y == 1.0)
        return mcnemar_exact(only_a, only_b), "McNemar exact"
    return sign_flip_p([x - y for x, y in zip(a, b, strict=True)], seed=seed), "sign-flip"


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted ``p`` values, in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
