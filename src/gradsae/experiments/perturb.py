"""Perturb and steer: regenerate answers with chosen latents edited at the spliced layer.

Experiment 1 (perturbation): zero ``Top`` / ``Bottom`` K at every position of every
forward pass, regenerate, and score against the gold answer:
``score(m, set, K) = 100 * mean_i metric(answer_i, gold_i)``. The unperturbed row
(``K = 0``: the splice, no edit, the same batches) is measured, not assumed to be 100.

Experiment 2 (local steering): pick a donor ``j`` for ``i`` (another kept example
with a different label, or another question on the same context, whose gold answers
differ from ``i``'s), zero ``Top_m(i, K)`` and set ``Top_m(j, K)`` to the donor's
values clamped to ``[0, 50]``, at the positions of ``cfg.steer_positions``. Success:
``100 * mean_i metric(answer_i, gold_j)``. Floors, measured on the same pairs: no
edit, ``zero`` (own TopK zeroed, nothing injected) and ``inject`` (donor's TopK set,
own left alone); a swap counts as steering only where it beats the zero-only floor.
Each steering cell also reports how often the answer stayed the recipient's own.

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

from gradsae.experiments.config import SETS, STEER_EDITS, ExperimentConfig, KSpec
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Condition:
        own = data.get("own")
        return cls(
            **{
                **data,
                "exact": Stat.from_dict(data["exact"]),
                "f1": Stat.from_dict(data["f1"]),
                "own": None if own is None else Stat.from_dict(own),
                "per_example": tuple(data.get("per_example", ())),
            }
        )


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
    newest_only: bool = False,
) -> list[Generation]:
    """Greedy answers batch by batch; ``edits_for(rows)`` gives each batch's latent edits.

    ``newest_only``: each pass edits only its last position and the KV cache keeps unedited
    keys/values (the authors' uncached last-position steering); the edits must use ``positions="last"``.
    """
    out: list[Generation] = []
    budget = task.max_new_tokens
    for batch in batches:
        if sae is None:
            out += generate_batch(lm, batch.input_ids, batch.attention_mask, max_new_tokens=budget)
            continue
        edits = edits_for(batch.rows) if edits_for else []
        replay = replay_prefix(lm, batch.prefix) if batch.prefix is not None else nullcontext()
        spliced = splice(lm, sae, cfg.layer, mode=cfg.mode, edits=edits, record=False, skip_first=cfg.skip_first)
        with spliced as state, replay:
            newest = state if newest_only and edits else None
            out += generate_batch(lm, batch.input_ids, batch.attention_mask, max_new_tokens=budget, newest_only=newest)
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
    *,
    on_answers: Callable[[str, list[str]], None] | None = None,
) -> list[Condition]:
    """Zero Top / Bottom K at every position and pass; score against the gold answers (K = 0 measured).

    ``on_answers(key, texts)``, when given, sees the answers of each condition (``none``, ``method/set/K``).
    """
    conditions = [(m, s, k) for m in cfg.methods for s in SETS for k in cfg.ks]
    batches = prompt_batches(lm, texts, cfg, reuse=cfg.reuse_prefix)
    key = unit_key(cfg.layer, "masking", "none")
    if (done := recall(journal, key)) is None:
        gens = decode(lm, batches, task, cfg, sae=sae, edits_for=None)
        scores = [task.score(ex.example, gen.text) for ex, gen in zip(kept, gens, strict=True)]
        done = record(journal, key, _condition("none", "-", 0, scores, [], cfg, edit="none"))
        if on_answers is not None:
            on_answers("none", [g.text for g in gens])
    out = [Condition.from_dict(done)]
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
        if on_answers is not None:
            on_answers(f"{method}/{which}/{k}", [g.text for g in gens])
    return out


def _condition(
    method: str,
    which: str,
    k: KSpec,
    scores: Sequence[Any],
    sets: Sequence[Sequence[int]],
    cfg: ExperimentConfig,
    positions: str = "",
    *,
    edit: str = "zero",
    own: Sequence[Any] | None = None,
) -> Condition:
    return Condition(
        method=method,
        set=which,
        k=str(k),
        exact=cfg.stat([s.exact for s in scores]),
        f1=cfg.stat([s.f1 for s in scores]),
        positions=positions,
        mean_k=float(np.mean([len(s) for s in sets])) if sets else 0.0,
        edit=edit,
        own=None if own is None else cfg.stat([s.exact for s in own]),
        per_example=tuple(float(s.exact) for s in scores),
    )


# -- experiment 2 -------------------------------------------------------------------
def pick_donors(kept: Sequence[KeptExample], *, seed: int) -> list[int | None]:
    """For each kept example a donor whose gold answers differ from its own: same context (``group``)
    for grouped QA, a different label for classification, any other example otherwise (``capitals``,
    ``plural``, a user file without groups); ``None`` if none exists."""
    rng = random.Random(seed)
    out: list[int | None] = []
    for i, ex in enumerate(kept):
        if ex.example.group is not None:
            pool = [j for j, o in enumerate(kept) if j != i and o.example.group == ex.example.group]
        elif ex.example.label is not None:
            pool = [j for j, o in enumerate(kept) if o.example.label != ex.example.label]
        else:
            pool = [j for j in range(len(kept)) if j != i]
        pool = [j for j in pool if not _same_answer(ex, kept[j])]
        out.append(rng.choice(pool) if pool else None)
    return out


def _same_answer(a: KeptExample, b: KeptExample) -> bool:
    """Do the two examples share a gold answer (after SQuAD normalisation)?"""
    from gradsae.experiments.tasks import normalize_answer

    return bool({normalize_answer(x) for x in a.example.answers} & {normalize_answer(x) for x in b.example.answers})


def steering_conditions(cfg: ExperimentConfig) -> list[tuple[str, str, KSpec, str, str]]:
    """``(method, set, K, positions, edit)`` for every steering cell: the swap for Top and Bottom K,
    and (with ``cfg.floors``) the zero-only and inject-only floors for TopK."""
    edits = STEER_EDITS if cfg.floors else ("swap",)
    out = []
    for where in cfg.steer_positions:
        for method in cfg.methods:
            for which in SETS:
                for k in cfg.ks:
                    out += [(method, which, k, where, e) for e in edits if e == "swap" or which == "top"]
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
    """Swap an example's Top K latents for its donor's (and the floors); success = answer matches the donor's."""
    pairs = [(i, j) for i, j in enumerate(donors) if j is not None]
    if not pairs:
        log.warning("no example has a donor with a different answer: experiment 2 is skipped")
        return []
    batches = prompt_batches(lm, [texts[i] for i, _ in pairs], cfg, reuse=cfg.reuse_prefix)
    out = []
    if cfg.floors:
        key = unit_key(cfg.layer, "steering", "none")
        if (done := recall(journal, key)) is None:
            gens = decode(lm, batches, task, cfg, sae=sae, edits_for=None)
            cell: tuple[str, str, KSpec, str, str] = ("none", "-", 0, "-", "none")
            done = record(journal, key, _steer_condition(task, kept, pairs, gens, cell, [], cfg))
        out.append(Condition.from_dict(done))
    conditions = steering_conditions(cfg)
    for cell in tqdm(conditions, desc=f"experiment 2: steering (layer {cfg.layer})", disable=None):
        method, which, k, where, edit = cell
        key = unit_key(cfg.layer, "steering", where, method, which, k, edit)
        if (done := recall(journal, key)) is not None:
            out.append(Condition.from_dict(done))
            continue
        own = [chosen(kept[i], method, which, k) for i, _ in pairs] if edit != "inject" else [[] for _ in pairs]
        give = [chosen(kept[j], method, which, k) for _, j in pairs] if edit != "zero" else [[] for _ in pairs]
        values = [
            [kept[j].donor_values.get(method, {}).get(c, 0.0) for c in latents]
            for (_, j), latents in zip(pairs, give, strict=True)
        ]
        positions = "last" if where == "last" else where

        def edits_for(
            rows: range,
            own: list[list[int]] = own,
            give: list[list[int]] = give,
            values: list[list[float]] = values,
            positions: str = positions,
        ) -> list[Edit]:
            return steering_edits([own[r] for r in rows], [give[r] for r in rows], [values[r] for r in rows], positions)

        gens = decode(lm, batches, task, cfg, sae=sae, edits_for=edits_for, newest_only=where == "last")
        sets = own if edit != "inject" else give
        out.append(
            Condition.from_dict(record(journal, key, _steer_condition(task, kept, pairs, gens, cell, sets, cfg)))
        )
    return out


def _steer_condition(
    task: Task,
    kept: Sequence[KeptExample],
    pairs: Sequence[tuple[int, int]],
    gens: Sequence[Generation],
    cell: tuple[str, str, KSpec, str, str],
    sets: Sequence[Sequence[int]],
    cfg: ExperimentConfig,
) -> Condition:
    method, which, k, where, edit = cell
    to_donor = [
        task.score(kept[i].example, g.text, answers=kept[j].example.answers)
        for (i, j), g in zip(pairs, gens, strict=True)
    ]
    to_own = [task.score(kept[i].example, g.text) for (i, _), g in zip(pairs, gens, strict=True)]
    return _condition(method, which, k, to_donor, sets, cfg, positions=where, edit=edit, own=to_own)


def steering_edits(
    own: Sequence[Sequence[int]], give: Sequence[Sequence[int]], values: Sequence[Sequence[float]], where: str
) -> list[Edit]:
    """Per row: zero its own latents, then set the donor's latents to the donor's values, at ``where``.

    Empty lists on every row drop that half (the zero-only and inject-only floors).
    """
    edits = []
    if any(own):
        edits.append(Edit(latents=padded(own), op="zero", positions=where))  # type: ignore[arg-type]
    if any(give):
        latents = padded(give)
        vals = torch.zeros(latents.shape)
        for row, value in enumerate(values):
            vals[row, : len(value)] = torch.as_tensor(list(value), dtype=torch.float32)
        edits.append(Edit(latents=latents, op="set", values=vals, positions=where))  # type: ignore[arg-type]
    return edits
