"""Perturb and steer: regenerate answers with chosen latents edited at the spliced layer.

Experiment 1 (perturbation): zero ``Top`` / ``Bottom`` K at every position of every
forward pass, regenerate, and score against the gold answer:
``score(m, set, K) = 100 * mean_i metric(answer_i, gold_i)``.

Experiment 2 (local steering): pick a donor ``j`` for ``i`` (another kept example
with a different label, or another question on the same context), zero
``Top_m(i, K)`` and set ``Top_m(j, K)`` to the donor's values clamped to
``[0, 50]`` (its activation at its last input token, or its mean activation when
that is 0), at the last position (each pass) or at every position. Success:
``100 * mean_i metric(answer_i, gold_j)``.

Blocks ``0..l`` of each prompt are computed once and replayed in every condition
(:mod:`gradsae.prefix`): an edit at layer ``l`` cannot change them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gradsae.experiments.config import SETS, ExperimentConfig, KSpec
from gradsae.experiments.journal import Journal, recall, record, unit_key
from gradsae.experiments.rank import KeptExample, chosen, padded
from gradsae.experiments.stats import Stat
from gradsae.experiments.tasks import Task
from gradsae.generate import Generation, encode_prompts, generate_batch
from gradsae.models import LoadedModel
from gradsae.prefix import Prefix, compute_prefix, replay_prefix
from gradsae.sae import SAE
from gradsae.splice import Edit, splice

log = logging.getLogger(__name__)


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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Condition:
        return cls(**{**data, "exact": Stat.from_dict(data["exact"]), "f1": Stat.from_dict(data["f1"])})


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


# -- experiment 1 ---------------------------------------------------------------------
def run_perturbation(
    lm: LoadedModel,
    sae: SAE,
    task: Task,
    kept: Sequence[KeptExample],
    texts: Sequence[str],
    cfg: ExperimentConfig,
    journal: Journal | None = None,
) -> list[Condition]:
    """Zero Top / Bottom K at every position and pass; score against the gold answers."""
    conditions = [(m, s, k) for m in cfg.methods for s in SETS for k in cfg.ks]
    out = []
    batches = prompt_batches(lm, texts, cfg, reuse=cfg.reuse_prefix)
    for method, which, k in tqdm(conditions, desc=f"experiment 1: masking (layer {cfg.layer})", disable=None):
        key = unit_key(cfg.layer, "masking", method, which, k)
        if (done := recall(journal, key)) is not None:
            out.append(Condition.from_dict(done))
            continue
        sets = [chosen(ex, method, which, k) for ex in kept]

        def edits_for(rows: range, sets: list[list[int]] = sets) -> list[Edit]:
            return [Edit(latents=padded([sets[i] for i in rows]), op="zero", positions="all")]

        gens = decode(lm, batches, task, cfg, sae=sae, edits_for=edits_for)
        scores = [task.score(ex.example, gen.text) for ex, gen in zip(kept, gens, strict=True)]
        out.append(Condition.from_dict(record(journal, key, _condition(method, which, k, scores, sets, cfg))))
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
        exact=cfg.stat([s.exact for s in scores]),
        f1=cfg.stat([s.f1 for s in scores]),
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
    journal: Journal | None = None,
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
        key = unit_key(cfg.layer, "steering", where, method, which, k)
        if (done := recall(journal, key)) is not None:
            out.append(Condition.from_dict(done))
            continue
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
        out.append(Condition.from_dict(record(journal, key, _condition(method, which, k, scores, own, cfg, where))))
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
