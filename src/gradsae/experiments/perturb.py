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

Conditions are decoded a group at a time as one batch (:mod:`gradsae.experiments.decode`;
masking: one ranking method's Top / Bottom K; steering: one position mode and method),
and each finished condition is journaled (:mod:`gradsae.experiments.journal`). A group is
recomputed whole unless all its conditions are journaled, so a resumed run decodes the same
batches as an uninterrupted one. ``batched=False`` decodes condition by condition with
:func:`~gradsae.experiments.decode.decode` (the reference the tests compare against: the same answers).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gradsae.experiments.config import SETS, STEER_EDITS, ExperimentConfig, KSpec
from gradsae.experiments.decode import Contexts, EditsFor, PromptBatch, decode, decode_conditions, prompt_batches
from gradsae.experiments.journal import Journal, recall, record, unit_key
from gradsae.experiments.rank import KeptExample, chosen, padded
from gradsae.experiments.results import Condition, from_data
from gradsae.generate import Generation
from gradsae.models import LoadedModel
from gradsae.sae import SAE
from gradsae.splice import Edit
from gradsae.tasks import Task

log = logging.getLogger(__name__)


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
    batched: bool = True,
) -> list[Condition]:
    """Zero Top / Bottom K at every position and pass; score against the gold answers (K = 0 measured).

    ``on_answers(key, texts)``, when given, sees the answers of each condition (``none``, ``method/set/K``).
    """
    conditions = [(m, s, k) for m in cfg.methods for s in SETS for k in cfg.ks]
    batches = prompt_batches(lm, texts, cfg, reuse=cfg.reuse_prefix)
    keys = [unit_key(cfg.layer, "masking", "none")] + [unit_key(cfg.layer, "masking", *c) for c in conditions]
    all_sets: list[list[list[int]]] = [[]] + [[chosen(ex, m, w, k) for ex in kept] for m, w, k in conditions]
    cells = [("none", "-", 0), *conditions]

    def finish(n: int, gens: list[Generation]) -> Condition:
        method, which, k = cells[n]
        scores = [task.score(ex.example, gen.text) for ex, gen in zip(kept, gens, strict=True)]
        sets = all_sets[n]
        edit = "none" if n == 0 else "zero"
        removed = [ex.removed_norm(s) for ex, s in zip(kept, sets, strict=True)] if n else None
        done = record(journal, keys[n], _condition(method, which, k, scores, sets, cfg, edit=edit, removed=removed))
        if on_answers is not None:
            on_answers("none" if n == 0 else f"{method}/{which}/{k}", [g.text for g in gens])
        return from_data(Condition, done)

    units = [
        _Unit(
            key=keys[n], edits_for=_zero_all(all_sets[n]) if n else None, group=cells[min(max(n, 1), len(cells) - 1)][0]
        )
        for n in range(len(cells))
    ]
    # the recorder keeps each condition's whole answer text: no early stop when it listens
    return _run_units(lm, sae, batches, task, cfg, units, finish, journal, batched=batched, full=on_answers is not None)


@dataclass(frozen=True)
class _Unit:
    """One journaled condition: its key, its edits, and the group it is decoded in."""

    key: str
    edits_for: EditsFor | None
    group: tuple[Any, ...] | str
    """Conditions of one group are decoded as one batch (:mod:`gradsae.experiments.decode`)."""
    newest_only: bool = False


