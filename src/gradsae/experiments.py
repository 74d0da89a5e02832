"""The paper's two experiments on one task, one layer.

Setup (Shu et al. 2025, sec. 4): with the SAE spliced at layer ``l``, greedy-decode
every example and keep those answered correctly (EM = 1 / right label), so the
unperturbed score is 100 by construction. For each kept example ``i``, the
objective is ``Y_i = p(greedy token)`` at the step that opens the answer, with the
prompt plus the tokens generated before that step as input. Each ranking method
``m`` (gradsae, activation, random, optionally ablation) scores the latents; among
latents with a positive score, ``Top_m(i, K)`` are the ``K`` best and
``Bottom_m(i, K)`` the ``K`` worst; ``K = 50%`` is half the latents active at the
last input token.

Experiment 1 (perturbation): zero ``Top`` / ``Bottom`` at every position of every
forward pass, regenerate, and score against the gold answer:
``score(m, set, K) = 100 * mean_i metric(answer_i, gold_i)``.

Experiment 2 (local steering): pick a donor ``j`` for ``i`` (another kept example
with a different label, or another question on the same context), zero
``Top_m(i, K)`` and set ``Top_m(j, K)`` to the donor's values clamped to
``[0, 50]`` (its activation at its last input token, or its mean activation when
that is 0), at the last position (each pass) or at every position. Success:
``100 * mean_i metric(answer_i, gold_j)``.

Each figure carries a 95% percentile-bootstrap interval over examples.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gradsae.generate import Generation, answer_inputs, answer_step, encode_prompts, generate_batch
from gradsae.models import LoadedModel
from gradsae.objectives import NextTokenProb
from gradsae.prefix import Prefix, compute_prefix, replay_prefix
from gradsae.sae import SAE
from gradsae.scores import Scores, score_latents, score_methods
from gradsae.splice import Edit, Mode, splice
from gradsae.tasks import Example, Task

log = logging.getLogger(__name__)

KSpec = int | str
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


@dataclass(frozen=True)
class Stat:
    """A task score (0-100) over examples, with its 95% bootstrap interval."""

    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class Condition:
    """One cell of a table: a method, a set, a K, (for steering) a position mode."""

    method: str
    set: str
    k: str
    exact: Stat
    f1: Stat
    positions: str = ""
    mean_k: float = 0.0
    """Average number of latents actually edited per example."""


@dataclass(frozen=True)
class KeptExample:
    """A correctly answered example and its rankings."""

    example: Example
    generation: Generation
    step: int
    """Generation step whose token opens the answer."""
    rankings: dict[str, list[int]]
    """Method -> latents with a positive score, best first."""
    active_last: int
    donor_values: dict[int, float] = field(default_factory=dict)
    """Latent -> value used when this example is a donor."""


@dataclass(frozen=True)
class LayerResult:
    """Everything measured at one layer."""

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


# -- driver ---------------------------------------------------------------------
def run_layer(lm: LoadedModel, sae: SAE, task: Task, cfg: ExperimentConfig) -> LayerResult:
    """Both experiments at ``cfg.layer``."""
    texts = [task.render(example, lm.tokenizer) for example in task.examples]
    batches = prompt_batches(lm, texts, cfg, reuse=False)
    clean = decode(lm, batches, task, cfg, sae=None, edits_for=None)
    spliced = decode(lm, batches, task, cfg, sae=sae, edits_for=None)
    correct = [task.score(ex, gen.text).exact == 1.0 for ex, gen in zip(task.examples, spliced, strict=True)]
    kept_examples = [ex for ex, ok in zip(task.examples, correct, strict=True) if ok]
    kept_gens = [gen for gen, ok in zip(spliced, correct, strict=True) if ok]
    log.info("layer %d: %d of %d examples answered correctly with the SAE", cfg.layer, len(kept_examples), len(texts))
    kept, diagnostics = rank_examples(lm, sae, task, kept_examples, kept_gens, cfg)
    kept_texts = [texts[task.examples.index(k.example)] for k in kept]
    perturbation = run_perturbation(lm, sae, task, kept, kept_texts, cfg)
    donors = pick_donors(kept, seed=cfg.seed)
    steering = run_steering(lm, sae, task, kept, kept_texts, donors, cfg)
    return LayerResult(
        layer=cfg.layer,
        n_examples=len(texts),
        n_kept=len(kept),
        baseline=stat([float(c) for c in correct], cfg),
        clean_baseline=stat([task.score(ex, g.text).exact for ex, g in zip(task.examples, clean, strict=True)], cfg),
        perturbation=tuple(perturbation),
        steering=tuple(steering),
        overlap=overlap_stats(kept, cfg, by=task.metric),
        n_donor_pairs=sum(d is not None for d in donors),
        diagnostics=diagnostics,
    )


# -- generation -------------------------------------------------------------------
EditsFor = Callable[[range], list[Edit]]


@dataclass(frozen=True)
class PromptBatch:
    """A left-padded batch of prompts and (optionally) its blocks ``0..l`` precomputed."""

    rows: range
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prefix: Prefix | None


def prompt_batches(lm: LoadedModel, texts: Sequence[str], cfg: ExperimentConfig, *, reuse: bool) -> list[PromptBatch]:
    """Split ``texts`` into batches; with ``reuse``, run each once through blocks ``0..l``."""
    out = []
    for start in range(0, len(texts), cfg.batch_size):
        rows = range(start, min(start + cfg.batch_size, len(texts)))
        ids, mask = encode_prompts(lm.tokenizer, [texts[i] for i in rows])
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        prefix = compute_prefix(lm, ids, mask, cfg.layer) if reuse else None
        out.append(PromptBatch(rows=rows, input_ids=ids, attention_mask=mask, prefix=prefix))
    return out


def decode(
    lm: LoadedModel,
    batches: Sequence[PromptBatch],
    task: Task,
    cfg: ExperimentConfig,
    *,
    sae: SAE | None,
    edits_for: EditsFor | None,
) -> list[Generation]:
    """Greedy answers batch by batch; ``edits_for(rows)`` gives each batch's latent edits."""
    out: list[Generation] = []
    for batch in batches:
        if sae is None:
            out += generate_batch(lm, batch.input_ids, batch.attention_mask, max_new_tokens=task.max_new_tokens)
            continue
        edits = edits_for(batch.rows) if edits_for else []
        replay = replay_prefix(lm, batch.prefix) if batch.prefix is not None else nullcontext()
        with splice(lm, sae, cfg.layer, mode=cfg.mode, edits=edits, record=False), replay:
            out += generate_batch(lm, batch.input_ids, batch.attention_mask, max_new_tokens=task.max_new_tokens)
    return out


