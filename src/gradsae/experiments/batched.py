"""Decode many conditions of an experiment as one batch: rows = examples x conditions.

Experiment 1 (and 2) decodes every prompt once per condition, each condition with
its own latent edits. Here a prompt batch of ``B`` examples and a group of ``C``
conditions become one batch of ``C * B`` rows, condition-major (row ``c * B + i``
is example ``i`` under condition ``c``):

* blocks ``0..l`` of the prompt pass come from the batch's prefix (computed once,
  repeated ``C`` times); each row runs blocks ``l+1..L`` with its own edits;
* edits become per-row edits: the ``j``-th edit of every condition with the same
  op and positions is one :class:`~gradsae.splice.Edit` with latents
  ``[C * B, n]``, ``-1`` on the rows of other conditions, so each row applies its
  own condition's edits in their order;
* a row stops at a stop token or, with ``stop_when_answered``, as soon as the task's
  parser can no longer change its answer (:meth:`~gradsae.experiments.tasks.Task.answered`);
  stopped rows leave the batch, the KV cache and the edits;
* logits are computed at each pass's last position only.

The tokens are those of :func:`gradsae.experiments.perturb.decode` run condition by
condition (rows do not interact; batched matrix products may round differently);
with ``stop_when_answered`` each generation is a prefix of that one with the same
parsed answer, hence the same score. Cost per condition: the prompt pass through
blocks ``l+1..L`` plus the steps until the answer is complete, at batch size ``C * B``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from gradsae import distributed
from gradsae.errors import GradSAEError
from gradsae.experiments.config import ExperimentConfig
from gradsae.experiments.perturb import EditsFor, PromptBatch
from gradsae.experiments.tasks import Task
from gradsae.generate import Generation, generation_of, greedy_tokens, pad_id, stop_ids
from gradsae.models import LoadedModel
from gradsae.prefix import replay_prefix
from gradsae.sae import SAE
from gradsae.splice import Edit, edit_rows, splice

MAX_ROWS = 128
"""Rows decoded at once (examples x conditions); bounds the KV cache and activations."""


def decode_conditions(
    lm: LoadedModel,
    sae: SAE,
    batches: Sequence[PromptBatch],
    task: Task,
    cfg: ExperimentConfig,
    conditions_edits: Sequence[EditsFor | None],
    *,
    newest_only: bool = False,
    stop_when_answered: bool = True,
    max_rows: int = MAX_ROWS,
) -> list[list[Generation]]:
    """Generations of every example under every condition: ``out[c][i]``; see the module docstring.

    ``conditions_edits[c](rows)`` gives condition ``c``'s edits for a batch's rows
    (``None``: no edit), as ``edits_for`` does for :func:`~gradsae.experiments.perturb.decode`.
    """
    widest = max((len(b.rows) for b in batches), default=1)
    per_group = max(1, max_rows // widest)

    def one(batch: PromptBatch) -> list[list[Generation]]:
        out: list[list[Generation]] = []
        for first in range(0, len(conditions_edits), per_group):
            group = conditions_edits[first : first + per_group]
            out += _decode_group(lm, sae, batch, task, cfg, group, newest_only, stop_when_answered)
        return out

    per_batch = distributed.map_items(one, batches)  # batches sharded over ranks, as in perturb.decode
    return [[gen for gens in per_batch for gen in gens[c]] for c in range(len(conditions_edits))]


def _decode_group(
    lm: LoadedModel,
    sae: SAE,
    batch: PromptBatch,
    task: Task,
    cfg: ExperimentConfig,
    group: Sequence[EditsFor | None],
    newest_only: bool,
    stop_when_answered: bool,
) -> list[list[Generation]]:
    """One prompt batch under ``len(group)`` conditions, as one decode."""
    size, copies = len(batch.rows), len(group)
    ids, mask = batch.input_ids.repeat(copies, 1), batch.attention_mask.repeat(copies, 1)
    like = torch.empty(0, dtype=sae.W_dec.dtype, device=ids.device)
    edits = merged_edits([edits_for(batch.rows) if edits_for else [] for edits_for in group], size, sae.cfg.d_sae, like)
    replay = replay_prefix(lm, batch.prefix.repeat(copies)) if batch.prefix is not None else nullcontext()
    tokenizer, stop = lm.tokenizer, stop_ids(lm)

    def answered(_row: int, tokens: list[int]) -> bool:
        return task.answered(tokenizer.decode(tokens, skip_special_tokens=True))

    spliced = splice(lm, sae, cfg.layer, mode=cfg.mode, edits=edits, record=False, skip_first=cfg.skip_first)
    with spliced as state, replay, torch.no_grad():

        def drop(keep: torch.Tensor) -> None:
            state.edits = [select_rows(edit, keep) for edit in state.edits]

        rows = greedy_tokens(
            lm.model,
            ids,
            mask,
            max_new_tokens=task.max_new_tokens,
            stop=stop,
            pad=pad_id(tokenizer),
            newest_only=state if newest_only and edits else None,
            answered=answered if stop_when_answered else None,
            on_drop=drop,
        )
    gens = [generation_of(tokenizer, ids[r], mask[r], tokens, stop) for r, tokens in enumerate(rows)]
    return [gens[c * size : (c + 1) * size] for c in range(copies)]


def merged_edits(per_condition: Sequence[Sequence[Edit]], size: int, d_sae: int, like: torch.Tensor) -> list[Edit]:
    """Each condition's edits (for ``size`` rows) as per-row edits of the ``len(per_condition) * size`` rows."""
    keys: list[tuple[int, str, str]] = []
    for edits in per_condition:
        for j, edit in enumerate(edits):
            if not isinstance(edit.positions, str):
                raise GradSAEError("batched conditions take edit positions 'all', 'last' or 'cumulative', not a mask")
            if (j, edit.op, edit.positions) not in keys:
                keys.append((j, edit.op, edit.positions))
    out = []
    for j, op, positions in sorted(keys, key=lambda key: key[0]):
        parts = [
            edit_rows(edits[j], size, d_sae, like)
            if j < len(edits) and (edits[j].op, edits[j].positions) == (op, positions)
            else None
            for edits in per_condition
        ]
        width = max((p[0].shape[1] for p in parts if p is not None), default=1)
        latents = torch.full((len(parts) * size, max(width, 1)), -1, dtype=torch.long, device=like.device)
        values = torch.zeros(latents.shape, dtype=like.dtype, device=like.device)
        for c, part in enumerate(parts):
            if part is not None:
                latents[c * size : (c + 1) * size, : part[0].shape[1]] = part[0]
                values[c * size : (c + 1) * size, : part[1].shape[1]] = part[1]
        out.append(Edit(latents=latents, op=op, values=values, positions=positions))  # type: ignore[arg-type]
    return out


def select_rows(edit: Edit, keep: torch.Tensor) -> Edit:
    """``edit`` on the rows ``keep`` only (per-row latents and values follow the rows)."""
    latents = torch.as_tensor(edit.latents)
    values = edit.values
    if isinstance(values, torch.Tensor) and values.ndim == 2:
        values = values[keep.to(values.device)]
    return dataclasses.replace(
        edit, latents=latents[keep.to(latents.device)] if latents.ndim == 2 else latents, values=values
    )
