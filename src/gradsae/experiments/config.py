"""What one experiment run at one layer does: :class:`ExperimentConfig`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
class ExperimentConfig:
    """What to run for one task at one layer."""

    layer: int
    """Decoder block the SAE is spliced after."""
    mode: Mode = "error"
    """Splice mode: ``error`` (exact model) or ``replace`` (the paper's)."""
    methods: tuple[str, ...] = ("gradsae", "activation", "random")
    """Ranking methods (add ``ablation`` for the exact effect; slow)."""
    ks: tuple[KSpec, ...] = DEFAULT_KS
    """Values of K; ``"50%"`` is half the latents active at the last token."""
    steer_positions: tuple[str, ...] = ("last",)
    """Where steering edits apply: any of :data:`STEER_POSITIONS`."""
    clamp: tuple[float, float] = (0.0, 50.0)
    """Range of injected donor values."""
    donor_value: str = "activation"
    """Value a donor's latent is injected with: ``activation`` (its activation at the donor's last input
    token, else its mean activation; the default) or ``score`` (its score under the ranking method, as the
    authors' code does; the random ranking uses the mean activation)."""
    floors: bool = True
    """Also run the steering floors (no edit, zero-only, inject-only) next to the full swap."""
    skip_first: bool = True
    """Leave each prompt's first token (the attention sink) unspliced; ``False`` splices every position,
    as the authors' code does."""
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
    """Also measure faithfulness curves (:mod:`gradsae.experiments.curves`) on the kept examples."""
    curves_n: int | None = None
    """Curves on the first ``curves_n`` kept examples only (``None``: all; each costs one forward per
    active latent)."""
    ig_steps: int = 10
    """Integrated-gradients steps for the ``ig`` method (:mod:`gradsae.estimators`)."""

    def __post_init__(self) -> None:
        bad = [p for p in self.steer_positions if p not in STEER_POSITIONS]
        if bad:
            raise GradSAEError(f"unknown steering positions {bad}: use {', '.join(STEER_POSITIONS)}")
        if self.donor_value not in DONOR_VALUES:
            raise GradSAEError(f"unknown donor value {self.donor_value!r}: use {' or '.join(DONOR_VALUES)}")

    def stat(self, values: Sequence[float]) -> Stat:
        """``100 * mean`` of ``values`` with this run's seeded bootstrap interval."""
        return stat(values, seed=self.seed, resamples=self.bootstrap)
