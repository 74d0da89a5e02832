"""Every type a command writes, each with ``save`` / ``load``, and one generic loader.

A result file is the JSON of a frozen dataclass (``dataclasses.asdict``). :func:`from_data`
reads it back by walking the field annotations: a dataclass field from its dict, ``tuple[X, ...]``
and ``tuple[X, Y]`` from lists, ``dict[K, V]`` with ``V`` converted, ``X | None``, numbers as
``int`` / ``float``. Keys the class does not know are ignored (files written by a newer version),
missing ones take the field's default (files written by an older one).

* :class:`RunResults` (``results.json``): :class:`RunMeta` and one :class:`LayerResult` per layer,
  each holding the :class:`Condition` cells of the masking and steering tables and, when measured,
  the faithfulness curves (:class:`CurveResult`, kept as its dict);
* :class:`CardSet` (``cards_layer{l}.json``): :class:`FeatureCard` per latent;
* :class:`ExampleDump` (``examples.json``): :class:`LayerExamples` per layer.

Reading these needs neither torch nor transformers: ``gradsae report`` and a notebook start here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from gradsae import _files
from gradsae.experiments.stats import Stat, bootstrap

T = TypeVar("T")


def from_data(cls: type[T], data: dict[str, Any]) -> T:
    """The dataclass ``cls`` from its JSON form (see the module docstring)."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    return cls(**{f.name: _value(hints[f.name], data[f.name]) for f in fields if f.name in data})


