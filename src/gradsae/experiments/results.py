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
* :class:`ExampleDump` (``examples.json``): :class:`LayerExamples` per layer;
* :class:`SteerResult` (``steering.json``): its :class:`SteerConfig`, the :class:`Concept` s and one
  :class:`Cell` per layer and prompt seed (:class:`ConceptRun` > :class:`MethodRun` > :class:`Point`),
  read by their own ``from_dict`` (JSON numbers kept as written: a resumed run writes the same bytes).

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
from gradsae.errors import GradSAEError
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


# -- concept steering (steering.json) -------------------------------------------------------------


STEER_METHODS = ("gradsae", "gradsae-target", "activation", "logit-lens", "arad", "dtc", "random")
METHOD_NAMES = {
    "gradsae": "GradSAE, the paper's aggregation (every position of prompt + target)",
    "gradsae-target": "GradSAE on the target-predicting positions only",
    "activation": "mean activation on the concept texts",
    "logit-lens": "logit-lens projection on the concept words (a stand-in, not Arad et al.'s output score)",
    "arad": "Arad et al. (2025) output score (their §3.2: rank-weighted probability of the latent's top-20 "
    "logit-lens tokens after adding 10 x the largest activation at the last position of 'In my experience,', "
    "minus before), over the activation pool",
    "dtc": "ΔToken Confidence (Wang et al. 2025, arXiv 2510.03659 §4.1, App. D): |change of -log top-1 "
    "next-token probability| on 'From my experience,' with the latent's activation x10, over the activation pool",
    "random": "random latents (several seeded draws)",
}
"""What each selector is, as the report names it."""
DEFAULT_ALPHAS = (0.05, 0.1, 0.2, 0.4, 0.8)

FREEZE = {
    "sha256": "ca698705bcdb27aac9f8eb64d86ee2ead683967d388907cf78dd207ffbb930ef",
    "date": "2026-12-07 06:36 UTC",
    "note": "concepts, prompts, contrast texts, alpha grid, K and selectors frozen; the second seed is drawn "
    "from this hash, after the freeze",
}
"""The freeze record; ``tests`` check that the frozen payload still hashes to it."""


def second_seed(sha: str = FREEZE["sha256"]) -> int:
    """The second prompt seed, drawn from the freeze hash (an integer below 10^6)."""
    return int(sha[:12], 16) % 1_000_000