# -- ranking ----------------------------------------------------------------------
def rank_examples(
    lm: LoadedModel,
    sae: SAE,
    task: Task,
    examples: Sequence[Example],
    gens: Sequence[Generation],
    cfg: ExperimentConfig,
) -> tuple[list[KeptExample], dict[str, Any]]:
    """Score every kept example with every method at its answer step."""
    steps = [answer_step(lm.tokenizer, gen, task.answer_marker) for gen in gens]
    rankings: list[dict[str, list[int]]] = [{} for _ in examples]
    donor_values: list[dict[int, float]] = [{} for _ in examples]
    active_last = [0] * len(examples)
    spearman: list[float] = []
    for start in tqdm(
        range(0, len(examples), cfg.batch_size), desc=f"scoring latents (layer {cfg.layer})", disable=None
    ):
        rows = range(start, min(start + cfg.batch_size, len(examples)))
        ids, mask = answer_inputs(lm.tokenizer, [gens[i] for i in rows], [steps[i] for i in rows])
        by_method = score_methods(
            lm,
            sae,
            ids,
            mask,
            NextTokenProb(),
            methods=cfg.methods,
            layer=cfg.layer,
            mode=cfg.mode,
            seed=cfg.seed + start,
        )
        for offset, i in enumerate(rows):
            rankings[i] = {m: s.ranking(offset).tolist() for m, s in by_method.items()}
            active_last[i] = int(next(iter(by_method.values())).active_last[offset])
            donor_values[i] = _donor_values(next(iter(by_method.values())), offset, cfg.clamp)
        if "ablation" in by_method:
            spearman += _estimate_vs_exact(lm, sae, ids, mask, by_method["ablation"], cfg)
    kept = [
        KeptExample(example=ex, generation=gen, step=step, rankings=r, active_last=a, donor_values=d)
        for ex, gen, step, r, a, d in zip(examples, gens, steps, rankings, active_last, donor_values, strict=True)
    ]
    diagnostics: dict[str, Any] = {"answer_steps": steps}
    if spearman:
        diagnostics["spearman_gradsae_sum_vs_ablation"] = {
            "mean": float(np.mean(spearman)),
            "min": float(np.min(spearman)),
            "n": len(spearman),
        }
    return kept, diagnostics


