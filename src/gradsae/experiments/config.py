"""What one experiment run at one layer does: :class:`ExperimentConfig`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gradsae.experiments.stats import Stat, stat
from gradsae.splice import Mode

KSpec = int | str
"""``K``: a count, or a percentage string such as ``"50%"``."""
DEFAULT_KS: tuple[KSpec, ...] = (1, 10, 20, 30, "50%")
SETS = ("top", "bottom")
STEER_POSITIONS = ("last", "all")


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
    steer_positions: tuple[str, ...] = STEER_POSITIONS
    """Where steering edits apply: ``last`` (each pass's last position) and/or ``all``."""
    clamp: tuple[float, float] = (0.0, 50.0)
    """Range of injected donor values."""
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

    def stat(self, values: Sequence[float]) -> Stat:
        """``100 * mean`` of ``values`` with this run's seeded bootstrap interval."""
        return stat(values, seed=self.seed, resamples=self.bootstrap)
