"""Steer open-ended generation toward a concept; judge success, fluency and cost.

For each :class:`~gradsae.steer.Concept` and each latent-choice method ``m``:

1. Prompts. :data:`NEUTRAL_PROMPTS` is shuffled once (``seed``) and cut into three
   disjoint parts (:func:`split_prompts`): ``seed`` prompts (only for GradSAE's
   scores), ``heldout`` prompts (only for choosing ``alpha``) and ``eval`` prompts
   (only for the reported numbers). Each goes through the chat template.
2. Latents: ``K`` per method (:func:`pick_latents`): ``gradsae`` (influence on
   ``log p(concept text | seed prompt)``), ``gradsae-label`` (influence on the
   judge's ``log p(label)`` read on the concept texts; sentiment concepts only),
   ``activation`` (mean activation on the concept texts), ``logit-lens`` (decoder
   rows projected on the concept words' tokens), ``random``. ``gradsae`` and
   ``activation`` subtract the same scores on contrast texts: the concept's
   negatives, else (``contrast="neutral"``, the default) :data:`NEUTRAL_TEXTS`.
   Without a contrast both pick generic latents: on SmolLM2 layer 6 the same
   latent (1352, typical activation ~70) tops both lists for every concept.
3. Strength: latent ``c`` gets ``alpha * a_c`` added at every position of every
   pass, ``a_c`` its mean non-zero activation on the reference texts (the seed
   rows and the concept texts; latents that never fire there get the median).
4. Generation: greedy, ``max_new_tokens`` per prompt, the SAE spliced in error mode.
5. Per generation ``i`` (:func:`measure`), under the *unsteered* model:
   ``success_i``: 1 if a concept word occurs (a word that starts with one of the
   concept's words, case-insensitive), or for a sentiment concept the model's own
   judgement ``p(label | text)`` on the SST-2 question (:func:`judge`);
   ``rate_i``: concept words per word; ``nll_i``: mean ``-log p`` of the generated
   tokens given the prompt; ``distinct_i``: distinct token bigrams / bigrams.
   Perplexity is ``exp(mean_i nll_i)``.
6. ``alpha`` (:func:`choose_alpha`), on the held-aside prompts only: the highest
   held-aside success among the alphas whose held-aside perplexity is at most
   ``max_ppl_ratio`` x and distinct-2 at least ``min_distinct_ratio`` x the
   unsteered ones; ``0`` (no steering) when none beats the unsteered success.
7. Cost: SST-2 accuracy of the steered model at the chosen ``alpha``.
8. Intervals: 95% percentile bootstrap over prompts (seeded).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradsae import _files
from gradsae.errors import GradSAEError
from gradsae.experiments.stats import Stat
from gradsae.generate import Generation, chat_text, encode_prompts, generate, pad_id, pad_left
from gradsae.models import LoadedModel
from gradsae.objectives import LabelLogProb, TargetLogProb, label_tokens
from gradsae.sae import SAE
from gradsae.scores import objective_value
from gradsae.splice import Edit, Mode, resolve_layer, splice
from gradsae.steer import (
    Concept,
    latent_scales,
    logit_lens_scores,
    mean_activation,
    mean_influence,
    random_latents,
    steering_edit,
    target_influence,
    target_rows,
    top_latents,
    typical_activation,
    word_tokens,
)
from gradsae.tasks import Task, classification_template, load_task

log = logging.getLogger(__name__)

METHODS = ("gradsae", "gradsae-label", "activation", "logit-lens", "random")
JUDGE_LABELS = ("negative", "positive")
JUDGE_TEMPLATE = classification_template("Is the sentiment of this review", "Review", JUDGE_LABELS)
"""The SST-2 question of :mod:`gradsae.tasks`, asked about a generated text."""

NEUTRAL_PROMPTS = (
    "Tell me about your morning.",
    "Describe a place you like to visit.",
    "What did you do last weekend?",
    "Write a few sentences about a friend.",
    "Describe a typical day at work.",
    "Tell me a short story.",
    "What is something you learned recently?",
    "Describe the view from a window.",
    "Write about a memorable day.",
    "What makes a good afternoon?",
    "Describe a small town.",
    "Tell me about a hobby.",
    "Write a short diary entry.",
    "What would you do with a free day?",
    "Describe an interesting person.",
    "Write a postcard to a friend.",
    "Tell me about a trip.",
    "Describe your favourite season.",
    "What should I do this evening?",
    "Write the opening of a letter.",
    "Describe a busy street.",
    "Tell me about a book you read.",
    "Describe a kitchen.",
    "What is a good way to spend a Sunday?",
    "Write a few lines about the weather today.",
    "Describe an old photograph.",
    "Tell me about a neighbour.",
    "Write a short note to a colleague.",
)
"""Prompts about nothing in particular, for seed, held-aside and evaluation sets."""

NEUTRAL_TEXTS = (
    "The meeting was moved to Tuesday afternoon.",
    "She put the keys on the table and opened the window.",
    "The report lists the prices of three products.",
    "He walked to the station and waited for the train.",
    "The library closes at six on weekdays.",
    "They painted the fence and then cleaned the brushes.",
)
"""Texts about nothing in particular: the contrast of a concept that has no negatives of its own."""

CONCEPTS = {
    "weddings": Concept(
        name="weddings",
        words=("wedding", "bride", "groom", "marriage", "married", "vows", "ceremony", "honeymoon"),
        texts=(
            "The wedding was held in a small chapel, and the bride walked down the aisle to meet the groom.",
            "After the ceremony, the newly married couple cut the wedding cake and danced with their guests.",
            "The bride and groom exchanged vows and rings in front of their families.",
            "They planned their wedding for a year and then left for their honeymoon.",
        ),
    ),
    "football": Concept(
        name="football",
        words=("football", "soccer", "goal", "match", "team", "striker", "referee", "stadium"),
        texts=(
            "The striker scored a late goal and the whole stadium cheered for the team.",
            "The football match ended in a draw after the referee disallowed a goal.",
            "Our team trained on the pitch every morning before the big match.",
            "Fans filled the stadium to watch the football final.",
        ),
    ),
    "ocean": Concept(
        name="ocean",
        words=("ocean", "sea", "wave", "beach", "coral", "whale", "tide", "shore"),
        texts=(
            "The waves of the ocean crashed against the shore as the tide came in.",
            "Whales and dolphins swim through the deep blue sea near the coral reef.",
            "We walked along the beach and watched the sea stretch to the horizon.",
            "The ocean smelled of salt, and the sound of the waves filled the air.",
        ),
    ),
    "positive": Concept(
        name="positive",
        words=("good", "great", "love", "happy", "wonderful", "excellent", "amazing", "beautiful", "enjoy", "joy"),
        texts=(
            "I loved it; everything was wonderful and I am so happy.",
            "What a great day: the food was delicious and the people were kind.",
            "This is an excellent, delightful experience that I would gladly repeat.",
            "I feel wonderful, grateful and full of joy.",
        ),
        negatives=(
            "I hated it; everything was awful and I am so unhappy.",
            "What a terrible day: the food was disgusting and the people were rude.",
            "This is a horrible, miserable experience that I would never repeat.",
            "I feel awful, bitter and full of regret.",
        ),
        judge="positive",
    ),
}
"""Built-in concepts: three topics (target words) and one sentiment (positive vs negative texts)."""


@dataclass(frozen=True)
class SteerConfig:
    """What to run: the latents, the strengths, the prompts and the fluency budget."""

    layer: int | None = None
    """Decoder block the SAE is spliced at (default: the SAE's own)."""
    k: int = 8
    """Latents added per method."""
    alphas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    """Strengths swept, in units of each latent's typical (mean non-zero) activation."""
    methods: tuple[str, ...] = ("gradsae", "activation", "logit-lens", "random")
    """Latent-choice methods: any of gradsae, gradsae-label, activation, logit-lens, random."""
    n_seed: int = 4
    """Seed prompts GradSAE scores on."""
    n_heldout: int = 6
    """Held-aside prompts that choose alpha."""
    n_eval: int = 12
    """Evaluation prompts that the numbers are reported on."""
    max_new_tokens: int = 24
    """Tokens generated per prompt."""
    sst2_n: int = 16
    """SST-2 examples for the cost (0: no cost measured)."""
    max_ppl_ratio: float = 2.0
    """Fluency budget: held-aside perplexity at most this times the unsteered one."""
    min_distinct_ratio: float = 0.8
    """Fluency budget: held-aside distinct-2 at least this times the unsteered one."""
    batch_size: int = 12
    """Prompts per generation batch."""
    seed: int = 0
    """Seed of the prompt split, the random latents, the SST-2 sample and the bootstrap."""
    resamples: int = 1000
    """Bootstrap resamples."""
    mode: str = "error"
    """Splice mode: error (the exact model plus the added vector) or replace."""
    contrast: str = "neutral"
    """Contrast for gradsae / activation when a concept has no negatives: neutral (built-in texts) or none."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise GradSAEError(f"unknown steering methods {unknown}: use any of {', '.join(METHODS)}")
        if not self.alphas or any(a <= 0 for a in self.alphas):
            raise GradSAEError(f"alphas must be positive (0, no steering, is always measured), got {self.alphas}")
        if min(self.n_seed, self.n_heldout, self.n_eval, self.k, self.max_new_tokens) < 1:
            raise GradSAEError("k, n_seed, n_heldout, n_eval and max_new_tokens must each be at least 1")
        if self.contrast not in ("neutral", "none"):
            raise GradSAEError(f"unknown contrast {self.contrast!r}: use 'neutral' or 'none'")
        if self.mode not in ("error", "replace"):
            raise GradSAEError(f"unknown splice mode {self.mode!r}: use 'error' or 'replace'")


# -- results ------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One method at one strength on one prompt split."""

    method: str
    """Latent-choice method, or ``none`` (unsteered)."""
    alpha: float
    split: str
    """``heldout`` or ``eval``."""
    success: Stat
    """Concept presence (% of generations) or the judge's p(label) (x100)."""
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
    """One latent-choice method for one concept: its latents, sweep, chosen alpha and cost."""

    method: str
    latents: tuple[int, ...]
    scales: tuple[float, ...]
    """Typical activation ``a_c`` of each latent (the unit of alpha)."""
    unfired: tuple[bool, ...]
    """Latents that never fired on the reference texts (given the median scale)."""
    points: tuple[Point, ...]
    """Held-aside and evaluation points for every alpha of the sweep."""
    alpha: float
    """Chosen on the held-aside prompts; 0: no strength beat the unsteered model within the budget."""
    cost: Stat | None
    """SST-2 accuracy while steered at the chosen alpha."""

    def point(self, alpha: float, split: str) -> Point | None:
        return next((p for p in self.points if p.alpha == alpha and p.split == split), None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodRun:
        return cls(
            **{
                **data,
                "latents": tuple(data["latents"]),
                "scales": tuple(data["scales"]),
                "unfired": tuple(data["unfired"]),
                "points": tuple(Point.from_dict(p) for p in data["points"]),
                "cost": None if data["cost"] is None else Stat.from_dict(data["cost"]),
            }
        )


@dataclass(frozen=True)
class ConceptRun:
    """Every method for one concept, with the unsteered points."""

    concept: Concept
    baseline: tuple[Point, ...]
    """Unsteered (alpha 0) on the held-aside and the evaluation prompts."""
    methods: tuple[MethodRun, ...]

    def base(self, split: str) -> Point:
        return next(p for p in self.baseline if p.split == split)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConceptRun:
        concept = Concept(**_tuples(data["concept"]))
        return cls(
            concept=concept,
            baseline=tuple(Point.from_dict(p) for p in data["baseline"]),
            methods=tuple(MethodRun.from_dict(m) for m in data["methods"]),
        )


@dataclass(frozen=True)
class SteerResult:
    """A whole steering run; ``save`` / ``load`` as JSON."""

    config: SteerConfig
    model: str
    sae: str
    layer: int
    prompts: dict[str, tuple[str, ...]]
    """The ``seed``, ``heldout`` and ``eval`` prompts (before the chat template)."""
    concepts: tuple[ConceptRun, ...]
    cost_unsteered: Stat | None
    """SST-2 accuracy of the unsteered (spliced, unedited) model."""
    wall_s: float
    command: str = ""

    def save(self, path: str | Path) -> Path:
        return _files.write_json(path, dataclasses.asdict(self), sort_keys=False)

    @classmethod
    def load(cls, path: str | Path) -> SteerResult:
        data = _files.read_json(path)
        config = _tuples(data["config"])
        cost = data["cost_unsteered"]
        return cls(
            **{
                **data,
                "config": SteerConfig(**config),
                "prompts": {k: tuple(v) for k, v in data["prompts"].items()},
                "concepts": tuple(ConceptRun.from_dict(c) for c in data["concepts"]),
                "cost_unsteered": None if cost is None else Stat.from_dict(cost),
            }
        )


# -- prompts --------------------------------------------------------------------------
def split_prompts(
    prompts: Sequence[str], *, n_seed: int, n_heldout: int, n_eval: int, seed: int
) -> dict[str, tuple[str, ...]]:
    """Disjoint ``seed``, ``heldout`` and ``eval`` prompts from one seeded shuffle.

    The evaluation prompts come first in the shuffle, so they depend only on ``seed``
    and ``n_eval``: changing the other two sizes never moves an evaluation prompt.
    """
    if len(set(prompts)) != len(prompts):
        raise GradSAEError("the prompt list repeats a prompt: the held-aside and evaluation sets must be disjoint")
    need = n_seed + n_heldout + n_eval
    if need > len(prompts):
        raise GradSAEError(f"{need} prompts are needed (seed + held-aside + eval) but only {len(prompts)} exist")
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return {
        "eval": tuple(order[:n_eval]),
        "heldout": tuple(order[n_eval : n_eval + n_heldout]),
        "seed": tuple(order[n_eval + n_heldout : need]),
    }


# -- latents --------------------------------------------------------------------------
def pick_latents(
    lm: LoadedModel,
    sae: SAE,
    concept: Concept,
    method: str,
    *,
    layer: int,
    k: int,
    seeds: Sequence[str],
    cfg: SteerConfig,
) -> torch.Tensor:
    """``[k]`` distinct latents for ``concept`` by ``method`` (``seeds``: rendered seed prompts)."""
    mode = _mode(cfg)
    if method == "random":
        return random_latents(sae.cfg.d_sae, k, seed=cfg.seed)
    if method == "logit-lens":
        return top_latents(logit_lens_scores(lm, sae, word_tokens(lm.tokenizer, concept.words)), k)
    negatives = contrast_texts(concept, cfg)
    if method == "activation":
        scores = mean_activation(lm, sae, concept.targets, layer=layer, mode=mode)
        if negatives:
            scores = scores - mean_activation(lm, sae, negatives, layer=layer, mode=mode)
        return top_latents(scores, k)
    if method == "gradsae":
        scores = target_influence(lm, sae, seeds, concept.targets, layer=layer, mode=mode)
        if negatives:
            scores = scores - target_influence(lm, sae, seeds, negatives, layer=layer, mode=mode)
        return top_latents(scores, k)
    if method == "gradsae-label":
        return top_latents(_label_influence(lm, sae, concept, layer=layer, mode=mode), k)
    raise ValueError(method)


def contrast_texts(concept: Concept, cfg: SteerConfig) -> tuple[str, ...]:
    """The concept's negatives, else the neutral texts (``contrast="neutral"``), else none."""
    return concept.negatives or (NEUTRAL_TEXTS if cfg.contrast == "neutral" else ())


def _label_influence(lm: LoadedModel, sae: SAE, concept: Concept, *, layer: int, mode: Mode) -> torch.Tensor:
    """GradSAE on the judge's ``log p(label | labels)`` read on each concept text."""
    if concept.judge is None:
        raise GradSAEError(f"gradsae-label needs a sentiment concept (a judge label); {concept.name!r} has none")
    ids, mask = encode_prompts(lm.tokenizer, judge_prompts(lm, concept.targets))
    objective = LabelLogProb(label_tokens(lm.tokenizer, JUDGE_LABELS), target=JUDGE_LABELS.index(concept.judge))
    return mean_influence(lm, sae, ids, mask, objective, layer=layer, mode=mode)


def reference_texts(lm: LoadedModel, concept: Concept, seeds: Sequence[str]) -> list[str]:
    """Texts whose activations set each latent's typical activation: seed + target rows and the concept texts."""
    ids, mask, _ = target_rows(lm.tokenizer, seeds, concept.targets)
    rows = [lm.tokenizer.decode(row[m.bool()].tolist()) for row, m in zip(ids, mask, strict=True)]
    return rows + list(concept.targets) + list(concept.negatives)


# -- generation and metrics ----------------------------------------------------------------
def steered_generations(
    lm: LoadedModel, sae: SAE, texts: Sequence[str], edit: Edit | None, *, layer: int, cfg: SteerConfig, budget: int
) -> list[Generation]:
    """Greedy continuations of rendered ``texts`` with ``edit`` on every pass (``None``: spliced, unedited)."""
    with splice(lm, sae, layer, mode=_mode(cfg), edits=[edit] if edit is not None else [], record=False):
        return generate(lm, texts, max_new_tokens=budget, batch_size=cfg.batch_size)


CONCEPT_WORD = re.compile(r"[a-z]+")


def concept_hits(text: str, words: Sequence[str]) -> tuple[int, int]:
    """``(hits, words)``: words of ``text`` that start with a concept word, and all its words."""
    found = CONCEPT_WORD.findall(text.lower())
    stems = tuple(w.lower() for w in words)
    return sum(1 for w in found if w.startswith(stems)), len(found)


def distinct_n(tokens: Sequence[int], n: int = 2) -> float:
    """Distinct ``n``-grams / ``n``-grams (1 when there are none)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


@torch.no_grad()
def mean_nll(lm: LoadedModel, gens: Sequence[Generation], *, batch_size: int) -> list[float]:
    """Mean ``-log p`` of each generation's tokens given its prompt, under ``lm`` as it is (no splice)."""
    out: list[float] = []
    for start in range(0, len(gens), batch_size):
        part = gens[start : start + batch_size]
        ids, mask = pad_left([g.prompt_ids + g.token_ids for g in part], pad_id(lm.tokenizer))
        lengths = tuple(len(g.token_ids) for g in part)
        logp = objective_value(lm, ids.to(lm.device), mask.to(lm.device), TargetLogProb(n_target=lengths))
        out += [-float(v) / n for v, n in zip(logp.tolist(), lengths, strict=True)]
    return out


def judge_prompts(lm: LoadedModel, texts: Sequence[str]) -> list[str]:
    """Each text as the review of the SST-2 question, through the chat template."""
    return [chat_text(JUDGE_TEMPLATE.replace("{prompt}", t.strip()), lm.tokenizer) for t in texts]


@torch.no_grad()
def judge(lm: LoadedModel, texts: Sequence[str], label: str, *, batch_size: int) -> list[float]:
    """The model's own ``p(label | negative, positive)`` for each text as an SST-2 review."""
    objective = LabelLogProb(label_tokens(lm.tokenizer, JUDGE_LABELS), target=JUDGE_LABELS.index(label))
    prompts = judge_prompts(lm, texts)
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(lm.tokenizer, prompts[start : start + batch_size])
        out += objective_value(lm, ids.to(lm.device), mask.to(lm.device), objective).exp().tolist()
    return out


@dataclass(frozen=True)
class Measured:
    """Per-generation metrics of one batch of generations."""

    success: list[float]
    rate: list[float]
    nll: list[float]
    distinct: list[float]
    texts: list[str]


def measure(lm: LoadedModel, concept: Concept, gens: Sequence[Generation], *, batch_size: int) -> Measured:
    """Success, concept rate, NLL and distinct-2 of each generation (see the module docstring)."""
    hits = [concept_hits(g.text, concept.words) for g in gens]
    if concept.judge is None:
        success = [float(h > 0) for h, _ in hits]
    else:
        success = judge(lm, [g.text for g in gens], concept.judge, batch_size=batch_size)
    return Measured(
        success=success,
        rate=[h / max(n, 1) for h, n in hits],
        nll=mean_nll(lm, gens, batch_size=batch_size),
        distinct=[distinct_n(_content(lm, g)) for g in gens],
        texts=[g.text for g in gens],
    )


def _content(lm: LoadedModel, gen: Generation) -> tuple[int, ...]:
    """Generated ids without a final stop token."""
    return gen.token_ids[:-1] if gen.stopped else gen.token_ids


def make_point(method: str, alpha: float, split: str, m: Measured, cfg: SteerConfig) -> Point:
    boot = {"seed": cfg.seed, "resamples": cfg.resamples}
    return Point(
        method=method,
        alpha=alpha,
        split=split,
        success=bootstrap(m.success, np.mean, scale=100, **boot),
        rate=bootstrap(m.rate, np.mean, scale=100, **boot),
        ppl=bootstrap(m.nll, lambda x: math.exp(float(np.mean(x))), **boot),
        distinct=bootstrap(m.distinct, np.mean, scale=100, **boot),
        success_per_prompt=tuple(m.success),
        nll_per_prompt=tuple(m.nll),
        texts=tuple(m.texts),
    )


def bootstrap(
    values: Sequence[float], statistic: Callable[[Any], float], *, seed: int, resamples: int, scale: float = 1.0
) -> Stat:
    """``scale * statistic(values)`` with a 95% percentile bootstrap interval over the values (seeded)."""
    if not len(values):
        return Stat(mean=float("nan"), low=float("nan"), high=float("nan"), n=0)
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    draws = [statistic(data[rng.integers(0, len(data), size=len(data))]) for _ in range(resamples)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return Stat(mean=scale * float(statistic(data)), low=scale * float(low), high=scale * float(high), n=len(data))


def choose_alpha(heldout: Sequence[Point], baseline: Point, cfg: SteerConfig) -> float:
    """The held-aside alpha with the best success within the fluency budget; 0 when none beats no steering."""
    best = baseline
    for point in sorted(heldout, key=lambda p: p.alpha):
        fluent = point.ppl.mean <= cfg.max_ppl_ratio * baseline.ppl.mean
        varied = point.distinct.mean >= cfg.min_distinct_ratio * baseline.distinct.mean
        if fluent and varied and point.success.mean > best.success.mean:
            best = point
    return best.alpha if best is not baseline else 0.0


# -- cost --------------------------------------------------------------------------------
def task_accuracy(lm: LoadedModel, sae: SAE, task: Task, edit: Edit | None, *, layer: int, cfg: SteerConfig) -> Stat:
    """Accuracy (0-100, bootstrap interval) on ``task`` with ``edit`` on every pass."""
    texts = [task.render(e, lm.tokenizer) for e in task.examples]
    gens = steered_generations(lm, sae, texts, edit, layer=layer, cfg=cfg, budget=task.max_new_tokens)
    right = [task.score(e, g.text).exact for e, g in zip(task.examples, gens, strict=True)]
    return bootstrap(right, np.mean, scale=100, seed=cfg.seed, resamples=cfg.resamples)


# -- the run -----------------------------------------------------------------------------
def run_steering(
    lm: LoadedModel,
    sae: SAE,
    concepts: Sequence[Concept],
    cfg: SteerConfig,
    *,
    sae_label: str = "",
    cost_task: Task | None = None,
    prompts: Sequence[str] = NEUTRAL_PROMPTS,
    command: str = "",
) -> SteerResult:
    """The whole procedure of the module docstring for every concept; ``cost_task`` defaults to SST-2."""
    start = time.perf_counter()
    layer = resolve_layer(sae, cfg.layer)
    split = split_prompts(prompts, n_seed=cfg.n_seed, n_heldout=cfg.n_heldout, n_eval=cfg.n_eval, seed=cfg.seed)
    rendered = {name: [chat_text(p, lm.tokenizer) for p in part] for name, part in split.items()}
    if cost_task is None and cfg.sst2_n > 0:
        cost_task = load_task("sst2", n=cfg.sst2_n, seed=cfg.seed)
    sweep = Sweep(lm, sae, layer, cfg, rendered, cost_task)
    unsteered = {s: sweep.generate(s, None) for s in ("heldout", "eval")}
    cost = sweep.cost(None)
    runs = [sweep.concept(concept, unsteered) for concept in concepts]
    return SteerResult(
        config=cfg,
        model=lm.name,
        sae=sae_label,
        layer=layer,
        prompts=split,
        concepts=tuple(runs),
        cost_unsteered=cost,
        wall_s=time.perf_counter() - start,
        command=command,
    )


@dataclass
class Sweep:
    """The state shared by every concept of one run."""

    lm: LoadedModel
    sae: SAE
    layer: int
    cfg: SteerConfig
    rendered: dict[str, list[str]]
    cost_task: Task | None

    def generate(self, split: str, edit: Edit | None) -> list[Generation]:
        budget = self.cfg.max_new_tokens
        return steered_generations(
            self.lm, self.sae, self.rendered[split], edit, layer=self.layer, cfg=self.cfg, budget=budget
        )

    def cost(self, edit: Edit | None) -> Stat | None:
        if self.cost_task is None:
            return None
        return task_accuracy(self.lm, self.sae, self.cost_task, edit, layer=self.layer, cfg=self.cfg)

    def concept(self, concept: Concept, unsteered: dict[str, list[Generation]]) -> ConceptRun:
        """Baseline points, then every method's latents, sweep, choice and cost."""
        batch = self.cfg.batch_size
        baseline = {
            s: make_point("none", 0.0, s, measure(self.lm, concept, g, batch_size=batch), self.cfg)
            for s, g in unsteered.items()
        }
        typical = typical_activation(
            self.lm, self.sae, reference_texts(self.lm, concept, self.rendered["seed"]), layer=self.layer
        )
        methods = []
        for method in self.cfg.methods:
            if method == "gradsae-label" and concept.judge is None:
                log.info("%s: gradsae-label skipped (not a sentiment concept)", concept.name)
                continue
            methods.append(self.method(concept, method, typical, baseline["heldout"]))
        return ConceptRun(concept=concept, baseline=(baseline["heldout"], baseline["eval"]), methods=tuple(methods))

    def method(self, concept: Concept, method: str, typical: torch.Tensor, base: Point) -> MethodRun:
        cfg, tick = self.cfg, time.perf_counter()
        latents = pick_latents(
            self.lm, self.sae, concept, method, layer=self.layer, k=cfg.k, seeds=self.rendered["seed"], cfg=cfg
        )
        scales, unfired = latent_scales(typical, latents)
        points = []
        for alpha in cfg.alphas:
            edit = steering_edit(latents, alpha, scales)
            for split in ("heldout", "eval"):
                measured = measure(self.lm, concept, self.generate(split, edit), batch_size=cfg.batch_size)
                points.append(make_point(method, alpha, split, measured, cfg))
        alpha = choose_alpha([p for p in points if p.split == "heldout"], base, cfg)
        cost = self.cost(steering_edit(latents, alpha, scales)) if alpha > 0 else None
        log.info("%s / %s: alpha %g chosen (%.0f s)", concept.name, method, alpha, time.perf_counter() - tick)
        return MethodRun(
            method=method,
            latents=tuple(int(c) for c in latents),
            scales=tuple(float(a) for a in scales),
            unfired=tuple(bool(u) for u in unfired),
            points=tuple(points),
            alpha=alpha,
            cost=cost,
        )


def _mode(cfg: SteerConfig) -> Mode:
    return "replace" if cfg.mode == "replace" else "error"


def _tuples(data: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back to the tuples of a frozen dataclass."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