def _donor_values(scores: Scores, row: int, clamp: tuple[float, float]) -> dict[int, float]:
    """Value each active latent is injected with: last-token activation, else mean activation."""
    last, mean = scores.last_act[row], scores.mean_act[row]
    value = torch.where(last > 0, last, mean).clamp(*clamp)
    active = torch.nonzero(mean > 0).squeeze(-1)
    return {int(c): float(value[c]) for c in active}


def _estimate_vs_exact(
    lm: LoadedModel, sae: SAE, ids: torch.Tensor, mask: torch.Tensor, exact: Scores, cfg: ExperimentConfig
) -> list[float]:
    """Spearman correlation, per example, of the first-order estimate (sum over positions) and exact ablation."""
    estimate = score_latents(lm, sae, ids, mask, NextTokenProb(), layer=cfg.layer, mode=cfg.mode, aggregation="sum")
    out = []
    for row in range(ids.shape[0]):
        active = exact.mean_act[row] > 0
        if int(active.sum()) > 2:
            out.append(spearman(estimate.per_latent[row, active], exact.per_latent[row, active]))
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a.double().numpy(), b.double().numpy()).statistic)


# -- selection --------------------------------------------------------------------
def k_value(k: KSpec, example: KeptExample) -> int:
    """K as a count for this example (``"50%"``: half the latents active at the last token)."""
    if isinstance(k, str):
        fraction = float(k.rstrip("%")) / 100
        return max(1, int(example.active_last * fraction))
    return int(k)


def chosen(example: KeptExample, method: str, which: str, k: KSpec) -> list[int]:
    """``Top`` or ``Bottom`` K latents of ``example`` under ``method`` (among positive scores)."""
    ranked = example.rankings[method]
    count = min(k_value(k, example), len(ranked))
    return ranked[:count] if which == "top" else ranked[::-1][:count]