def _value(kind: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as the annotation ``kind`` says."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        return _value(next(a for a in args if a is not type(None)), value)
    if dataclasses.is_dataclass(kind):
        return from_data(kind, value)  # type: ignore[arg-type]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_value(args[0], v) for v in value)
        return tuple(_value(a, v) for a, v in zip(args, value, strict=True))
    if origin is dict:
        return {_value(args[0], k): _value(args[1], v) for k, v in value.items()}
    if origin is list:
        return [_value(args[0], v) for v in value]
    if kind is float or kind is int or kind is str:
        return kind(value)
    return value


# -- masking and steering cells -------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One cell of a table: a method, a set, a K, (for steering) a position mode."""

    method: str
    """Ranking method, or ``none`` for the unedited row."""
    set: str
    """``top``, ``bottom`` or ``-`` (no edit)."""
    k: str
    exact: Stat
    """Exact match (accuracy) against the target: the gold answer, or the donor's gold when steering."""
    f1: Stat
    positions: str = ""
    """Steering positions (see :data:`~gradsae.experiments.config.STEER_POSITIONS`); ``""`` for masking."""
    mean_k: float = 0.0
    """Average number of latents actually edited per example."""
    edit: str = "zero"
    """``zero`` (masking, or the zero-only floor), ``swap``, ``inject`` or ``none``."""
    own: Stat | None = None
    """Steering only: exact match against the recipient's own gold answer."""
    per_example: tuple[float, ...] = ()
    """Exact match of each example (in kept / pair order), for paired comparisons."""
    k_min: int | None = None
    """Fewest latents edited in one example (``None`` in files written before it was recorded)."""
    k_max: int | None = None
    """Most latents edited in one example."""
    removed_norm: float | None = None
    """Mean over examples of ``sum_{c in set} H_c ||W_dec[c]||`` (``H_c`` the latent's mean activation over the
    spliced positions at the answer step): a bound on the residual norm a masking condition removes."""


# -- a run (results.json) --------------------------------------------------------------------------


RESULTS = "results.json"


@dataclass(frozen=True)
class LayerResult:
    """Everything measured at one layer (``results.json`` holds one per layer)."""

    layer: int
    n_examples: int
    n_kept: int
    baseline: Stat
    """Task score of the spliced model on all examples (before keeping the correct ones)."""
    clean_baseline: Stat
    """Task score of the model without the SAE, on the same examples."""
    perturbation: tuple[Condition, ...]
    steering: tuple[Condition, ...]
    overlap: dict[str, float]
    n_donor_pairs: int
    diagnostics: dict[str, Any]
    curves: dict[str, Any] = field(default_factory=dict)
    """Faithfulness curves (``CurveResult.to_dict()``) when the run asked for them, else empty."""


@dataclass(frozen=True)
class RunMeta:
    """How a run was made: ``results.json``'s ``config``."""

    task: str
    metric: str
    model: str
    n: int
    """Examples drawn before keeping the correct ones."""
    seed: int
    mode: str
    """Splice mode."""
    methods: tuple[str, ...]
    ks: tuple[str, ...]
    steer_positions: tuple[str, ...]
    sae_labels: dict[str, str]
    """Layer (as a string) -> what SAE was used there."""
    batch_size: int
    max_new_tokens: int
    objective: str
    aggregation: str
    versions: dict[str, str]
    paper: bool = False
    """Run with the paper-exact preset (``--paper``)."""
    skip_first: bool = True
    """Each prompt's first token left unspliced."""
    keep_f1: float | None = None
    """Kept: F1 at least this; ``None``: exact match."""
    donor_value: str = "activation"
    """What a donor latent is injected with."""
    floors: bool = True
    """Steering floors measured."""
    curves: bool = False
    """Faithfulness curves measured."""
    curves_n: int | None = None
    """Curves on the first this many kept examples (``None``: all)."""


@dataclass(frozen=True)
class RunResults:
    """A whole run: its metadata and one result per layer."""

    config: RunMeta
    layers: tuple[LayerResult, ...]

    def to_json(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config), "layers": [dataclasses.asdict(r) for r in self.layers]}

    def save(self, folder: str | Path) -> Path:
        """Write ``<folder>/results.json`` atomically."""
        return _files.write_text(Path(folder) / RESULTS, json.dumps(self.to_json(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder: str | Path) -> RunResults:
        """Read ``<folder>/results.json`` (or the file itself)."""
        path = Path(folder)
        data = _files.read_json(path / RESULTS if path.is_dir() else path)
        return from_data(cls, data)


# -- faithfulness curves (inside results.json) -----------------------------------------------------


CURVES = ("deletion", "sufficiency")


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
    return bootstrap([v for v in values if not math.isnan(v)], seed=0, resamples=CURVE_BOOTSTRAP)


def _bootstrap_ratio(n: int, fn: Any) -> Stat:
    """``fn(all rows)`` with a 95% percentile interval of ``fn`` over resampled rows (``nan`` draws dropped)."""
    return bootstrap(range(n), lambda rows: fn([int(i) for i in rows]), seed=0, resamples=CURVE_BOOTSTRAP)


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


# -- feature cards (cards_layer{l}.json) -----------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """A window of one corpus sequence around the token where the latent peaks."""

    sequence: int
    """Index of the corpus sequence."""
    start: int
    """Position in that sequence of the window's first token."""
    tokens: tuple[str, ...]
    activation: tuple[float, ...]
    influence: tuple[float, ...]
    peak: int
    """Index in ``tokens`` of the maximum that ranked this context."""
    value: float
    """That maximum (activation or influence)."""


@dataclass(frozen=True)
class FeatureCard:
    """One latent: corpus statistics, top contexts, logit lens, and where a run chose it."""

    latent: int
    density: float
    """Share of corpus tokens (BOS excluded) where the latent is active."""
    max_activation: float
    mean_activation: float
    """Mean activation over the tokens where it is active."""
    mean_influence: float
    """Mean signed influence over the tokens where it is active."""
    hist_edges: tuple[float, ...]
    """Bin edges of the histogram of nonzero activations."""
    hist_counts: tuple[int, ...]
    top_activation: tuple[Context, ...]
    top_influence: tuple[Context, ...]
    promoted: tuple[tuple[str, float], ...]
    """Logit lens: tokens the decoder direction raises most, with ``v``."""
    suppressed: tuple[tuple[str, float], ...]
    logit_edges: tuple[float, ...]
    """Bin edges of the histogram of ``v`` over the vocabulary."""
    logit_counts: tuple[int, ...]
    in_run: dict[str, tuple[str, ...]]
    """Ranking method -> ids of the run's examples whose TopK holds the latent (empty without a run)."""


@dataclass(frozen=True)
class CardSet:
    """Cards of several latents of one SAE, and how they were computed (``cards_layer{l}.json``)."""

    model: str
    layer: int
    sae: str
    """What SAE it is (the label ``resolve_sae`` gives)."""
    corpus: str
    n_sequences: int
    context: int
    """Tokens per corpus sequence, BOS included."""
    objective: str
    logit_lens: str
    """What the logit lens computed (which norm weight, if any)."""
    cards: tuple[FeatureCard, ...]

    def card(self, latent: int) -> FeatureCard | None:
        return next((c for c in self.cards if c.latent == latent), None)

    def save(self, path: str | Path) -> Path:
        """Write the JSON file atomically."""
        return _files.write_json(path, dataclasses.asdict(self), sort_keys=False)

    @classmethod
    def load(cls, path: str | Path) -> CardSet:
        data = _files.read_json(path)
        return from_data(cls, data)


def cards_path(folder: str | Path, layer: int) -> Path:
    """Where a run keeps the cards of ``layer``."""
    return Path(folder) / f"cards_layer{layer}.json"


# -- per-example dump (examples.json) --------------------------------------------------------------


EXAMPLES = "examples.json"


TRACED = ("gradsae", "activation")
"""The two rankings every run has and every ``examples.json`` keeps (the cards list their examples);
files written since issue 23 keep the TopK of every ranking method of the run."""


@dataclass(frozen=True)
class LatentTrace:
    """One latent's per-token values in one example, at the positions where it is active."""

    latent: int
    gradsae: float
    """The latent's GradSAE score in this example (the run's aggregation of the influence)."""
    mean_activation: float
    """Its mean activation over the spliced positions (the activation ranking's score)."""
    positions: tuple[int, ...]
    """Indices into the example's ``tokens``."""
    activation: tuple[float, ...]
    """``H[n, c]`` at each position."""
    influence: tuple[float, ...]
    """``H[n, c] * dY/dH[n, c]`` at each position (signed)."""
    scores: dict[str, float] = field(default_factory=dict)
    """Ranking method -> the latent's score in this example (every method of the run; empty in older files)."""
    token_scores: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Method -> its signed per-token attribution at each position, for the estimators that have one beside
    GradSAE's ``influence`` (``ig``, ``relp``)."""


@dataclass(frozen=True)
class ExampleRecord:
    """One kept example: its tokens, answers, TopK sets and the per-token values of their latents."""

    id: str
    tokens: tuple[str, ...]
    """The scored input, one string per token (special tokens included)."""
    prompt_len: int
    """Tokens of the prompt; the rest were generated before the answer step."""
    answer: str
    """The spliced model's generated text."""
    gold: tuple[str, ...]
    label: str | None
    target: str
    """The greedy token ``y*`` whose probability is the objective."""
    objective: float
    """``Y = p(y*)`` with the SAE spliced, no edits."""
    top: dict[str, tuple[tuple[int, float], ...]]
    """Ranking method (every one of the run's ``methods``; older files: gradsae and activation only) -> its
    TopK at the run's largest K: ``(latent, score)``, best first."""
    traces: tuple[LatentTrace, ...]
    """Per-token values of every latent in ``top``."""
    masked: dict[str, str] = field(default_factory=dict)
    """Masking condition ``method/set/K`` (or ``none``) -> the answer text under it."""


@dataclass(frozen=True)
class LayerExamples:
    """The kept examples of one layer."""

    layer: int
    examples: tuple[ExampleRecord, ...]


@dataclass(frozen=True)
class ExampleDump:
    """``examples.json``: one :class:`LayerExamples` per layer of the run."""

    layers: tuple[LayerExamples, ...]

    def layer(self, layer: int) -> LayerExamples | None:
        return next((part for part in self.layers if part.layer == layer), None)

    def merged(self, folder: str | Path, layers: Sequence[int]) -> ExampleDump:
        """This dump plus, for each of ``layers`` it lacks, that layer from ``<folder>/examples.json`` if the
        file holds it (runs journaled before the examples were), in ``layers`` order."""
        path = Path(folder) / EXAMPLES
        try:
            before = ExampleDump.load(path) if path.is_file() else ExampleDump(layers=())
        except (ValueError, KeyError, TypeError):
            before = ExampleDump(layers=())
        parts = [self.layer(layer) or before.layer(layer) for layer in layers]
        return ExampleDump(layers=tuple(part for part in parts if part is not None))

    def save(self, folder: str | Path) -> Path:
        """Write ``<folder>/examples.json`` atomically."""
        return _files.write_json(Path(folder) / EXAMPLES, dataclasses.asdict(self), sort_keys=False)

    @classmethod
    def load(cls, folder: str | Path) -> ExampleDump:
        """Read ``<folder>/examples.json`` (or the file itself)."""
        path = Path(folder)
        data = _files.read_json(path / EXAMPLES if path.is_dir() else path)
        return from_data(cls, data)
