"""What one experiment run at one layer does: :class:`ExperimentConfig`, its :class:`SpliceSpec`, and the presets.

A :class:`Preset` holds the choices where this project's default and the paper's protocol (the
authors' code) differ; :data:`DEFAULT` takes each from the dataclass fields below, :data:`PAPER` is
the paper-exact instance (``gradsae reproduce --paper``; ``docs/deviations.md`` lists each choice).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gradsae.errors import GradSAEError
from gradsae.experiments.stats import Stat, stat
from gradsae.splice import Mode

KSpec = int | str
"""``K``: a count, or a percentage string such as ``"50%"``."""
DEFAULT_KS: tuple[KSpec, ...] = (1, 10, 20, 30, "50%")
SETS = ("top", "bottom")
STEER_POSITIONS = ("last", "cumulative", "all")
"""``last``: the authors' final code (each pass edits only its current last position; the KV cache keeps
unedited keys/values, as when the whole sequence is re-run uncached); ``cumulative``: each token is edited
while it is the newest and the edit stays in the cache; ``all``: every position of every pass."""
STEER_EDITS = ("swap", "zero", "inject")
"""Steering conditions: ``swap`` (zero own TopK, set the donor's; the paper's), and its two halves as
floors: ``zero`` (own TopK zeroed, nothing injected) and ``inject`` (donor's set, own left alone)."""
DONOR_VALUES = ("activation", "score")


@dataclass(frozen=True)
class SpliceSpec:
    """Where and how the SAE is spliced into the model (:func:`gradsae.splice.splice`)."""

    layer: int
    """Decoder block whose output the SAE reads (and is spliced after)."""
    mode: Mode = "error"
    """Splice mode: error (the model stays exact, masked latents lose their decoder share) or replace (the
    paper's: the residual becomes the reconstruction, so the model's outputs change)."""
    skip_first: bool = True
    """Leave each prompt's first token (the attention sink) unspliced, since SAEs trained without position 0
    reconstruct it badly; ``False`` splices (and masks) every position, as the authors' code does."""


@dataclass(frozen=True)
class ExperimentConfig:
    """What to run for one task at one layer."""

    splice: SpliceSpec
    """Where and how the SAE is spliced."""
    methods: tuple[str, ...] = ("gradsae", "activation", "random")
    """Ranking methods, in order (ablation: the exact effect, one forward per active latent; slow)."""
    ks: tuple[KSpec, ...] = DEFAULT_KS
    """Values of K; 50% is half the latents active at the last token."""
    steer_positions: tuple[str, ...] = ("last",)
    """Steering edit positions: last (the authors' final code: each pass edits only its last position, the KV
    cache stays unedited), cumulative (each token edited while newest, kept in the cache) or all (every
    position)."""
    clamp: tuple[float, float] = (0.0, 50.0)
    """Range of injected donor values."""
    donor_value: str = "activation"
    """Value a donor latent is injected with: activation (its activation at the donor's last input token, else
    its mean activation) or score (its ranking score, as the authors' code does; the random ranking uses the
    mean activation)."""
    floors: bool = True
    """Also run the steering floors (no edit, zero-only, inject-only) that sit next to each swap."""
    keep_f1: float | None = None
    """Keep examples whose F1 with the SAE is at least this (the authors' 0.9); ``None``: exact match."""
    batch_size: int = 16
    """Examples per forward batch."""
    seed: int = 0
    """Seed for donors, the random ranking and the bootstrap."""
    bootstrap: int = 1000
    """Bootstrap resamples for the 95% intervals."""
    reuse_prefix: bool = True
    """Compute blocks ``0..l`` of each prompt once for all masking / steering conditions."""
    curves: bool = False
    """Also measure faithfulness curves (deletion / sufficiency; see gradsae.experiments.curves)."""
    curves_n: int | None = None
    """Curves on the first N kept examples only (``None``: all; each costs one forward per active latent)."""
    ig_steps: int = 10
    """Integrated-gradients steps (method ig; see gradsae.estimators)."""

    def __post_init__(self) -> None:
        bad = [p for p in self.steer_positions if p not in STEER_POSITIONS]
        if bad:
            raise GradSAEError(f"unknown steering positions {bad}: use {', '.join(STEER_POSITIONS)}")
        if self.donor_value not in DONOR_VALUES:
            raise GradSAEError(f"unknown donor value {self.donor_value!r}: use {' or '.join(DONOR_VALUES)}")

    @property
    def layer(self) -> int:
        """``splice.layer``."""
        return self.splice.layer

    @property
    def mode(self) -> Mode:
        """``splice.mode``."""
        return self.splice.mode

    @property
    def skip_first(self) -> bool:
        """``splice.skip_first``."""
        return self.splice.skip_first

    def spliced(self, **changes: Any) -> ExperimentConfig:
        """This config with ``splice``'s fields changed, e.g. ``cfg.spliced(layer=15)``."""
        return dataclasses.replace(self, splice=dataclasses.replace(self.splice, **changes))

    def stat(self, values: Sequence[float]) -> Stat:
        """``100 * mean`` of ``values`` with this run's seeded bootstrap interval."""
        return stat(values, seed=self.seed, resamples=self.bootstrap)


@dataclass(frozen=True)
class Preset:
    """The choices where this project's defaults and the paper's protocol differ (``docs/deviations.md``)."""

    mode: Mode
    """Splice mode."""
    skip_first: bool
    """Each prompt's first token left unspliced."""
    keep_f1: float | None
    """Kept: F1 at least this; ``None``: exact match."""
    steer_positions: tuple[str, ...]
    """Steering edit positions."""
    donor_value: str
    """What a donor latent is injected with."""

    def config(self, layer: int, **given: Any) -> ExperimentConfig:
        """An :class:`ExperimentConfig` at ``layer``: ``given`` fields (those not ``None``) win over this preset's."""
        chosen = {**dataclasses.asdict(self), **{k: v for k, v in given.items() if v is not None}}
        splice = {k: chosen.pop(k) for k in ("mode", "skip_first")}
        return ExperimentConfig(splice=SpliceSpec(layer=layer, **splice), **chosen)


def field_default(name: str) -> Any:
    """The default of the :class:`SpliceSpec` or :class:`ExperimentConfig` field ``name``."""
    fields = (*dataclasses.fields(SpliceSpec), *dataclasses.fields(ExperimentConfig))
    return next(f.default for f in fields if f.name == name)


DEFAULT = Preset(**{f.name: field_default(f.name) for f in dataclasses.fields(Preset)})
"""This project's defaults, read from the fields: ``error`` mode, the first token unspliced, exact-match filter,
activation donors."""
PAPER = Preset(mode="replace", skip_first=False, keep_f1=0.9, steer_positions=("last",), donor_value="score")
"""The paper-exact preset: the authors' code's choices."""
