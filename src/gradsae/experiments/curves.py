"""Faithfulness curves: how well a ranking orders the latents by their real effect on the output.

After the deletion / sufficiency curves of feature-circuits (Marks et al. 2024)
and MIB (Mueller et al. 2025), and the ablation budget of AtP* (Kramár et al. 2024).

Setting, per example: one input ``x`` (the prompt, plus the tokens generated
before the answer step), the SAE spliced after block ``l``, and ``A`` the set of
latents active at some spliced position (``a = |A|``). The objective is the
probability of one *pinned* token::

    t*   = argmax_v p(v | x)            the greedy token of the spliced, unedited model
    Y(E) = p(t* | x; latents in E zeroed at every spliced position),   Y_0 = Y({})

``t*`` is held fixed under every edit (``NextTokenProb`` would read the new
argmax once an edit changes it, and the curves would measure the wrong thing).

Rankings order ``A`` completely, ``r_m = (c_1, ..., c_a)``, by descending score
(ties: lower latent index first), and ``Top_m(K) = {c_1, ..., c_K}``:

* ``gradsae``: the paper's ``mean_n relu(H[n, c] dY/dH[n, c])``;
* ``gradsae_sum``: ``sum_n H[n, c] dY/dH[n, c]``, the first-order estimate of ``Y_0 - Y({c})``;
* ``activation``: ``mean_n H[n, c]``; ``random``: a seeded uniform score;
* ``ablation``: the exact ``Y_0 - Y({c})`` (one forward per active latent).

Curves on a grid of fractions ``0 = f_0 < f_1 < ... < f_J = 1``, ``K_j = round(f_j a)``:

* deletion: ``D_m(f_j) = Y_0 - Y(Top_m(K_j))``, the drop after zeroing the top ``K_j``;
* sufficiency: ``S_m(f_j) = Y(A - Top_m(K_j))``, what the top ``K_j`` alone keep.

The spliced positions are the run's: ``skip_first`` (each row's first token left unspliced unless
``--splice-first``) holds for ``t*``, the scores and every edited forward, and is recorded in the result.

Both ends are the same for every ranking (``D(0) = 0``, ``D(1) = Y_0 - Y(A) = Y_0 - S(0)``,
``S(1) = Y_0``); larger is better in between. The area of a curve ``C`` is the
trapezoid rule over ``f``: ``AUC = sum_j (f_j - f_{j-1}) (C(f_{j-1}) + C(f_j)) / 2``.
The normalised area of ranking ``m`` over examples ``i`` is::

    N_m = (sum_i AUC_m,i - sum_i AUC_random,i) / (sum_i AUC_ablation,i - sum_i AUC_random,i)

so ``N = 1`` for the exact-ablation ranking and ``0`` for the random one by
construction (a ratio of sums: an example where the two nearly coincide does not
blow it up; ``nan`` when the denominator is 0). Single-latent ablation orders
latents for deletion, not for sufficiency (keeping a set is not the sum of single
removals), so the sufficiency denominator can be small and ``N`` far outside [0, 1].

Estimate vs exact, per example over ``A`` (means over examples are reported):
``spearman_m`` = Spearman's rho between ``m``'s scores and the exact effects;
``recall_m = |Top_m(k) & Top_ablation(k)| / k`` with ``k = min(top, a)``
(``top = 10``); and the AtP* budget ``B_m = max_{c in Top_ablation(k)} rank_m(c)``
(1-based): how many exact ablations, taken in ``m``'s order, it takes to have
found the exact top ``k`` (``k`` is perfect, ``a`` the worst).

Figures reported (:meth:`CurveResult.metric`, each with a 95% bootstrap interval over examples):

* besides the grid, ``D`` and ``S`` at fixed ``K`` in :data:`LOG_KS` and at the experiment's K
  (``K = 50%`` is the example's own count), so the curves see the K the experiments edit;
* the deletion area over ``ln K``: ``L_m = (1 / ln(K_b / K_a)) int_{K_a}^{K_b} D_m d ln K`` by the
  trapezoid rule on the measured points with ``1 <= K <= KMAX = 50``, normalised as
  ``(sum_i L_m,i - sum_i L_rand,i) / (sum_i L_abl,i - sum_i L_rand,i)`` (the linear area gave the region
  ``f <= 0.02``, where K = 10-16 lives, 2% of the weight); the random anchor is the mean over
  :data:`RANDOM_DRAWS` permutations (curves, recall and budget alike);
* sufficiency as the fraction of ``Y_0`` kept, ``S_m(K) / Y_0`` (its mean over ``ln K``, and at the
  experiment's K): no ratio to the random-vs-exact gap, which can vanish;
* Spearman's rho of the scores against the signed effect ``e_c = Y_0 - Y({c})`` and against ``|e_c|``, over
  all active latents and over the top :data:`TOP_RHO` (by ``e_c``, resp. ``|e_c|``): an unsigned score
  (activation, the paper's relu score) can only be expected to follow ``|e_c|``;
* threshold budgets (AtP*): ``max_{c : |e_c| >= x Y_0} rank_m(c)``, the exact ablations taken in ``m``'s
  order to have found every latent whose effect is at least ``x`` of ``Y_0`` (``x`` in :data:`THRESHOLDS`).

Cost per example: one forward and backward (the scores), ``a`` ablation forwards,
and one forward per distinct edited set (at most ``2 J`` per ranking), all on the
prompt only, batched, and each past block ``l`` only (:mod:`gradsae.prefix`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradsae import _files
from gradsae.errors import GradSAEError
from gradsae.experiments.config import ExperimentConfig
from gradsae.experiments.rank import KeptExample, k_value, padded
from gradsae.experiments.stats import Stat, spearman
from gradsae.generate import answer_inputs
from gradsae.models import LoadedModel, position_ids
from gradsae.objectives import CustomObjective
from gradsae.prefix import Prefix, compute_prefix, replay_prefix
from gradsae.sae import SAE
from gradsae.scores import Scores, objective_value, score_methods
from gradsae.splice import Edit, Mode, resolve_layer, splice

RANKINGS = ("gradsae", "gradsae_sum", "activation", "random", "ablation")
DEFAULT_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
LOG_KS = (1, 2, 5, 10, 20, 50)
"""Absolute K measured in every example (besides the grid and the experiment's K): the log-K area's points."""
RANDOM_DRAWS = 20
"""Random permutations averaged into the random anchor."""
TOP_RHO = 50
"""Spearman's rho is also taken over the exact top this many latents."""
THRESHOLDS = (0.05, 0.01)
"""Threshold budgets: find every latent whose exact ``|effect| >= x Y_0``."""
CURVES = ("deletion", "sufficiency")
NAMES = {
    "gradsae": "GradSAE",
    "gradsae_sum": "GradSAE (sum)",
    "activation": "activation",
    "random": "random",
    "ablation": "exact ablation",
}
COLOURS = {
    "gradsae": "tab:red",
    "gradsae_sum": "tab:orange",
    "activation": "tab:blue",
    "random": "tab:gray",
    "ablation": "tab:green",
}


@dataclass(frozen=True)
class ExampleCurves:
    """The curves and estimate-vs-exact figures of one example."""

    token: int
    """The pinned token ``t*``."""
    clean: float
    """``Y_0``."""
    n_active: int
    """``a``: latents active at some spliced position."""
    ks: tuple[int, ...]
    """``K_j = round(f_j a)`` for each grid point."""
    deletion: dict[str, tuple[float, ...]]
    """Ranking -> ``Y(Top_m(K_j))`` per grid point (the drop ``D`` is ``clean`` minus this)."""
    sufficiency: dict[str, tuple[float, ...]]
    """Ranking -> ``S_m(f_j) = Y(A - Top_m(K_j))`` per grid point."""
    spearman: dict[str, float]
    """Ranking -> Spearman's rho with the exact effects (``nan`` with fewer than 3 active latents)."""
    recall: dict[str, float]
    """Ranking -> top-``k`` recall of the exact top ``k``."""
    budget: dict[str, float]
    """Ranking -> exact ablations in its order needed to find the exact top ``k`` (random: mean over draws)."""
    fixed_ks: tuple[int, ...] = ()
    """Absolute ``K`` values also measured: the log grid :data:`LOG_KS` and the experiment's K, within ``[1, a]``."""
    deletion_at: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Ranking -> ``Y(Top_m(K))`` at each of ``fixed_ks``."""
    sufficiency_at: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Ranking -> ``Y(A - Top_m(K))`` at each of ``fixed_ks``."""
    experiment_ks: dict[str, int] = field(default_factory=dict)
    """The experiment's K labels (``"10"``, ``"50%"``) -> this example's K (all in ``fixed_ks``)."""
    random_draws: int = 1
    """Random permutations averaged into the ``random`` ranking's curves, recall and budget."""
    spearman_abs: dict[str, float] = field(default_factory=dict)
    """Ranking -> Spearman's rho with the *absolute* exact effects, over all active latents."""
    spearman_top: dict[str, float] = field(default_factory=dict)
    """Ranking -> Spearman's rho with the exact effects over the exact top ``TOP_RHO`` (by effect)."""
    spearman_top_abs: dict[str, float] = field(default_factory=dict)
    """Ranking -> Spearman's rho with the absolute effects over the top ``TOP_RHO`` by absolute effect."""
    thresholds: tuple[float, ...] = ()
    """Fractions ``x`` of ``Y_0`` of the threshold budgets."""
    threshold_targets: tuple[int, ...] = ()
    """Per threshold: latents whose ``|Y_0 - Y({c})| >= x Y_0``."""
    threshold_budget: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Ranking -> per threshold, exact ablations in its order to have found every such latent (0 if none)."""

    def curve(self, name: str, method: str) -> tuple[float, ...]:
        """``D_m`` (``deletion``, as a drop) or ``S_m`` (``sufficiency``) per grid point."""
        if name == "deletion":
            return tuple(self.clean - y for y in self.deletion[method])
        return self.sufficiency[method]

    def points(self, name: str, method: str) -> list[tuple[int, float]]:
        """``(K, D_m(K))`` or ``(K, S_m(K))`` at every measured K (grid and fixed), by increasing K."""
        fixed = self.deletion_at if name == "deletion" else self.sufficiency_at
        values = dict(zip(self.ks, self.curve(name, method), strict=True))
        if method in fixed:
            at = fixed[method]
            values |= {k: (self.clean - y if name == "deletion" else y) for k, y in zip(self.fixed_ks, at, strict=True)}
        return sorted(values.items())

    def at_k(self, name: str, method: str, label: str) -> float:
        """``D_m`` or ``S_m`` at the experiment's K ``label`` (``nan`` if not measured)."""
        k = self.experiment_ks.get(label)
        return dict(self.points(name, method)).get(k, math.nan) if k is not None else math.nan


@dataclass(frozen=True)
class CurveResult:
    """Faithfulness curves of every ranking on a set of examples at one layer."""

    layer: int
    mode: str
    grid: tuple[float, ...]
    """Fractions ``f_j`` of the active latents, from 0 to 1."""
    methods: tuple[str, ...]
    top: int
    """``k`` of the recall and the budget (at most ``a``)."""
    examples: tuple[ExampleCurves, ...]
    skip_first: bool = True
    """Each row's first token was left unspliced (``False``: ``--splice-first``, the authors' choice)."""

    def areas(self, name: str, method: str) -> list[float]:
        """``AUC`` of curve ``name`` (``deletion`` or ``sufficiency``) for ``method``, per example."""
        return [auc(self.grid, ex.curve(name, method)) for ex in self.examples]

    def normalised_area(self, name: str, method: str) -> float:
        """``N_m``: 1 = the exact-ablation ranking, 0 = the random one (see the module docstring)."""
        if not self.examples:
            return math.nan
        low, high = sum(self.areas(name, "random")), sum(self.areas(name, "ablation"))
        return normalise(sum(self.areas(name, method)), low, high)

    def mean_curve(self, name: str, method: str) -> list[float]:
        """The curve averaged over examples, per grid point."""
        return [float(v) for v in np.mean([ex.curve(name, method) for ex in self.examples], axis=0)]

    def log_areas(self, name: str, method: str) -> list[float]:
        """Mean of curve ``name`` over ``ln K`` for ``1 <= K <= KMAX``, per example (see :func:`log_area`)."""
        return [log_area(ex.points(name, method)) for ex in self.examples]

    def normalised_log_area(self, name: str, method: str) -> float:
        """``N_m`` of the log-K area: a ratio of sums over examples, 0 = the random anchor, 1 = exact ablation."""
        return _ratio_of_sums([self.log_areas(name, m) for m in (method, "random", "ablation")], None)

    def metric(self, name: str, method: str) -> Stat:
        """One curve figure of ``method`` over examples, with its 95% bootstrap interval (resampled examples).

        ``deletion_log``: :meth:`normalised_log_area` of the deletion curve; ``sufficiency_log``: the mean over
        ``ln K`` (``K <= KMAX``) of ``S(K) / Y_0``, the fraction of ``Y_0`` the top K alone keep;
        ``deletion@L`` / ``sufficiency@L``: ``D(K) / Y_0`` / ``S(K) / Y_0`` at the experiment's K ``L``;
        ``spearman``, ``spearman_abs``, ``spearman_top``, ``spearman_top_abs``, ``recall``, ``budget``,
        ``budget_x`` (threshold ``x``): per-example means.
        """
        if name == "deletion_log":
            parts = [self.log_areas("deletion", m) for m in (method, "random", "ablation")]
            return _bootstrap_ratio(len(self.examples), partial(_ratio_of_sums, parts))
        return stat_over(self.per_example(name, method))

    def per_example(self, name: str, method: str) -> list[float]:
        """The per-example values :meth:`metric` averages (``nan`` where not measured)."""
        exs = self.examples
        if name == "sufficiency_log":
            return [log_area(ex.points("sufficiency", method)) / ex.clean for ex in exs]
        if "@" in name:
            curve, label = name.split("@", 1)
            return [ex.at_k(curve, method, label) / ex.clean for ex in exs]
        if name.startswith("budget_"):
            x = float(name.removeprefix("budget_"))
            return [_at_threshold(ex, method, x) for ex in exs]
        if name == "budget":
            return [float(ex.budget[method]) for ex in exs]
        table: dict[str, Any] = {
            "spearman": lambda ex: ex.spearman,
            "spearman_abs": lambda ex: ex.spearman_abs,
            "spearman_top": lambda ex: ex.spearman_top,
            "spearman_top_abs": lambda ex: ex.spearman_top_abs,
            "recall": lambda ex: ex.recall,
        }
        return [float(table[name](ex).get(method, math.nan)) for ex in exs]

    def experiment_labels(self) -> list[str]:
        """The experiment's K labels measured in every example, by increasing mean K."""
        labels = [set(ex.experiment_ks) for ex in self.examples]
        common = set.intersection(*labels) if labels else set()
        return sorted(common, key=lambda label: np.mean([ex.experiment_ks[label] for ex in self.examples]))

    def summary(self) -> dict[str, dict[str, float]]:
        """Per ranking: every curve figure (:meth:`metric`) as ``name``, ``name_low``, ``name_high``; and the
        earlier linear areas (``deletion_area_linear``, ``sufficiency_area_linear``) for comparison."""
        out = {}
        for method in self.methods:
            row: dict[str, float] = {
                "deletion_area_linear": self.normalised_area("deletion", method),
                "sufficiency_area_linear": self.normalised_area("sufficiency", method),
            }
            for name in self.metric_names():
                figure = self.metric(name, method)
                row |= {name: figure.mean, f"{name}_low": figure.low, f"{name}_high": figure.high}
            out[method] = row
        return out

    def metric_names(self) -> list[str]:
        """Every figure these examples hold (files written before a field existed lack it)."""
        names = ["deletion_log", "sufficiency_log"]
        names += [f"{c}@{label}" for label in self.experiment_labels() for c in CURVES]
        names += ["spearman"]
        if self.examples and all(ex.spearman_abs for ex in self.examples):
            names += ["spearman_abs", "spearman_top", "spearman_top_abs"]
        names += ["recall", "budget"]
        if self.examples and all(ex.thresholds for ex in self.examples):
            names += [f"budget_{x:g}" for x in self.examples[0].thresholds]
        return names

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CurveResult:
        tuples = ("ks", "fixed_ks", "thresholds", "threshold_targets")
        nested = ("deletion", "sufficiency", "deletion_at", "sufficiency_at", "threshold_budget")
        examples = tuple(
            ExampleCurves(
                **{
                    **ex,
                    **{key: tuple(ex[key]) for key in tuples if key in ex},
                    **{key: {m: tuple(v) for m, v in ex[key].items()} for key in nested if key in ex},
                }
            )
            for ex in data["examples"]
        )
        return cls(
            layer=int(data["layer"]),
            mode=str(data["mode"]),
            grid=tuple(data["grid"]),
            methods=tuple(data["methods"]),
            top=int(data["top"]),
            examples=examples,
            skip_first=bool(data.get("skip_first", True)),  # older files: the curves always skipped it
        )


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


CURVE_BOOTSTRAP = 1000
"""Resamples of the examples for every curve figure's 95% interval (seed 0)."""
KMAX = 50
"""The log-K area covers ``1 <= K <= KMAX`` (where the experiments' K live)."""


def log_area(points: Sequence[tuple[int, float]], kmax: int = KMAX) -> float:
    """Mean height of a curve over ``ln K``: the trapezoid rule over ``ln K`` on the points with
    ``1 <= K <= kmax``, divided by ``ln K_last - ln K_first`` (``nan`` with fewer than two such points)."""
    inside = [(math.log(k), v) for k, v in points if 1 <= k <= kmax]
    if len(inside) < 2 or inside[-1][0] == inside[0][0]:
        return math.nan
    total = sum((b - a) * (u + v) / 2 for (a, u), (b, v) in pairwise(inside))
    return total / (inside[-1][0] - inside[0][0])


def stat_over(values: Sequence[float]) -> Stat:
    """Mean of the non-``nan`` values with a 95% bootstrap interval over examples (``n`` counts them)."""
    known = [v for v in values if not math.isnan(v)]
    if not known:
        return Stat(mean=math.nan, low=math.nan, high=math.nan, n=0)
    data = np.asarray(known, dtype=float)
    rng = np.random.default_rng(0)
    means = data[rng.integers(0, len(data), size=(CURVE_BOOTSTRAP, len(data)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Stat(mean=float(data.mean()), low=float(low), high=float(high), n=len(data))


def _bootstrap_ratio(n: int, fn: Any) -> Stat:
    """``fn(all rows)`` with a 95% percentile interval of ``fn`` over resampled rows (``nan`` draws dropped)."""
    if n == 0:
        return Stat(mean=math.nan, low=math.nan, high=math.nan, n=0)
    rng = np.random.default_rng(0)
    draws = [fn(list(rng.integers(0, n, size=n))) for _ in range(CURVE_BOOTSTRAP)]
    known = [d for d in draws if not math.isnan(d)]
    low, high = np.percentile(known, [2.5, 97.5]) if known else (math.nan, math.nan)
    return Stat(mean=float(fn(list(range(n)))), low=float(low), high=float(high), n=n)


def _ratio_of_sums(parts: Sequence[Sequence[float]], rows: Sequence[int] | None) -> float:
    """``normalise`` of the sums over ``rows`` (all) of ``parts = (method, random, ablation)`` per example;
    examples where any is ``nan`` are left out."""
    rows = range(len(parts[0])) if rows is None else rows
    keep = [i for i in rows if not any(math.isnan(p[i]) for p in parts)]
    if not keep:
        return math.nan
    method, low, high = (sum(p[i] for i in keep) for p in parts)
    return normalise(method, low, high)


def _at_threshold(ex: ExampleCurves, method: str, x: float) -> float:
    if x not in ex.thresholds or method not in ex.threshold_budget:
        return math.nan
    return float(ex.threshold_budget[method][ex.thresholds.index(x)])


# -- the maths --------------------------------------------------------------------------------------
def auc(grid: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid rule: ``sum_j (f_j - f_{j-1}) (C_{j-1} + C_j) / 2``."""
    points = list(zip(grid, values, strict=True))
    return float(sum((b - a) * (u + v) / 2 for (a, u), (b, v) in pairwise(points)))


def normalise(area: float, random_area: float, ablation_area: float) -> float:
    """``(area - random) / (ablation - random)``; ``nan`` when the last two are equal."""
    span = ablation_area - random_area
    return (area - random_area) / span if span != 0 else math.nan


def full_order(score: torch.Tensor, active: torch.Tensor) -> list[int]:
    """The ``active`` latents by descending ``score``, ties by ascending latent index."""
    latents = active.sort().values
    order = score[latents].double().argsort(descending=True, stable=True)
    return latents[order].tolist()


def budget(order: Sequence[int], targets: Sequence[int]) -> int:
    """1-based position in ``order`` by which every latent of ``targets`` has been seen (0 for none)."""
    rank = {c: i + 1 for i, c in enumerate(order)}
    missing = [c for c in targets if c not in rank]
    if missing:
        raise GradSAEError(f"latents {missing} are not in the ranking: rank every active latent")
    return max((rank[c] for c in targets), default=0)


def recall(order: Sequence[int], exact: Sequence[int], k: int) -> float:
    """``|order[:k] & exact[:k]| / k`` (``nan`` for ``k = 0``)."""
    return len(set(order[:k]) & set(exact[:k])) / k if k else math.nan


def grid_ks(grid: Sequence[float], n_active: int) -> tuple[int, ...]:
    """``K_j = round(f_j a)``."""
    return tuple(round(f * n_active) for f in grid)


def check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    grid = tuple(float(f) for f in grid)
    if len(grid) < 2 or grid[0] != 0.0 or grid[-1] != 1.0 or any(b <= a for a, b in pairwise(grid)):
        raise GradSAEError(f"grid {grid} must rise strictly from 0 to 1: e.g. (0, 0.1, 0.5, 1)")
    return grid


# -- the objective ----------------------------------------------------------------------------------
def pinned_token_prob(token: int) -> CustomObjective:
    """``p(token)`` at the last position, whatever the argmax is."""
    return CustomObjective(fn=partial(_token_prob, token=token), keep=1)


def _token_prob(logits: torch.Tensor, token: int) -> torch.Tensor:
    step = logits[:, -1].to(torch.promote_types(logits.dtype, torch.float32))
    return step.softmax(dim=-1)[:, token]


@torch.no_grad()
def greedy_token(
    lm: LoadedModel, sae: SAE, ids: torch.Tensor, mask: torch.Tensor, *, layer: int, mode: Mode, skip_first: bool = True
) -> int:
    """``t*``: the greedy next token of the spliced model without edits (one row)."""
    with splice(lm, sae, layer, mode=mode, record=False, skip_first=skip_first):
        out = lm.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False, logits_to_keep=1
        )
    return int(out.logits[0, -1].argmax())


# -- computing the curves ---------------------------------------------------------------------------
def faithfulness(
    lm: LoadedModel,
    sae: SAE,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    layer: int | None = None,
    mode: Mode = "error",
    rankings: Sequence[str] = RANKINGS,
    grid: Sequence[float] = DEFAULT_GRID,
    top: int = 10,
    seed: int = 0,
    batch_size: int = 32,
    skip_first: bool = True,
    experiment_ks: Sequence[dict[str, int]] | None = None,
    random_draws: int = RANDOM_DRAWS,
) -> CurveResult:
    """Deletion and sufficiency curves, estimate vs exact and budgets for each row of a left-padded batch.

    Each row is measured alone, without its padding, so its numbers do not depend on the batch.
    ``skip_first`` leaves each row's first token unspliced, as in every other measurement of a run;
    ``experiment_ks`` (one mapping per row, label -> K) adds the experiment's K to the measured points;
    ``random_draws`` permutations are averaged into the random anchor.
    """
    grid = check_grid(grid)
    unknown = [m for m in rankings if m not in RANKINGS]
    if unknown:
        raise GradSAEError(f"unknown rankings {unknown}: use {', '.join(RANKINGS)}")
    methods = tuple(dict.fromkeys([*rankings, "random", "ablation"]))
    layer = resolve_layer(sae, layer)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    rows = [input_ids[row, mask[row].bool()][None] for row in range(input_ids.shape[0])]  # padding dropped
    examples = tuple(
        example_curves(
            lm,
            sae,
            rows[row],
            torch.ones_like(rows[row]),
            layer=layer,
            mode=mode,
            methods=methods,
            grid=grid,
            top=top,
            seed=seed + row,
            batch_size=batch_size,
            skip_first=skip_first,
            experiment_ks=None if experiment_ks is None else experiment_ks[row],
            random_draws=random_draws,
        )
        for row in range(input_ids.shape[0])
    )
    return CurveResult(
        layer=layer, mode=mode, grid=grid, methods=methods, top=top, examples=examples, skip_first=skip_first
    )


def example_curves(
    lm: LoadedModel,
    sae: SAE,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    layer: int,
    mode: Mode,
    methods: Sequence[str],
    grid: Sequence[float],
    top: int,
    seed: int,
    batch_size: int,
    skip_first: bool = True,
    experiment_ks: dict[str, int] | None = None,
    random_draws: int = RANDOM_DRAWS,
) -> ExampleCurves:
    """Everything for one row (``ids``, ``mask``: ``[1, pos]``); see the module docstring."""
    token = greedy_token(lm, sae, ids, mask, layer=layer, mode=mode, skip_first=skip_first)
    objective = pinned_token_prob(token)
    base = list(dict.fromkeys("gradsae" if m == "gradsae_sum" else m for m in methods))
    by = score_methods(
        lm,
        sae,
        ids,
        mask,
        objective,
        methods=base,
        layer=layer,
        mode=mode,
        seed=seed,
        ablation_batch=batch_size,
        skip_first=skip_first,
    )
    active = torch.nonzero(by["ablation"].mean_act[0] > 0).squeeze(-1)
    scores = {m: method_scores(by, m) for m in methods}
    orders = {m: [full_order(scores[m], active)] for m in methods}
    if "random" in orders:  # the anchor: the seeded ranking and random_draws - 1 more permutations
        orders["random"] += random_orders(active, draws=random_draws - 1, seed=seed)
    ks = grid_ks(grid, len(active))
    labelled = dict(experiment_ks or {})
    fixed = fixed_k_values(len(active), list(labelled.values()))
    labelled = {label: min(k, len(active)) for label, k in labelled.items() if len(active)}
    deletion_sets = {m: [[o[:k] for k in ks] for o in orders[m]] for m in methods}
    sufficiency_sets = {m: [[o[k:] for k in ks] for o in orders[m]] for m in methods}
    deletion_fixed = {m: [[o[:k] for k in fixed] for o in orders[m]] for m in methods}
    sufficiency_fixed = {m: [[o[k:] for k in fixed] for o in orders[m]] for m in methods}
    every = [
        s
        for sets in (deletion_sets, sufficiency_sets, deletion_fixed, sufficiency_fixed)
        for m in methods
        for draw in sets[m]
        for s in draw
    ]
    prefix = compute_prefix(lm, ids, mask, layer)
    values = zeroed_objectives(lm, sae, prefix, mask, objective, every, mode, batch_size, skip_first=skip_first)
    k = min(top, len(active))
    exact = orders["ablation"][0]
    effect = scores["ablation"]
    clean = float(by["ablation"].objective[0])
    targets = [threshold_targets(effect, active, x * clean) for x in THRESHOLDS]

    def mean_over_draws(sets: dict[str, list[list[list[int]]]], m: str) -> tuple[float, ...]:
        return tuple(float(np.mean(col)) for col in zip(*([values[_key(s)] for s in d] for d in sets[m]), strict=True))

    return ExampleCurves(
        token=token,
        clean=clean,
        n_active=len(active),
        ks=ks,
        deletion={m: mean_over_draws(deletion_sets, m) for m in methods},
        sufficiency={m: mean_over_draws(sufficiency_sets, m) for m in methods},
        spearman={m: _spearman(scores[m], effect, active) for m in methods},
        recall={m: float(np.mean([recall(o, exact, k) for o in orders[m]])) if k else math.nan for m in methods},
        budget={m: float(np.mean([budget(o, exact[:k]) for o in orders[m]])) for m in methods},
        fixed_ks=fixed,
        deletion_at={m: mean_over_draws(deletion_fixed, m) for m in methods},
        sufficiency_at={m: mean_over_draws(sufficiency_fixed, m) for m in methods},
        experiment_ks=labelled,
        random_draws=len(orders.get("random", [[]])),
        spearman_abs={m: _spearman(scores[m], effect.abs(), active) for m in methods},
        spearman_top={m: _spearman(scores[m], effect, torch.tensor(exact[:TOP_RHO])) for m in methods},
        spearman_top_abs={m: _spearman(scores[m], effect.abs(), top_by_size(effect, active)) for m in methods},
        thresholds=THRESHOLDS,
        threshold_targets=tuple(len(t) for t in targets),
        threshold_budget={
            m: tuple(float(np.mean([budget(o, t) for o in orders[m]])) for t in targets) for m in methods
        },
    )


def random_orders(active: torch.Tensor, *, draws: int, seed: int) -> list[list[int]]:
    """``draws`` seeded uniform permutations of the ``active`` latents."""
    latents = active.sort().values.cpu()
    gen = torch.Generator().manual_seed(10_007 * (seed + 1))
    return [latents[torch.randperm(len(latents), generator=gen)].tolist() for _ in range(max(0, draws))]


def fixed_k_values(n_active: int, experiment: Sequence[int] = ()) -> tuple[int, ...]:
    """:data:`LOG_KS` and the experiment's K, each clipped to ``[1, a]``, sorted and distinct (``()`` for ``a = 0``)."""
    if n_active == 0:
        return ()
    return tuple(sorted({min(max(1, int(k)), n_active) for k in (*LOG_KS, *experiment)}))


def threshold_targets(effect: torch.Tensor, active: torch.Tensor, bar: float) -> list[int]:
    """Active latents whose exact effect has ``|Y_0 - Y({c})| >= bar``."""
    return [int(c) for c in active.tolist() if abs(float(effect[c])) >= bar]


def top_by_size(effect: torch.Tensor, active: torch.Tensor, n: int = TOP_RHO) -> torch.Tensor:
    """The ``n`` active latents with the largest ``|effect|`` (ties: lower index first)."""
    return torch.tensor(full_order(effect.abs(), active)[:n], dtype=torch.long)


def method_scores(by: dict[str, Scores], method: str) -> torch.Tensor:
    """``[d_sae]`` scores of ranking ``method`` for the one row of ``by``."""
    if method != "gradsae_sum":
        return by[method].per_latent[0]
    grad = by["gradsae"]
    total = torch.zeros_like(grad.per_latent[0])
    return total.index_add_(0, grad.token_index[:, 2], grad.token_score.to(total.dtype))


def _spearman(score: torch.Tensor, exact: torch.Tensor, active: torch.Tensor) -> float:
    if len(active) < 3:
        return math.nan
    a, b = score[active].detach().cpu(), exact[active].detach().cpu()
    if bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return math.nan  # a constant has no rank correlation
    return spearman(a, b)


def _key(latents: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted(latents))


def zeroed_objectives(
    lm: LoadedModel,
    sae: SAE,
    prefix: Prefix,
    mask: torch.Tensor,
    objective: CustomObjective,
    sets: Sequence[Sequence[int]],
    mode: Mode,
    batch_size: int,
    *,
    skip_first: bool = True,
) -> dict[tuple[int, ...], float]:
    """``Y(E)`` for each distinct set ``E`` of ``sets`` (zeroed at every spliced position), ``batch_size`` sets a
    forward; ``skip_first`` as in the run."""
    unique = list(dict.fromkeys(_key(s) for s in sets))
    out: dict[tuple[int, ...], float] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        copies = prefix.expand(len(chunk))
        edit = Edit(latents=padded(chunk).to(prefix.input_ids.device), op="zero", positions="all")
        with (
            splice(lm, sae, prefix.layer, mode=mode, edits=[edit], record=False, skip_first=skip_first),
            replay_prefix(lm, copies),
            torch.no_grad(),
        ):
            y = objective_value(lm, copies.input_ids, mask.expand(len(chunk), -1), objective)
        out.update(zip(chunk, y.tolist(), strict=True))
    return out


def kept_curves(lm: LoadedModel, sae: SAE, kept: Sequence[KeptExample], cfg: ExperimentConfig) -> dict[str, Any]:
    """The curves of the kept examples at their answer steps, as ``CurveResult.to_dict()`` (``{}`` if none)."""
    kept = kept[: cfg.curves_n] if cfg.curves_n is not None else kept
    if not kept:
        return {}
    parts = []
    for start in range(0, len(kept), cfg.batch_size):
        rows = kept[start : start + cfg.batch_size]
        ids, mask = answer_inputs(lm.tokenizer, [k.generation for k in rows], [k.step for k in rows])
        parts.append(
            faithfulness(
                lm,
                sae,
                ids.to(lm.device),
                mask.to(lm.device),
                layer=cfg.layer,
                mode=cfg.mode,
                seed=cfg.seed + start,
                skip_first=cfg.skip_first,
                experiment_ks=[{str(k): k_value(k, ex) for k in cfg.ks} for ex in rows],
            )
        )
    first = parts[0]
    merged = CurveResult(
        layer=first.layer,
        mode=first.mode,
        grid=first.grid,
        methods=first.methods,
        top=first.top,
        examples=tuple(ex for part in parts for ex in part.examples),
        skip_first=cfg.skip_first,
    )
    return merged.to_dict()


# -- output ---------------------------------------------------------------------------------------------
METRIC_TITLES = {
    "deletion_log": "deletion area over log K (K <= 50; 0 = random, 1 = exact)",
    "sufficiency_log": "sufficiency over log K (fraction of Y_0 kept)",
    "spearman": "Spearman vs signed effect (all active)",
    "spearman_abs": "Spearman vs |effect| (all active)",
    "spearman_top": "Spearman vs signed effect (exact top-50)",
    "spearman_top_abs": "Spearman vs |effect| (top-50 by |effect|)",
}


def metric_title(name: str, top: int) -> str:
    """A column title for :meth:`CurveResult.metric` ``name``."""
    if "@" in name:
        curve, label = name.split("@", 1)
        return f"{'D' if curve == 'deletion' else 'S'}(K={label}) / Y_0"
    if name == "recall":
        return f"top-{top} recall"
    if name == "budget":
        return f"budget for the exact top-{top}"
    if name.startswith("budget_"):
        return f"budget for every |effect| >= {100 * float(name.removeprefix('budget_')):g}% of Y_0"
    return METRIC_TITLES.get(name, name)


def fmt_metric(figure: Stat, digits: int = 2) -> str:
    """``0.53 [0.41, 0.66]`` (``n/a`` without a value)."""
    if figure.n == 0 or math.isnan(figure.mean):
        return "n/a"
    if math.isnan(figure.low):
        return f"{figure.mean:.{digits}f}"
    return f"{figure.mean:.{digits}f} [{figure.low:.{digits}f}, {figure.high:.{digits}f}]"


def _digits(name: str) -> int:
    return 0 if name.startswith("budget") else 2


def curves_markdown(result: CurveResult) -> list[str]:
    """A markdown section: per ranking, every curve figure with its 95% bootstrap interval over examples."""
    names = result.metric_names()
    shape = [n for n in names if n in ("deletion_log", "sufficiency_log") or "@" in n]
    exact = [n for n in names if n not in shape]
    mean_a = _mean([float(ex.n_active) for ex in result.examples])
    draws = max((ex.random_draws for ex in result.examples), default=1)
    lines = [
        f"### Faithfulness curves ({len(result.examples)} examples; objective p(pinned clean token); "
        f"first token {'left unspliced' if result.skip_first else 'spliced'})",
        "",
        f"Every figure: mean over examples [95% bootstrap interval over examples]. Mean active latents "
        f"{mean_a:.0f}; the random anchor averages {draws} permutation{'s' if draws != 1 else ''} per example. "
        "D(K) = Y_0 - Y(top K zeroed), S(K) = Y(all but the top K zeroed); the deletion area is the mean of D over "
        "ln K for 1 <= K <= 50 (the measured points), normalised as a ratio of sums over examples.",
        "",
    ]
    for title, group in (("Curves", shape), ("Estimate vs exact ablation", exact)):
        lines += [
            f"{title}:",
            "",
            "| ranking | " + " | ".join(metric_title(n, result.top) for n in group) + " |",
            "|---|" + "---|" * len(group),
        ]
        for method in result.methods:
            cells = [fmt_metric(result.metric(n, method), _digits(n)) for n in group]
            lines.append(f"| {NAMES.get(method, method)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def curve_summary_sentence(
    result: CurveResult, methods: Sequence[str] = ("gradsae", "gradsae_sum", "activation")
) -> str:
    """Every curve figure of ``methods`` with its interval, as one paragraph a summary can quote."""
    present = [m for m in methods if m in result.methods]
    parts = []
    for name in result.metric_names():
        values = ", ".join(f"{NAMES.get(m, m)} {fmt_metric(result.metric(name, m), _digits(name))}" for m in present)
        extra = ""
        if name.startswith("budget"):
            extra = f"; random {fmt_metric(result.metric(name, 'random'), 0)}"
        parts.append(f"{metric_title(name, result.top)}: {values}{extra}")
    mean_a = _mean([float(ex.n_active) for ex in result.examples])
    draws = min((ex.random_draws for ex in result.examples), default=1)
    head = (
        f"{len(result.examples)} examples, {mean_a:.0f} active latents on average, random anchor averaged over "
        f"{draws} permutation{'s' if draws != 1 else ''}"
    )
    if not any(ex.fixed_ks for ex in result.examples):
        ks = sorted({k for ex in result.examples for k in ex.ks if 1 <= k <= KMAX})
        span = f"K = {ks[0]}-{ks[-1]}" if ks else "no K"
        head += (
            f" (this file predates the log-K points: its areas use the linear grid's points with K <= {KMAX}, {span})"
        )
    return head + "; " + "; ".join(parts) + "."


def plot_curves(result: CurveResult, path: str | Path) -> Path:
    """Two panels (deletion drop, sufficiency) of the mean curves vs the fraction of active latents, with a 95%
    bootstrap band over examples, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    titles = {"deletion": "deletion: Y_0 - Y(top K zeroed)", "sufficiency": "sufficiency: Y(all but top K zeroed)"}
    for ax, name in zip(axes, CURVES, strict=True):
        for method in result.methods:
            figure = result.metric(f"{name}_log" if name == "sufficiency" else "deletion_log", method)
            label = f"{NAMES.get(method, method)} ({'log-K area' if name == 'deletion' else 'S/Y_0'} {figure.mean:.2f})"
            band = [stat_over(col) for col in zip(*(ex.curve(name, method) for ex in result.examples), strict=True)]
            colour = COLOURS.get(method)
            ax.plot(result.grid, [b.mean for b in band], "-o", ms=3, color=colour, label=label)
            ax.fill_between(result.grid, [b.low for b in band], [b.high for b in band], color=colour, alpha=0.12)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0, 1)
        ax.set_title(f"layer {result.layer}: {titles[name]}")
        ax.set_xlabel("fraction of active latents (K / a)")
        ax.set_ylabel("drop in p(pinned token)" if name == "deletion" else "p(pinned token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with _files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
