"""Steer open-ended generation toward a concept, every selector at the same strength; judge success and fluency.

For each SAE layer ``l`` and prompt seed ``s`` (a *cell*), each
:class:`~gradsae.experiments.results.Concept` and each latent selector ``m``:

1. Prompts. :data:`NEUTRAL_PROMPTS` is shuffled once (``s``) and cut into three
   disjoint parts (:func:`split_prompts`): ``seed`` prompts (only for the scores),
   ``heldout`` prompts (only for choosing ``alpha``) and ``eval`` prompts (only
   for the reported numbers), each through the chat template.
2. Latents: ``K`` per selector (:func:`pick_latents`; see :data:`~gradsae.experiments.results.METHOD_NAMES`):
   ``gradsae`` (the paper's aggregation of influence on ``log p(concept text |
   seed prompt)`` over every position of prompt + target), ``gradsae-target`` (the
   same influence over the target-predicting positions only), ``activation``
   (mean activation on the concept texts), ``logit-lens`` (decoder rows projected
   on the concept words' tokens: a stand-in for an output score, not Arad et al.'s),
   ``arad`` (Arad et al. 2025's intervention output score) and ``dtc`` (ΔToken
   Confidence, arXiv 2510.03659), both ranking the ``pool`` latents with the best
   activation score, and ``random`` (``random_draws`` seeded draws, each its own run).
   ``gradsae``, ``gradsae-target`` and ``activation`` subtract the same scores on
   contrast texts (the concept's negatives, else :data:`NEUTRAL_TEXTS`).
3. Strength, matched: the set's direction ``u = sum_i a_i W_dec[c_i]`` (``a_i`` the
   latent's typical activation on the reference texts) is scaled to the norm
   ``alpha x R`` (:func:`gradsae.steer.norm_matched_values`), ``R`` the residual
   stream's median token norm at the layer on the held-aside prompts, and added at
   every position of every pass. Every selector gets the same ``alpha`` grid.
4. Generation: greedy, ``max_new_tokens`` per prompt, the SAE spliced in error mode.
5. Per generation ``i`` (:func:`measure`), under the *unsteered* model: ``success_i``:
   1 if a listed concept word occurs as a whole word
   (:func:`gradsae.experiments.judges.concept_hits`), or for a sentiment
   concept the judge's ``P(label)`` summed over the label's spellings
   (:func:`gradsae.experiments.judges.sentiment_probs`); ``rate_i``: concept
   words per word; ``nll_i``: mean ``-log p`` of the generated tokens given the
   prompt; ``distinct_i``: distinct token bigrams / bigrams. Perplexity is
   ``exp(mean_i nll_i)``.
6. ``alpha`` (:func:`choose_alpha`), on the held-aside prompts only: the highest
   held-aside success among the alphas with held-aside perplexity at most
   ``max_ppl_ratio`` x and distinct-2 at least ``min_distinct_ratio`` x the
   unsteered ones (matched fluency); ``0`` when none beats no steering. The
   evaluation prompts are generated at that alpha only.
7. Judges are checked (:func:`judge_check`): a topic's words must match every
   concept text and no neutral text; the sentiment judge must separate the
   concept's texts from its negatives and emit label words it reads.

Journal (:mod:`gradsae.experiments.journal`): each finished unit (the residual
norm of a cell, a selector's latents, one selector x concept x alpha x split
point) is stored as it finishes; a rerun of the same command reads them back and
writes the same ``steering.json`` byte for byte. Under ``torchrun`` each rank first
computes its share of the units into the journal (:func:`fill_shard`), then every
rank assembles the result from it. The held-aside sweep of one
selector is generated as one batch (every alpha's rows), so a resumed run rebuilds
any missing point from the same batch.

Frozen before the second seed (:data:`~gradsae.experiments.results.FREEZE`): the concepts, prompts, texts,
grid and selectors hash to ``FREEZE["sha256"]``; the second prompt seed is drawn
from that hash (:func:`~gradsae.experiments.results.second_seed`), so it could not be chosen before them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import random
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradsae import distributed
from gradsae.errors import GradSAEError
from gradsae.experiments.journal import Journal, recall, unit_key
from gradsae.experiments.judges import (
    JUDGE_LABELS,
    concept_hits,
    emitted_labels,
    label_masses,
    label_variants,
    sentiment_probs,
)
from gradsae.experiments.results import (
    DEFAULT_ALPHAS,
    FREEZE,
    STEER_METHODS,
    Cell,
    Concept,
    ConceptRun,
    MethodRun,
    Point,
    SteerConfig,
    SteerResult,
    within_budget,
)
from gradsae.experiments.stats import bootstrap
from gradsae.generate import Generation, chat_text, generate, pad_id, pad_left
from gradsae.models import LoadedModel
from gradsae.objectives import TargetLogProb
from gradsae.sae import SAE
from gradsae.scores import objective_value
from gradsae.splice import Edit, Mode, splice
from gradsae.steer import (
    arad_output_scores,
    delta_token_confidence,
    latent_scales,
    logit_lens_scores,
    mean_activation,
    norm_matched_values,
    random_latents,
    residual_norm,
    target_influence,
    target_position_influence,
    target_rows,
    top_latents,
    typical_activation,
    word_tokens,
)

log = logging.getLogger(__name__)

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

POSITIVE_TEXTS = (
    "I loved it; everything was wonderful and I am so happy.",
    "What a great day: the food was delicious and the people were kind.",
    "This is an excellent, delightful experience that I would gladly repeat.",
    "I feel wonderful, grateful and full of joy.",
)
NEGATIVE_TEXTS = (
    "I hated it; everything was awful and I am so unhappy.",
    "What a terrible day: the food was disgusting and the people were rude.",
    "This is a horrible, miserable experience that I would never repeat.",
    "I feel awful, bitter and full of regret.",
)

CONCEPTS = {
    "positive": Concept(
        name="positive",
        words=("good", "great", "love", "loved", "happy", "wonderful", "excellent", "amazing", "beautiful", "joy"),
        texts=POSITIVE_TEXTS,
        negatives=NEGATIVE_TEXTS,
        judge="positive",
    ),
    "negative": Concept(
        name="negative",
        words=("bad", "awful", "terrible", "hate", "hated", "sad", "horrible", "miserable", "angry", "disgusting"),
        texts=NEGATIVE_TEXTS,
        negatives=POSITIVE_TEXTS,
        judge="negative",
    ),
    "weddings": Concept(
        name="weddings",
        words=(
            "wedding",
            "weddings",
            "bride",
            "brides",
            "bridal",
            "groom",
            "grooms",
            "bridegroom",
            "marriage",
            "marriages",
            "married",
            "marry",
            "marrying",
            "vows",
            "honeymoon",
            "honeymoons",
            "newlywed",
            "newlyweds",
        ),
        texts=(
            "The wedding was held in a small chapel, and the bride walked down the aisle to meet the groom.",
            "After the ceremony, the newly married couple cut the wedding cake and danced with their guests.",
            "The bride and groom exchanged vows and rings in front of their families.",
            "They planned their wedding for a year and then left for their honeymoon.",
        ),
    ),
    "football": Concept(
        name="football",
        words=(
            "football",
            "footballs",
            "soccer",
            "striker",
            "strikers",
            "referee",
            "referees",
            "stadium",
            "stadiums",
            "goalkeeper",
            "goalkeepers",
            "midfielder",
            "midfielders",
            "footballer",
            "footballers",
        ),
        texts=(
            "The striker scored a late goal and the whole stadium cheered for the team.",
            "The football match ended in a draw after the referee disallowed a goal.",
            "The goalkeeper saved a penalty and the midfielders pushed forward.",
            "Fans filled the stadium to watch the soccer final.",
        ),
    ),
    "ocean": Concept(
        name="ocean",
        words=(
            "ocean",
            "oceans",
            "sea",
            "seas",
            "seaside",
            "seashore",
            "beach",
            "beaches",
            "coral",
            "corals",
            "whale",
            "whales",
            "tide",
            "tides",
            "shore",
            "shores",
            "dolphin",
            "dolphins",
            "reef",
            "reefs",
        ),
        texts=(
            "The waves of the ocean crashed against the shore as the tide came in.",
            "Whales and dolphins swim through the deep blue sea near the coral reef.",
            "We walked along the beach and watched the sea stretch to the horizon.",
            "The ocean smelled of salt, and the sound of the waves filled the air.",
        ),
    ),
    "cooking": Concept(
        name="cooking",
        words=(
            "cook",
            "cooks",
            "cooked",
            "cooking",
            "recipe",
            "recipes",
            "bake",
            "baked",
            "baking",
            "oven",
            "ovens",
            "chef",
            "chefs",
            "ingredient",
            "ingredients",
            "simmer",
            "simmered",
            "flour",
            "saucepan",
            "roasted",
        ),
        texts=(
            "She chopped the onions, added the garlic and let the sauce simmer in the saucepan.",
            "The chef baked fresh bread in the oven and roasted the vegetables.",
            "Mix the flour and the other ingredients, then follow the recipe step by step.",
            "He loves cooking dinner for friends and trying a new recipe every week.",
        ),
    ),
}
"""Built-in concepts: two sentiments (the model's own judge) and four topics (whole listed words)."""

DEFAULT_CONCEPTS = tuple(CONCEPTS)


def freeze_payload() -> dict[str, Any]:
    """What was frozen before the second prompt seed was drawn: texts, prompts, grid, selectors."""
    return {
        "concepts": {name: dataclasses.asdict(c) for name, c in CONCEPTS.items()},
        "neutral_prompts": list(NEUTRAL_PROMPTS),
        "neutral_texts": list(NEUTRAL_TEXTS),
        "alphas": list(DEFAULT_ALPHAS),
        "methods": list(STEER_METHODS),
        "k": 8,
    }


def freeze_hash() -> str:
    """SHA-256 of :func:`freeze_payload` in canonical JSON."""
    text = json.dumps(freeze_payload(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


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
def contrast_texts(concept: Concept, cfg: SteerConfig) -> tuple[str, ...]:
    """The concept's negatives, else the neutral texts (``contrast="neutral"``), else none."""
    return concept.negatives or (NEUTRAL_TEXTS if cfg.contrast == "neutral" else ())


def random_seed(seed: int, concept: str, draw: int) -> int:
    """The seed of one random draw: fixed by the prompt seed, the concept and the draw (never shared)."""
    return zlib.crc32(f"{seed}/{concept}/{draw}".encode())


def selector_scores(
    lm: LoadedModel, sae: SAE, concept: Concept, method: str, *, layer: int, seeds: Sequence[str], cfg: SteerConfig
) -> torch.Tensor:
    """``[d_sae]`` the concept score of ``gradsae``, ``gradsae-target``, ``activation`` or ``logit-lens``."""
    mode: Mode = "error"
    negatives = contrast_texts(concept, cfg)
    if method == "logit-lens":
        return logit_lens_scores(lm, sae, word_tokens(lm.tokenizer, concept.words))
    if method == "activation":
        scores = mean_activation(lm, sae, concept.targets, layer=layer, mode=mode)
        return scores - mean_activation(lm, sae, negatives, layer=layer, mode=mode) if negatives else scores
    influence = target_influence if method == "gradsae" else target_position_influence
    scores = influence(lm, sae, seeds, concept.targets, layer=layer, mode=mode)
    return scores - influence(lm, sae, seeds, negatives, layer=layer, mode=mode) if negatives else scores


def pick_latents(
    lm: LoadedModel,
    sae: SAE,
    concept: Concept,
    method: str,
    *,
    layer: int,
    seeds: Sequence[str],
    cfg: SteerConfig,
    seed: int = 0,
) -> torch.Tensor:
    """``[k]`` distinct latents for ``concept`` by selector run ``method`` (``seeds``: rendered seed prompts)."""
    if method.startswith("random-"):
        draw = int(method.split("-")[1])
        return random_latents(sae.cfg.d_sae, cfg.k, seed=random_seed(seed, concept.name, draw))
    if method in ("arad", "dtc"):
        pool = top_latents(selector_scores(lm, sae, concept, "activation", layer=layer, seeds=seeds, cfg=cfg), cfg.pool)
        if method == "arad":
            output = arad_output_scores(lm, sae, pool.tolist(), layer=layer, amp=cfg.amplify)
        else:
            output = delta_token_confidence(lm, sae, pool.tolist(), layer=layer, amp=cfg.amplify)
        return pool[top_latents(output, cfg.k)]
    if method in ("gradsae", "gradsae-target", "activation", "logit-lens"):
        return top_latents(selector_scores(lm, sae, concept, method, layer=layer, seeds=seeds, cfg=cfg), cfg.k)
    raise GradSAEError(f"unknown selector {method!r}: use one of {', '.join(STEER_METHODS)}")


def reference_texts(lm: LoadedModel, concept: Concept, seeds: Sequence[str]) -> list[str]:
    """Texts whose activations set each latent's typical activation: seed + target rows and the concept texts."""
    ids, mask, _ = target_rows(lm.tokenizer, seeds, concept.targets)
    rows = [lm.tokenizer.decode(row[m.bool()].tolist()) for row, m in zip(ids, mask, strict=True)]
    return rows + list(concept.targets) + list(concept.negatives)


# -- generation and metrics ----------------------------------------------------------------
def steered_generations(
    lm: LoadedModel, sae: SAE, texts: Sequence[str], edit: Edit | None, *, layer: int, budget: int
) -> list[Generation]:
    """Greedy continuations of rendered ``texts`` as one batch, ``edit`` on every pass (``None``: unedited)."""
    with splice(lm, sae, layer, mode="error", edits=[edit] if edit is not None else [], record=False):
        return generate(lm, texts, max_new_tokens=budget, batch_size=max(len(texts), 1))


def sweep_edit(sae: SAE, latents: Sequence[int], weights: torch.Tensor, norms: Sequence[float], *, rows: int) -> Edit:
    """One batch, ``rows`` prompts per strength: row block ``j`` gets the vector of norm ``norms[j]``."""
    values = torch.stack([norm_matched_values(sae, latents, weights, n) for n in norms])
    values = values.repeat_interleave(rows, dim=0)
    index = torch.as_tensor(list(latents), dtype=torch.long).expand(len(values), -1)
    return Edit(latents=index, op="add", values=values, positions="all")


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
        success = sentiment_probs(lm, [g.text for g in gens], concept.judge, batch_size=batch_size)
    return Measured(
        success=success,
        rate=[h / max(n, 1) for h, n in hits],
        nll=mean_nll(lm, gens, batch_size=batch_size),
        distinct=[distinct_n(g.token_ids[:-1] if g.stopped else g.token_ids) for g in gens],
        texts=[g.text for g in gens],
    )


def make_point(method: str, alpha: float, split: str, m: Measured, cfg: SteerConfig) -> Point:
    boot = {"seed": 0, "resamples": cfg.resamples}
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


def choose_alpha(heldout: Sequence[Point], baseline: Point, cfg: SteerConfig) -> float:
    """The held-aside alpha with the best success within the fluency budget; 0 when none beats no steering."""
    best = baseline
    for point in sorted(heldout, key=lambda p: p.alpha):
        if within_budget(point, baseline, cfg) and point.success.mean > best.success.mean:
            best = point
    return best.alpha if best is not baseline else 0.0


# -- judges ---------------------------------------------------------------------------------
def judge_check(lm: LoadedModel, concept: Concept, cfg: SteerConfig) -> dict[str, Any]:
    """Does the concept's judge work? Topic: its words match every concept text and no neutral text.

    Sentiment: mean P(label) on the concept texts minus on its negatives (>= ``judge_margin``),
    the label mass the variants hold, and the words the judge actually emits (all label variants?).
    """
    if concept.judge is None:
        on_texts = [float(concept_hits(t, concept.words)[0] > 0) for t in concept.texts]
        neutral = [*NEUTRAL_TEXTS, *NEUTRAL_PROMPTS]
        on_neutral = [float(concept_hits(t, concept.words)[0] > 0) for t in neutral]
        good = min(on_texts) == 1.0 and max(on_neutral) == 0.0
        return {
            "kind": "words",
            "hit_texts": float(np.mean(on_texts)),
            "hit_neutral": float(np.mean(on_neutral)),
            "good": bool(good),
        }
    texts = list(concept.texts) + list(concept.negatives)
    share = sentiment_probs(lm, texts, concept.judge, batch_size=cfg.batch_size)
    mass = label_masses(lm, texts, batch_size=cfg.batch_size).sum(-1).tolist()
    emitted = emitted_labels(lm, texts, batch_size=cfg.batch_size)
    variants = {v.strip().lower() for label in JUDGE_LABELS for v in label_variants(label)}
    n = len(concept.texts)
    p_texts, p_negatives = float(np.mean(share[:n])), float(np.mean(share[n:]))
    covered = float(np.mean([e in variants for e in emitted]))
    good = p_texts - p_negatives >= cfg.judge_margin and covered == 1.0
    return {
        "kind": "sentiment",
        "label": concept.judge,
        "p_texts": p_texts,
        "p_negatives": p_negatives,
        "label_mass": float(np.mean(mass)),
        "emitted": emitted,
        "emitted_covered": covered,
        "good": bool(good),
    }


# -- the run -----------------------------------------------------------------------------
def remember(journal: Journal | None, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The journaled value of ``key``, else ``compute()`` stored under it; always as read back from JSON."""
    if (done := recall(journal, key)) is not None:
        return done
    value = compute()
    return journal.put(key, value) if journal is not None else json.loads(json.dumps(value))


def run_steering(
    lm: LoadedModel,
    saes: dict[int, tuple[SAE, str]],
    concepts: Sequence[Concept],
    cfg: SteerConfig,
    *,
    prompts: Sequence[str] = NEUTRAL_PROMPTS,
    command: str = "",
    journal: Journal | None = None,
) -> SteerResult:
    """The whole procedure of the module docstring: ``saes`` maps each layer of ``cfg.layers`` to (SAE, label)."""
    layers = cfg.layers or tuple(saes)
    if journal is not None and distributed.world_size() > 1:
        fill_shard(lm, saes, layers, concepts, cfg, prompts=prompts, journal=journal)
        distributed.barrier()  # from here every unit is journaled: each rank assembles the same result
    judges = {
        c.name: remember(journal, unit_key("judge", c.name), functools.partial(judge_check, lm, c, cfg))
        for c in concepts
    }
    cells = []
    for layer in layers:
        sae, label = saes[layer]
        for seed in cfg.seeds:
            cells.append(CellRun(lm, sae, layer, seed, label, cfg, journal, tuple(prompts)).run(concepts))
    return SteerResult(
        config=cfg,
        model=lm.name,
        concepts=tuple(concepts),
        judges=judges,
        cells=tuple(cells),
        freeze=dict(FREEZE),
        command=command,
    )


def fill_shard(
    lm: LoadedModel,
    saes: dict[int, tuple[SAE, str]],
    layers: Sequence[int],
    concepts: Sequence[Concept],
    cfg: SteerConfig,
    *,
    prompts: Sequence[str],
    journal: Journal,
) -> None:
    """Under torchrun: this rank's share of the judges and of the (layer, seed, concept) units, into the journal.

    Units are dealt round robin (:func:`gradsae.distributed.shard`); each is computed exactly as in one process
    (its values depend on its own layer, seed and concept only), so the assembled ``steering.json`` is the same.
    """
    for concept in distributed.shard(concepts):
        remember(journal, unit_key("judge", concept.name), functools.partial(judge_check, lm, concept, cfg))
    units = [(layer, seed, c) for layer in layers for seed in cfg.seeds for c in concepts]
    cells: dict[tuple[int, int], CellRun] = {}  # one per cell, so its unsteered generations are made once
    for layer, seed, concept in distributed.shard(units):
        if (layer, seed) not in cells:
            cells[layer, seed] = CellRun(lm, saes[layer][0], layer, seed, saes[layer][1], cfg, journal, tuple(prompts))
            cells[layer, seed].measure_norm()
        cells[layer, seed].concept(concept)


@dataclass
class CellRun:
    """One layer and one prompt seed: every concept and selector, each unit journaled as it finishes."""

    lm: LoadedModel
    sae: SAE
    layer: int
    seed: int
    label: str
    cfg: SteerConfig
    journal: Journal | None
    prompts: tuple[str, ...]

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.split = split_prompts(
            self.prompts, n_seed=cfg.n_seed, n_heldout=cfg.n_heldout, n_eval=cfg.n_eval, seed=self.seed
        )
        self.rendered = {name: [chat_text(p, self.lm.tokenizer) for p in part] for name, part in self.split.items()}
        self._unsteered: dict[str, list[Generation]] = {}
        self.norm = 0.0

    def key(self, *parts: object) -> str:
        return unit_key(self.layer, self.seed, *parts)

    def measure_norm(self) -> None:
        """``R``: the residual stream's median token norm at the layer on the held-aside prompts (journaled)."""
        self.norm = float(
            remember(
                self.journal,
                self.key("norm"),
                lambda: {"norm": residual_norm(self.lm, self.rendered["heldout"], layer=self.layer)},
            )["norm"]
        )

    def run(self, concepts: Sequence[Concept]) -> Cell:
        self.measure_norm()
        runs = tuple(self.concept(concept) for concept in concepts)
        return Cell(
            layer=self.layer, seed=self.seed, sae=self.label, prompts=self.split, resid_norm=self.norm, concepts=runs
        )

    def unsteered(self, split: str) -> list[Generation]:
        if split not in self._unsteered:
            self._unsteered[split] = self.generate(split, None)
        return self._unsteered[split]

    def generate(self, split: str, edit: Edit | None, *, copies: int = 1) -> list[Generation]:
        texts = self.rendered[split] * copies
        return steered_generations(self.lm, self.sae, texts, edit, layer=self.layer, budget=self.cfg.max_new_tokens)

    def point(self, concept: Concept, method: str, alpha: float, split: str, gens: Sequence[Generation]) -> Point:
        measured = measure(self.lm, concept, gens, batch_size=self.cfg.batch_size)
        return make_point(method, alpha, split, measured, self.cfg)

    def baseline_point(self, concept: Concept, split: str) -> dict[str, Any]:
        return dataclasses.asdict(self.point(concept, "none", 0.0, split, self.unsteered(split)))

    def concept(self, concept: Concept) -> ConceptRun:
        """Baseline points, then every selector run."""
        baseline = tuple(
            Point.from_dict(
                remember(
                    self.journal,
                    self.key(concept.name, "none", 0, split),
                    functools.partial(self.baseline_point, concept, split),
                )
            )
            for split in ("heldout", "eval")
        )
        typical: list[torch.Tensor] = []
        methods = tuple(self.method(concept, run, baseline[0], typical) for run in self.cfg.runs())
        return ConceptRun(concept=concept.name, baseline=baseline, methods=methods)

    def choose(self, concept: Concept, run: str, typical: list[torch.Tensor]) -> dict[str, Any]:
        """A selector's latents and their weights (typical activations on the reference texts)."""
        tick = time.perf_counter()
        if not typical:
            refs = reference_texts(self.lm, concept, self.rendered["seed"])
            typical.append(typical_activation(self.lm, self.sae, refs, layer=self.layer))
        latents = pick_latents(
            self.lm,
            self.sae,
            concept,
            run,
            layer=self.layer,
            seeds=self.rendered["seed"],
            cfg=self.cfg,
            seed=self.seed,
        )
        weights, unfired = latent_scales(typical[0], latents)
        log.info(
            "layer %d seed %d %s / %s: latents (%.0f s)",
            self.layer,
            self.seed,
            concept.name,
            run,
            time.perf_counter() - tick,
        )
        return {
            "latents": [int(c) for c in latents],
            "weights": [float(w) for w in weights],
            "unfired": [bool(u) for u in unfired],
        }

    def method(self, concept: Concept, run: str, base: Point, typical: list[torch.Tensor]) -> MethodRun:
        cfg = self.cfg
        chosen = remember(
            self.journal, self.key(concept.name, run, "latents"), lambda: self.choose(concept, run, typical)
        )
        latents, weights = chosen["latents"], torch.tensor(chosen["weights"], dtype=torch.float64)
        keys = {alpha: self.key(concept.name, run, alpha, "heldout") for alpha in cfg.alphas}
        found = {alpha: recall(self.journal, key) for alpha, key in keys.items()}
        if any(v is None for v in found.values()):
            tick, rows = time.perf_counter(), len(self.rendered["heldout"])
            edit = sweep_edit(self.sae, latents, weights, [a * self.norm for a in cfg.alphas], rows=rows)
            gens = self.generate("heldout", edit, copies=len(cfg.alphas))
            for j, alpha in enumerate(cfg.alphas):
                if found[alpha] is None:
                    point = self.point(concept, run, alpha, "heldout", gens[j * rows : (j + 1) * rows])
                    found[alpha] = remember(self.journal, keys[alpha], functools.partial(dataclasses.asdict, point))
            log.info(
                "layer %d seed %d %s / %s: held-aside sweep (%.0f s)",
                self.layer,
                self.seed,
                concept.name,
                run,
                time.perf_counter() - tick,
            )
        points = [Point.from_dict(found[alpha]) for alpha in cfg.alphas]  # type: ignore[arg-type]
        alpha = choose_alpha(points, base, cfg)
        if alpha > 0:

            def evaluate() -> dict[str, Any]:
                edit = sweep_edit(self.sae, latents, weights, [alpha * self.norm], rows=len(self.rendered["eval"]))
                return dataclasses.asdict(self.point(concept, run, alpha, "eval", self.generate("eval", edit)))

            points.append(Point.from_dict(remember(self.journal, self.key(concept.name, run, alpha, "eval"), evaluate)))
        return MethodRun(
            method=run,
            latents=tuple(latents),
            weights=tuple(chosen["weights"]),
            unfired=tuple(chosen["unfired"]),
            points=tuple(points),
            alpha=alpha,
        )


def journal_config(cfg: SteerConfig, model: str, saes: dict[int, str], concepts: Sequence[Concept]) -> dict[str, Any]:
    """What fingerprints a steering run's journal: the config, the model, each layer's SAE and the concepts."""
    return {
        "steer": dataclasses.asdict(cfg),
        "model": model,
        "saes": {str(k): v for k, v in saes.items()},
        "concepts": [dataclasses.asdict(c) for c in concepts],
    }
