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
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from gradsae import _files
from gradsae.experiments.stats import Stat

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
    budget: dict[str, int]
    """Ranking -> exact ablations in its order needed to find the exact top ``k``."""

    def curve(self, name: str, method: str) -> tuple[float, ...]:
        """``D_m`` (``deletion``, as a drop) or ``S_m`` (``sufficiency``) per grid point."""
        if name == "deletion":
            return tuple(self.clean - y for y in self.deletion[method])
        return self.sufficiency[method]


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

    def summary(self) -> dict[str, dict[str, float]]:
        """Per ranking: normalised areas, and the mean Spearman, recall and budget over examples."""
        out = {}
        for method in self.methods:
            rho = [ex.spearman[method] for ex in self.examples if not math.isnan(ex.spearman[method])]
            out[method] = {
                "deletion_area": self.normalised_area("deletion", method),
                "sufficiency_area": self.normalised_area("sufficiency", method),
                "spearman": float(np.mean(rho)) if rho else math.nan,
                "recall": _mean([ex.recall[method] for ex in self.examples]),
                "budget": _mean([float(ex.budget[method]) for ex in self.examples]),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


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
"""Ranking methods whose TopK sets are kept per example."""


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
    """Method -> its TopK at the run's largest K: ``(latent, score)``, best first."""
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

    def save(self, folder: str | Path) -> Path:
        """Write ``<folder>/examples.json`` atomically."""
        return _files.write_json(Path(folder) / EXAMPLES, dataclasses.asdict(self), sort_keys=False)

    @classmethod
    def load(cls, folder: str | Path) -> ExampleDump:
        """Read ``<folder>/examples.json`` (or the file itself)."""
        path = Path(folder)
        data = _files.read_json(path / EXAMPLES if path.is_dir() else path)
        return from_data(cls, data)