def padded(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[batch, max_len]`` latent ids, ``-1`` padding (ignored by edits)."""
    width = max(1, max((len(r) for r in rows), default=1))
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


# -- experiment 1 -------------------------------------------------------------------
def run_perturbation(
    lm: LoadedModel, sae: SAE, task: Task, kept: Sequence[KeptExample], texts: Sequence[str], cfg: ExperimentConfig
) -> list[Condition]:
    """Zero Top / Bottom K at every position and pass; score against the gold answers."""
    conditions = [(m, s, k) for m in cfg.methods for s in SETS for k in cfg.ks]
    out = []
    batches = prompt_batches(lm, texts, cfg, reuse=cfg.reuse_prefix)
    for method, which, k in tqdm(conditions, desc=f"experiment 1: masking (layer {cfg.layer})", disable=None):
        sets = [chosen(ex, method, which, k) for ex in kept]

        def edits_for(rows: range, sets: list[list[int]] = sets) -> list[Edit]:
            return [Edit(latents=padded([sets[i] for i in rows]), op="zero", positions="all")]

        gens = decode(lm, batches, task, cfg, sae=sae, edits_for=edits_for)
        scores = [task.score(ex.example, gen.text) for ex, gen in zip(kept, gens, strict=True)]
        out.append(_condition(method, which, k, scores, sets, cfg))
    return out


def _condition(
    method: str,
    which: str,
    k: KSpec,
    scores: Sequence[Any],
    sets: Sequence[Sequence[int]],
    cfg: ExperimentConfig,
    positions: str = "",
) -> Condition:
    return Condition(
        method=method,
        set=which,
        k=str(k),
        exact=stat([s.exact for s in scores], cfg),
        f1=stat([s.f1 for s in scores], cfg),
        positions=positions,
        mean_k=float(np.mean([len(s) for s in sets])) if sets else 0.0,
    )


# -- experiment 2 -------------------------------------------------------------------
def pick_donors(kept: Sequence[KeptExample], *, seed: int) -> list[int | None]:
    """For each kept example, a donor: same context (``group``) or a different label; ``None`` if none exists."""
    rng = random.Random(seed)
    out: list[int | None] = []
    for i, ex in enumerate(kept):
        if ex.example.group is not None:
            pool = [j for j, o in enumerate(kept) if j != i and o.example.group == ex.example.group]
        else:
            pool = [j for j, o in enumerate(kept) if o.example.label != ex.example.label]
        out.append(rng.choice(pool) if pool else None)
    return out


def run_steering(
    lm: LoadedModel,
    sae: SAE,
    task: Task,
    kept: Sequence[KeptExample],
    texts: Sequence[str],
    donors: Sequence[int | None],
    cfg: ExperimentConfig,
) -> list[Condition]:
    """Swap an example's Top K latents for its donor's; success = answer matches the donor's gold."""
    pairs = [(i, j) for i, j in enumerate(donors) if j is not None]
    if not pairs:
        log.warning("no example has a donor (all kept examples share one label): experiment 2 is skipped")
        return []
    batches = prompt_batches(lm, [texts[i] for i, _ in pairs], cfg, reuse=cfg.reuse_prefix)
    conditions = [(m, s, k, p) for p in cfg.steer_positions for m in cfg.methods for s in SETS for k in cfg.ks]
    out = []
    for method, which, k, where in tqdm(conditions, desc=f"experiment 2: steering (layer {cfg.layer})", disable=None):
        own = [chosen(kept[i], method, which, k) for i, _ in pairs]
        give = [chosen(kept[j], method, which, k) for _, j in pairs]
        values = [
            [kept[j].donor_values.get(c, 0.0) for c in latents] for (_, j), latents in zip(pairs, give, strict=True)
        ]

        def edits_for(
            rows: range,
            own: list[list[int]] = own,
            give: list[list[int]] = give,
            values: list[list[float]] = values,
            where: str = where,
        ) -> list[Edit]:
            return steering_edits([own[r] for r in rows], [give[r] for r in rows], [values[r] for r in rows], where)

        gens = decode(lm, batches, task, cfg, sae=sae, edits_for=edits_for)
        scores = [
            task.score(kept[i].example, gen.text, answers=kept[j].example.answers)
            for (i, j), gen in zip(pairs, gens, strict=True)
        ]
        out.append(_condition(method, which, k, scores, own, cfg, positions=where))
    return out


def steering_edits(
    own: Sequence[Sequence[int]], give: Sequence[Sequence[int]], values: Sequence[Sequence[float]], where: str
) -> list[Edit]:
    """Per row: zero its own latents, then set the donor's latents to the donor's values, at ``where``."""
    latents = padded(give)
    vals = torch.zeros(latents.shape)
    for row, value in enumerate(values):
        vals[row, : len(value)] = torch.as_tensor(list(value), dtype=torch.float32)
    return [
        Edit(latents=padded(own), op="zero", positions=where),  # type: ignore[arg-type]
        Edit(latents=latents, op="set", values=vals, positions=where),  # type: ignore[arg-type]
    ]


# -- overlap ----------------------------------------------------------------------------
def overlap_stats(kept: Sequence[KeptExample], cfg: ExperimentConfig, *, by: str, k: int = 10) -> dict[str, float]:
    """The appendix's overlap figures at K = ``k`` (fractions of K, in %).

    ``cross/gradsae-activation``: mean over examples of ``|Top_g & Top_a| / K``.
    ``within/<method>``: mean over pairs of examples sharing a label (classification)
    or a context (SQuAD) of ``|Top_m(i) & Top_m(j)| / K``.
    """
    out: dict[str, float] = {}
    methods = [m for m in cfg.methods if m != "random"] + (["random"] if "random" in cfg.methods else [])
    for a, b in combinations(methods, 2):
        values = [_overlap(chosen(ex, a, "top", k), chosen(ex, b, "top", k), k) for ex in kept]
        if values:
            out[f"cross/{a}-{b}"] = 100 * float(np.mean(values))
    key = (lambda ex: ex.example.group) if by == "squad" else (lambda ex: ex.example.label)
    for method in methods:
        values = [
            _overlap(chosen(x, method, "top", k), chosen(y, method, "top", k), k)
            for x, y in combinations(kept, 2)
            if key(x) is not None and key(x) == key(y)
        ]
        if values:
            out[f"within/{method}"] = 100 * float(np.mean(values))
    return out


def _overlap(a: Sequence[int], b: Sequence[int], k: int) -> float:
    return len(set(a) & set(b)) / k


# -- statistics ---------------------------------------------------------------------------
def stat(values: Sequence[float], cfg: ExperimentConfig) -> Stat:
    """Mean x 100 with a 95% percentile bootstrap interval over examples (seeded)."""
    if not values:
        return Stat(mean=float("nan"), low=float("nan"), high=float("nan"), n=0)
    data = 100 * np.asarray(values, dtype=float)
    rng = np.random.default_rng(cfg.seed)
    means = data[rng.integers(0, len(data), size=(cfg.bootstrap, len(data)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Stat(mean=float(data.mean()), low=float(low), high=float(high), n=len(data))