def _run_units(
    lm: LoadedModel,
    sae: SAE,
    batches: Sequence[PromptBatch],
    task: Task,
    cfg: ExperimentConfig,
    units: Sequence[_Unit],
    finish: Callable[[int, list[Generation]], Condition],
    journal: Journal | None,
    *,
    batched: bool,
    full: bool = False,
    experiment: int = 1,
) -> list[Condition]:
    """Each unit's :class:`Condition`: recalled from the journal, else decoded and ``finish``-ed (recorded).

    ``batched``: the units of a group are decoded together (a group is recomputed whole unless every one
    of its units is journaled, so its batch, hence every float, is the same in a resumed run); else each
    unit alone with :func:`decode`. ``full``: decode to the stop token (no early stop once answered).
    """
    out: dict[int, Condition] = {}
    groups = list(dict.fromkeys(unit.group for unit in units))
    contexts = Contexts()  # one context pass per prompt batch, shared by every group
    desc = f"experiment {experiment}: {'masking' if experiment == 1 else 'steering'} (layer {cfg.layer})"
    for group in tqdm(groups, desc=desc, disable=None):
        members = [n for n, unit in enumerate(units) if unit.group == group]
        pending = []
        for n in members:
            if (done := recall(journal, units[n].key)) is None:
                pending.append(n)
            else:
                out[n] = from_data(Condition, done)
        if not pending:
            continue
        if not batched:  # the reference: each condition alone, journaled as soon as it is done
            for n in pending:
                unit = units[n]
                out[n] = finish(
                    n, decode(lm, batches, task, cfg, sae=sae, edits_for=unit.edits_for, newest_only=unit.newest_only)
                )
            continue
        newest = any(units[n].newest_only for n in members)  # a group shares one position mode
        edits = [units[n].edits_for for n in members]
        gens = decode_conditions(
            lm,
            sae,
            batches,
            task,
            cfg,
            edits,
            newest_only=newest,
            stop_when_answered=not full,
            desc=str(group),
            contexts=contexts,
        )
        for n in pending:
            out[n] = finish(n, gens[members.index(n)])
    return [out[n] for n in range(len(units))]


def _zero_all(sets: list[list[int]]) -> EditsFor:
    """Zero each row's set at every position of every pass."""
    return lambda rows: [Edit(latents=padded([sets[i] for i in rows]), op="zero", positions="all")]


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
    removed: Sequence[float] | None = None,
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
        k_min=min((len(s) for s in sets), default=0),
        k_max=max((len(s) for s in sets), default=0),
        removed_norm=None if removed is None else float(np.mean(removed)) if removed else 0.0,
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
    from gradsae.tasks import normalize_answer

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
    *,
    batched: bool = True,
) -> list[Condition]:
    """Swap an example's Top K latents for its donor's (and the floors); success = answer matches the donor's."""
    pairs = [(i, j) for i, j in enumerate(donors) if j is not None]
    if not pairs:
        log.warning("no example has a donor with a different answer: experiment 2 is skipped")
        return []
    batches = prompt_batches(lm, [texts[i] for i, _ in pairs], cfg, reuse=cfg.reuse_prefix)
    cells: list[tuple[str, str, KSpec, str, str]] = [("none", "-", 0, "-", "none")] if cfg.floors else []
    cells += steering_conditions(cfg)
    units: list[_Unit] = []
    all_sets: list[list[list[int]]] = []
    for cell in cells:
        method, which, k, where, edit = cell
        if edit == "none":
            first = cells[1] if len(cells) > 1 else cell
            units.append(_Unit(key=unit_key(cfg.layer, "steering", "none"), edits_for=None, group=_group(first)))
            all_sets.append([])
            continue
        own = [chosen(kept[i], method, which, k) for i, _ in pairs] if edit != "inject" else [[] for _ in pairs]
        give = [chosen(kept[j], method, which, k) for _, j in pairs] if edit != "zero" else [[] for _ in pairs]
        values = [
            [kept[j].donor_values.get(method, {}).get(c, 0.0) for c in latents]
            for (_, j), latents in zip(pairs, give, strict=True)
        ]
        key = unit_key(cfg.layer, "steering", where, method, which, k, edit)
        edits_for = _steer_all(own, give, values, where)
        units.append(_Unit(key=key, edits_for=edits_for, group=_group(cell), newest_only=where == "last"))
        all_sets.append(own if edit != "inject" else give)

    def finish(n: int, gens: list[Generation]) -> Condition:
        done = record(journal, units[n].key, _steer_condition(task, kept, pairs, gens, cells[n], all_sets[n], cfg))
        return from_data(Condition, done)

    return _run_units(lm, sae, batches, task, cfg, units, finish, journal, batched=batched, experiment=2)


def _group(cell: tuple[str, str, KSpec, str, str]) -> tuple[str, str]:
    """Steering cells decoded together: one position mode and one ranking method (the no-edit floor rides
    with the first)."""
    return (cell[3], cell[0])


def _steer_all(own: list[list[int]], give: list[list[int]], values: list[list[float]], where: str) -> EditsFor:
    """Each pair's swap (or floor) edits at ``where``."""
    return lambda rows: steering_edits(
        [own[r] for r in rows], [give[r] for r in rows], [values[r] for r in rows], where
    )


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
