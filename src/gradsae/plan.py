"""Plan a run before running it: predicted wall time and peak memory from measured per-token costs.

Costs (:class:`Costs`) are measured by the benchmark (``benchmarks/run.py``, its
scaling table) for one model on one device and stored in ``costs.json`` beside this
module; a plan for a model or device with no measured costs is refused.

GradSAE scoring of one prompt of ``n`` tokens, the SAE (``d_in x d_sae``) at layer ``l``
of ``L``, with the backward running through blocks ``l+1 .. L-1`` (``B = L - l - 1``)::

    F(n)    = a n + b n^2                     one plain forward (b: attention)
    time(n) = F(n) (1 + B / L) + e n d_in d_sae
    work(n) = B (c n + q n^2)                 working memory of the backward (MiB)
    peak    = base + sae_mib + max_n work(n)

``a, b`` are fitted to the measured plain forward + backward times over prompt lengths
(divided by the measured ``1 + B_m / L``), ``e`` to the GradSAE time beyond the plain
one at the widest measured SAE (the dense encoder: ``2 d_in d_sae`` flops per token),
``c, q`` to the measured peak working memory (divided by ``B_m``). ``base`` is the
loaded process without the SAE (Python, torch, the model's weights); ``sae_mib`` the
SAE's float32 weights. A run over many prompts (``score --prompts``) scores them one at
a time: the times add up and the peak is the largest prompt's, plus ``load_s`` once.

``gradsae reproduce`` (one layer, per example of ``P`` prompt tokens, at most ``g``
generated tokens, each a token-forward ``a``; token-forwards as counted in
``docs/scaling.md``)::

    keep filter   F(P) + g a                     (twice in replace mode)
    ranking       F(P) (1 + B / L) + e P d_in d_sae
    masking       per condition: F(P) (B + 1) / L + g a   (blocks 0..l reused)
    steering      per condition at the last position: 2 g a (edited pass, unedited refill);
                  at every position: as masking; plus one shared prompt pass

summed over the examples, plus ``load_s``. Without a pilot, an upper bound: every example
kept, every decode ``g`` tokens long (rows stop once answered, examples the model gets wrong
are dropped, and batched rows cost less per token than the single prompts ``a`` comes from).

With a :class:`Pilot` (``reproduce --plan`` runs the keep filter and the ranking, the run's
first two steps, and times them: ``t_keep`` and ``t_rank`` measured, ``t'_keep`` the keep
filter's sum above over every example with its generated length ``g_i``), the run is predicted as::

    load_s + t_keep + t_rank + s * (masking + steering [+ curves])   over the kept examples only,
    s = t_keep / t'_keep,   masking = sum_i F(P_i) C_i / P_i (B + 1) / L + conditions g_i a

with ``C_i`` the prompt columns example ``i``'s masking conditions run (each from its set's first
change: :mod:`gradsae.experiments.pilot`), ``g_i`` for masking its generated length (the run
records every masked answer whole) and for steering its answer steps, the decode steps until its
parsed answer is final (steered rows stop there). ``s`` carries what the per-token costs cannot know:
this machine's speed at the time (other load) and the cheaper per-token cost of batched rows.

``--curves`` (:mod:`gradsae.experiments.curves`) adds, per curve example of ``P`` tokens with
``a`` latents active (counted by encoding the prompt at layer ``l``), ``R`` orders (the
rankings, plus the random anchor's extra permutations) and ``J`` measured K points::

    scores        F(P) (1 + B / L) per estimator (integrated gradients: ig_steps of them)
    exact oracle  a F(P) B / L        (each latent's ablated pass past block l; gradsae.oracle)
    curve points  2 R J F(P) (B + 1) / L   (deletion and sufficiency sets, blocks 0..l reused)

also an upper bound (the oracle starts each pass at the latent's first active column and
batches latents; equal sets are evaluated once).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from gradsae.errors import GradSAEError
from gradsae.models import DEFAULT_MODEL, DEFAULT_NAMES

COSTS_FILE = "costs.json"
"""Measured costs shipped in the package (written by ``benchmarks/run.py``)."""
COSTS_ENV = "GRADSAE_COSTS"
"""An environment variable naming another costs file (read instead of the package's)."""


@dataclass(frozen=True)
class Costs:
    """Per-token costs of one model on one device, as the benchmark measured them."""

    model: str
    """The model's name (``LoadedModel.name``)."""
    device: str
    """``cpu`` or ``cuda``."""
    threads: int
    """Torch threads the costs were measured with (CPU)."""
    n_layers: int
    layer: int
    """The layer the costs were measured at (the backward's depth is scaled from it)."""
    forward_s_per_token: float
    """``a``: one plain forward, seconds per token."""
    forward_s_per_token2: float
    """``b``: one plain forward, seconds per token squared (attention)."""
    encode_s_per_token_weight: float
    """``e``: the dense encoder, seconds per token per ``d_in x d_sae`` weight."""
    work_mib_per_token_layer: float
    """``c``: the backward's working memory, MiB per token per block it runs through."""
    work_mib_per_token2_layer: float
    """``q``: the same, MiB per token squared per block."""
    base_mib: float
    """The loaded process without the SAE (Python, torch, the model)."""
    load_s: float
    """Start-up: loading the model and the SAE."""
    cpu: str = ""
    """The CPU (or GPU) model the costs were measured on."""


@dataclass(frozen=True)
class Plan:
    """A run's predicted wall time and peak memory."""

    seconds: float
    """Predicted wall time (start-up included)."""
    peak_mib: float
    """Predicted peak resident memory (weights included)."""
    tokens: tuple[int, ...]
    """Tokens of each prompt."""
    costs: Costs
    ran: str = ""
    """What was run to make the plan (a pilot), if anything."""

    def text(self, what: str) -> str:
        """The plan, as ``--plan`` prints it."""
        n = len(self.tokens)
        lengths = f"{min(self.tokens)}..{max(self.tokens)}" if n > 1 else str(self.tokens[0])
        return "\n".join(
            [
                f"# plan: {what}",
                f"- {n} prompt{'s' if n > 1 else ''} of {lengths} tokens ({sum(self.tokens)} in all)",
                f"- predicted wall time: {self.seconds:.1f} s; predicted peak memory: {self.peak_mib:.0f} MiB",
                f"- from the costs measured for {self.costs.model} on {self.costs.device} "
                f"({self.costs.cpu or 'unknown'}, {self.costs.threads} threads) by benchmarks/run.py",
                f"- run to plan it: {self.ran}; nothing written (drop --plan to run it all)"
                if self.ran
                else "- nothing was run (drop --plan to run it)",
            ]
        )


@dataclass(frozen=True)
class Pilot:
    """The first two steps of one layer's run (``reproduce --plan``), timed: what the upper bound had to assume."""

    seconds: float
    """Measured wall time of the keep filter (the clean decode, and the spliced one in replace mode)."""
    generated: tuple[int, ...]
    """Tokens each example's clean decode generated (every example)."""
    kept: tuple[int, ...]
    """Indices of the kept examples (answered correctly with the SAE)."""
    answer_steps: tuple[int, ...]
    """Per kept example: decode steps until its parsed answer is final."""
    rank_seconds: float
    """Measured wall time of the ranking (every method's scores of the kept examples)."""
    masked_columns: tuple[int, ...]
    """Per kept example: prompt columns its masking conditions run past block ``l``, each from its first
    change (the first column where a latent of its set is active), summed over the conditions."""


def sae_mib(d_in: int, d_sae: int, bytes_per: int = 4) -> float:
    """An SAE's weights (``W_enc``, ``W_dec``, biases) in MiB."""
    return (2 * d_in * d_sae + d_sae + d_in) * bytes_per / 2**20


def forward_s(costs: Costs, tokens: int) -> float:
    """``F(n)``: one plain forward of ``tokens`` tokens."""
    return costs.forward_s_per_token * tokens + costs.forward_s_per_token2 * tokens**2


def depth(n_layers: int, layer: int) -> int:
    """``B``: blocks the backward to layer ``layer`` runs through."""
    return n_layers - layer - 1


def score_seconds(costs: Costs, tokens: int, *, layer: int, d_in: int, d_sae: int) -> float:
    """``time(n)``: GradSAE scoring of one prompt."""
    back = depth(costs.n_layers, layer) / costs.n_layers
    return forward_s(costs, tokens) * (1 + back) + costs.encode_s_per_token_weight * tokens * d_in * d_sae


def work_mib(costs: Costs, tokens: int, *, layer: int) -> float:
    """``work(n)``: the backward's working memory for one prompt."""
    per = costs.work_mib_per_token_layer * tokens + costs.work_mib_per_token2_layer * tokens**2
    return depth(costs.n_layers, layer) * per


def plan_score(costs: Costs, tokens: Sequence[int], *, layer: int, d_in: int, d_sae: int) -> Plan:
    """``gradsae score``: every prompt scored once, one at a time."""
    _check_tokens(tokens)
    seconds = costs.load_s + sum(score_seconds(costs, n, layer=layer, d_in=d_in, d_sae=d_sae) for n in tokens)
    peak = costs.base_mib + sae_mib(d_in, d_sae) + max(work_mib(costs, n, layer=layer) for n in tokens)
    return Plan(seconds=seconds, peak_mib=peak, tokens=tuple(tokens), costs=costs)


def plan_reproduce(
    costs: Costs,
    tokens: Sequence[int],
    *,
    layer: int,
    d_in: int,
    d_sae: int,
    new_tokens: int,
    masking: int,
    steering: int,
    steer_all: int = 0,
    spliced_decode: bool = False,
    batch: int,
    pilot: Pilot | None = None,
) -> Plan:
    """``gradsae reproduce`` at one layer (the module docstring's sums).

    ``tokens``: each example's prompt length; ``masking`` / ``steering``: conditions per
    example (``steer_all`` of the steering ones edit every position, the rest the last
    only); ``spliced_decode``: the keep filter decodes once more with the SAE (replace
    mode); ``batch``: examples per batch (the ranking backward holds ``batch`` prompts).
    Without ``pilot``, every example kept and every decode ``new_tokens`` long (an upper
    bound); with it, the measured keep filter, its kept examples and answer steps, and the
    rest scaled by :func:`pilot_scale`.
    """
    _check_tokens(tokens)
    decodes = 2 if spliced_decode else 1
    if pilot is None:
        steps = [new_tokens] * len(tokens)
        keep = sum(decodes * _decode_s(costs, n, new_tokens) for n in tokens)
        ranking = sum(_ranking_s(costs, n, layer, d_in, d_sae) for n in tokens)
        masked = _masking_s(costs, tokens, [masking * n for n in tokens], steps, layer, conditions=masking)
        steered = _steering_s(costs, tokens, steps, layer, steering=steering, steer_all=steer_all)
        seconds = keep + ranking + masked + steered
    else:
        kept = [tokens[i] for i in pilot.kept]
        full = [pilot.generated[i] for i in pilot.kept]  # masking decodes whole answers: the run records them
        scale = pilot_scale(costs, tokens, pilot, spliced_decode=spliced_decode)
        masked = _masking_s(costs, kept, list(pilot.masked_columns), full, layer, conditions=masking)
        steered = _steering_s(costs, kept, list(pilot.answer_steps), layer, steering=steering, steer_all=steer_all)
        seconds = pilot.seconds + pilot.rank_seconds + scale * (masked + steered)
    peak = costs.base_mib + sae_mib(d_in, d_sae) + batch * work_mib(costs, max(tokens), layer=layer)
    return Plan(seconds=costs.load_s + seconds, peak_mib=peak, tokens=tuple(tokens), costs=costs)


def pilot_scale(costs: Costs, tokens: Sequence[int], pilot: Pilot, *, spliced_decode: bool) -> float:
    """``s = t_keep / t'_keep``: the measured keep filter over its prediction from the per-token costs."""
    decodes = 2 if spliced_decode else 1
    predicted = sum(decodes * _decode_s(costs, n, g) for n, g in zip(tokens, pilot.generated, strict=True))
    return pilot.seconds / predicted if predicted > 0 else 1.0


def _decode_s(costs: Costs, tokens: int, new_tokens: int) -> float:
    """A greedy decode of one prompt: the prompt forward, then one token-forward per generated token."""
    return forward_s(costs, tokens) + new_tokens * costs.forward_s_per_token


def _ranking_s(costs: Costs, tokens: int, layer: int, d_in: int, d_sae: int) -> float:
    """The ranking of one example: a forward, the backward to the layer, and the dense encoder."""
    back = depth(costs.n_layers, layer) / costs.n_layers
    return forward_s(costs, tokens) * (1 + back) + costs.encode_s_per_token_weight * tokens * d_in * d_sae


def _masking_s(
    costs: Costs, tokens: Sequence[int], columns: Sequence[int], steps: Sequence[int], layer: int, *, conditions: int
) -> float:
    """Masking: per example, ``columns`` prompt columns through blocks ``l..L-1`` (over all its conditions,
    at the prompt's mean cost per column), then ``steps`` generated tokens under each condition."""
    part = (depth(costs.n_layers, layer) + 1) / costs.n_layers
    return sum(
        forward_s(costs, n) * c / n * part + conditions * g * costs.forward_s_per_token
        for n, c, g in zip(tokens, columns, steps, strict=True)
    )


def _steering_s(
    costs: Costs, tokens: Sequence[int], steps: Sequence[int], layer: int, *, steering: int, steer_all: int
) -> float:
    """Steering: at the last position, an edited pass and an unedited refill per generated token; at every
    position, as masking from the first spliced column; plus one shared prompt pass per example."""
    part = (depth(costs.n_layers, layer) + 1) / costs.n_layers
    step = costs.forward_s_per_token
    return sum(
        (steering - steer_all) * 2 * h * step
        + steer_all * (forward_s(costs, n) * part + h * step)
        + forward_s(costs, n)
        for n, h in zip(tokens, steps, strict=True)
    )


def curves_seconds(
    costs: Costs,
    tokens: Sequence[int],
    active: Sequence[int],
    *,
    layer: int,
    orders: int,
    points: int,
    scores: int,
) -> float:
    """The faithfulness curves of examples of ``tokens`` tokens and ``active`` active latents (an upper bound).

    ``orders``: rankings and random permutations; ``points``: K values measured per order (deletion and
    sufficiency each); ``scores``: forward + backward passes of the estimators (see the module docstring).
    """
    back, n_layers = depth(costs.n_layers, layer), costs.n_layers
    seconds = 0.0
    for n, a in zip(tokens, active, strict=True):
        f = forward_s(costs, n)
        seconds += scores * f * (1 + back / n_layers) + a * f * back / n_layers
        seconds += 2 * orders * points * f * (back + 1) / n_layers
    return seconds


def _check_tokens(tokens: Sequence[int]) -> None:
    if not tokens or min(tokens) < 1:
        raise GradSAEError("a plan needs at least one prompt of at least one token: pass a non-empty prompt")


# -- fitting (the benchmark) ----------------------------------------------------------
def fit_linear_quadratic(n: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = a n + b n^2`` (no constant), both coefficients clipped at 0."""
    x = np.asarray(n, dtype=np.float64)
    design = np.stack([x, x**2], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, np.asarray(y, dtype=np.float64), rcond=None)
    if b < 0:
        a, b = float(np.dot(x, y) / np.dot(x, x)), 0.0
    return max(float(a), 0.0), float(b)


# -- storage ----------------------------------------------------------------------
def stored_costs(path: str | Path | None = None) -> list[Costs]:
    """Every :class:`Costs` in ``path`` (default: ``$GRADSAE_COSTS``, else the package's ``costs.json``).

    None if the file does not exist.
    """
    path = path or os.environ.get(COSTS_ENV) or None
    if path is None:
        text = resources.files("gradsae").joinpath(COSTS_FILE)
        if not text.is_file():
            return []
        raw = json.loads(text.read_text())
    else:
        if not Path(path).exists():
            return []
        raw = json.loads(Path(path).read_text())
    names = {f.name for f in fields(Costs)}
    return [Costs(**{k: v for k, v in entry.items() if k in names}) for entry in raw.get("costs", [])]


def save_costs(costs: Costs, path: str | Path, *, source: str = "") -> Path:
    """Add (or replace: same model, device and threads) ``costs`` in ``path``; ``source``: how they were measured."""
    path = Path(path)
    kept = [
        c for c in stored_costs(path) if (c.model, c.device, c.threads) != (costs.model, costs.device, costs.threads)
    ]
    entries: list[dict[str, Any]] = [asdict(c) for c in [*kept, costs]]
    path.write_text(json.dumps({"source": source, "costs": entries}, indent=2) + "\n")
    return path


def model_key(name: str | None) -> str:
    """The name costs are stored under: the embedded model's aliases are one."""
    return DEFAULT_MODEL if name in DEFAULT_NAMES else str(name)


def find_costs(model: str, device: str, threads: int, *, path: str | Path | None = None) -> Costs:
    """The stored costs of ``model`` on ``device``, the measured thread count nearest ``threads``."""
    kind = "cuda" if str(device).startswith("cuda") else str(device).split(":")[0]
    model = model_key(model)
    found = [c for c in stored_costs(path) if c.model == model and c.device == kind]
    if not found:
        raise GradSAEError(
            f"no measured costs for model {model} on {kind}: run `python benchmarks/run.py --model ...` "
            f"on this machine to measure them (it writes src/gradsae/{COSTS_FILE})"
        )
    return min(found, key=lambda c: abs(c.threads - threads))