@dataclass(frozen=True)
class SteerConfig:
    """What to run: the selectors, the strengths, the prompts and the fluency budget."""

    layers: tuple[int, ...] = ()
    """Decoder blocks to steer at, one SAE each (empty: the SAE's own)."""
    k: int = 8
    """Latents added per selector."""
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    """Strengths swept: the added vector's norm in units of the residual stream's median token norm at the layer."""
    methods: tuple[str, ...] = STEER_METHODS
    """Selectors: any of gradsae, gradsae-target, activation, logit-lens, arad, dtc, random."""
    random_draws: int = 5
    """Seeded draws of the random selector, each its own run."""
    pool: int = 32
    """Candidates (best activation scores) that arad and dtc rank by their output scores."""
    amplify: float = 10.0
    """The output scores' strength: Arad et al. add this times the largest latent activation at the last
    position; ΔToken Confidence multiplies the latent's activation by it (both papers use 10)."""
    n_seed: int = 4
    """Seed prompts the scores are computed on."""
    n_heldout: int = 6
    """Held-aside prompts that choose alpha and set the residual norm."""
    n_eval: int = 12
    """Evaluation prompts that the numbers are reported on."""
    max_new_tokens: int = 24
    """Tokens generated per prompt."""
    max_ppl_ratio: float = 2.0
    """Fluency budget: held-aside perplexity at most this times the unsteered one."""
    min_distinct_ratio: float = 0.8
    """Fluency budget: held-aside distinct-2 at least this times the unsteered one."""
    batch_size: int = 12
    """Texts per scoring batch (generation batches are one selector's rows)."""
    seeds: tuple[int, ...] = (0, second_seed())
    """Prompt seeds: each reshuffles the prompt split (and the random draws)."""
    resamples: int = 1000
    """Bootstrap resamples."""
    contrast: str = "neutral"
    """Contrast for gradsae / activation when a concept has no negatives: neutral (built-in texts) or none."""
    judge_margin: float = 0.2
    """A sentiment judge is good when its P(label) on the concept texts beats the negatives' by this much."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in STEER_METHODS]
        if unknown or not self.methods:
            raise GradSAEError(f"unknown steering methods {unknown}: use any of {', '.join(STEER_METHODS)}")
        if not self.alphas or any(a <= 0 for a in self.alphas):
            raise GradSAEError(f"alphas must be positive (0, no steering, is always measured), got {self.alphas}")
        if min(self.n_seed, self.n_heldout, self.n_eval, self.k, self.max_new_tokens, self.random_draws) < 1:
            raise GradSAEError("k, n_seed, n_heldout, n_eval, max_new_tokens and random_draws must each be >= 1")
        if self.pool < self.k:
            raise GradSAEError(f"--pool ({self.pool}) must be at least --k ({self.k})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise GradSAEError(f"seeds must be distinct and at least one, got {self.seeds}")
        if self.contrast not in ("neutral", "none"):
            raise GradSAEError(f"unknown contrast {self.contrast!r}: use 'neutral' or 'none'")

    def runs(self) -> tuple[str, ...]:
        """The selector runs: each method once, random once per draw (``random-0``, ...)."""
        out: list[str] = []
        for method in self.methods:
            out += [f"random-{d}" for d in range(self.random_draws)] if method == "random" else [method]
        return tuple(out)


@dataclass(frozen=True)
class Point:
    """One selector at one strength on one prompt split."""

    method: str
    """Selector run, or ``none`` (unsteered)."""
    alpha: float
    split: str
    """``heldout`` or ``eval``."""
    success: Stat
    """Concept presence (% of generations) or the judge's P(label) (x100)."""
    rate: Stat
    """Concept words per 100 words."""
    ppl: Stat
    """Perplexity of the generated tokens under the unsteered model."""
    distinct: Stat
    """Distinct token bigrams (% of bigrams)."""
    success_per_prompt: tuple[float, ...]
    nll_per_prompt: tuple[float, ...]
    texts: tuple[str, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Point:
        stats = {key: Stat.from_dict(data[key]) for key in ("success", "rate", "ppl", "distinct")}
        tuples = {key: tuple(data[key]) for key in ("success_per_prompt", "nll_per_prompt", "texts")}
        return cls(**{**data, **stats, **tuples})


@dataclass(frozen=True)
class MethodRun:
    """One selector run for one concept in one cell: its latents, held-aside sweep, chosen alpha, evaluation."""

    method: str
    latents: tuple[int, ...]
    weights: tuple[float, ...]
    """Typical activation ``a_c`` of each latent: the mix of the direction before it is scaled."""
    unfired: tuple[bool, ...]
    """Latents that never fired on the reference texts (given the median weight)."""
    points: tuple[Point, ...]
    """Held-aside points for every alpha, then the evaluation point at the chosen alpha (if it is not 0)."""
    alpha: float
    """Chosen on the held-aside prompts; 0: no strength beat the unsteered model within the budget."""

    def point(self, alpha: float, split: str) -> Point | None:
        return next((p for p in self.points if p.alpha == alpha and p.split == split), None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodRun:
        return cls(
            method=data["method"],
            latents=tuple(data["latents"]),
            weights=tuple(data["weights"]),
            unfired=tuple(data["unfired"]),
            points=tuple(Point.from_dict(p) for p in data["points"]),
            alpha=data["alpha"],
        )


@dataclass(frozen=True)
class ConceptRun:
    """Every selector for one concept in one cell, with the unsteered points."""

    concept: str
    baseline: tuple[Point, ...]
    """Unsteered (alpha 0) on the held-aside and the evaluation prompts."""
    methods: tuple[MethodRun, ...]

    def base(self, split: str) -> Point:
        return next(p for p in self.baseline if p.split == split)

    def evaluated(self, method: MethodRun) -> Point:
        """The evaluation point at the chosen alpha (the unsteered one for alpha 0)."""
        return method.point(method.alpha, "eval") or self.base("eval")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConceptRun:
        return cls(
            concept=data["concept"],
            baseline=tuple(Point.from_dict(p) for p in data["baseline"]),
            methods=tuple(MethodRun.from_dict(m) for m in data["methods"]),
        )


@dataclass(frozen=True)
class Cell:
    """One layer and one prompt seed."""

    layer: int
    seed: int
    sae: str
    prompts: dict[str, tuple[str, ...]]
    """The ``seed``, ``heldout`` and ``eval`` prompts (before the chat template)."""
    resid_norm: float
    """``R``: median token norm of the residual at the layer on the held-aside prompts (alpha's unit)."""
    concepts: tuple[ConceptRun, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        return cls(
            layer=data["layer"],
            seed=data["seed"],
            sae=data["sae"],
            prompts={k: tuple(v) for k, v in data["prompts"].items()},
            resid_norm=data["resid_norm"],
            concepts=tuple(ConceptRun.from_dict(c) for c in data["concepts"]),
        )


@dataclass(frozen=True)
class SteerResult:
    """A whole steering run; ``save`` / ``load`` as JSON (no wall time: a resumed run writes the same bytes)."""

    config: SteerConfig
    model: str
    concepts: tuple[Concept, ...]
    judges: dict[str, dict[str, Any]]
    """Per concept, the judge check of :func:`judge_check`."""
    cells: tuple[Cell, ...]
    freeze: dict[str, str]
    command: str = ""

    def save(self, path: str | Any) -> Any:
        return _files.write_json(path, dataclasses.asdict(self), sort_keys=False)

    @classmethod
    def load(cls, path: str | Any) -> SteerResult:
        data = _files.read_json(path)
        return cls(
            config=SteerConfig(**_tuples(data["config"])),
            model=data["model"],
            concepts=tuple(Concept(**_tuples(c)) for c in data["concepts"]),
            judges=data["judges"],
            cells=tuple(Cell.from_dict(c) for c in data["cells"]),
            freeze=data["freeze"],
            command=data.get("command", ""),
        )

    def concept(self, name: str) -> Concept:
        return next(c for c in self.concepts if c.name == name)


@dataclass(frozen=True)
class Concept:
    """What to steer toward: words that show it, texts that express it, optionally its opposite."""

    name: str
    words: tuple[str, ...]
    """Words whose presence in generated text shows the concept; also the logit-lens target tokens."""
    texts: tuple[str, ...] = ()
    """Texts that express the concept (GradSAE targets, activation texts); empty: the words joined."""
    negatives: tuple[str, ...] = ()
    """Texts of the opposite concept; when given, their scores are subtracted (a contrast)."""
    judge: str | None = None
    """A sentiment label (``positive`` / ``negative``): success is the model's own judgement; ``None``: words."""

    def __post_init__(self) -> None:
        if not self.words:
            raise GradSAEError(f"concept {self.name!r} has no words: pass at least one target word")
        if self.judge not in (None, "positive", "negative"):
            raise GradSAEError(f"unknown judge label {self.judge!r}: use positive, negative or none")

    @property
    def targets(self) -> tuple[str, ...]:
        """The texts, else the words joined by commas."""
        return self.texts or (", ".join(self.words),)


def within_budget(point: Point, baseline: Point, cfg: SteerConfig) -> bool:
    """Held-aside perplexity and distinct-2 within the fluency budget of the unsteered model's."""
    fluent = point.ppl.mean <= cfg.max_ppl_ratio * baseline.ppl.mean
    return fluent and point.distinct.mean >= cfg.min_distinct_ratio * baseline.distinct.mean


def _tuples(data: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back to the tuples of a frozen dataclass."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
