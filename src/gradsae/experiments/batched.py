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
* newest-only steering (edits at each pass's newest position, the cache unedited)
  shares more: the first ``P - 1`` prompt columns are unedited in every condition,
  so every layer's keys and values for them come from one pass per batch, and each
  condition's prompt pass is the last column only;
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
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from gradsae import distributed
from gradsae.errors import GradSAEError
from gradsae.experiments.config import ExperimentConfig
from gradsae.experiments.tasks import Task
from gradsae.generate import Generation, croppable_cache, generation_of, greedy_tokens, pad_id, stop_ids
from gradsae.models import LoadedModel, cache_kwarg, position_ids
from gradsae.prefix import replay_prefix
from gradsae.sae import SAE
from gradsae.splice import Edit, edit_rows, splice

if TYPE_CHECKING:
    from gradsae.experiments.perturb import EditsFor, PromptBatch

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
    desc: str = "conditions",
) -> list[list[Generation]]:
    """Generations of every example under every condition: ``out[c][i]``; see the module docstring.

    ``conditions_edits[c](rows)`` gives condition ``c``'s edits for a batch's rows
    (``None``: no edit), as ``edits_for`` does for :func:`~gradsae.experiments.perturb.decode`.
    """
    widest = max((len(b.rows) for b in batches), default=1)
    per_group = max(1, max_rows // widest)

    firsts = range(0, len(conditions_edits), per_group)
    bar = tqdm(total=len(distributed.shard(batches)) * len(firsts), desc=desc, disable=None)

    def one(batch: PromptBatch) -> list[list[Generation]]:
        context = _context(lm, sae, batch, cfg) if newest_only else None
        out: list[list[Generation]] = []
        for first in firsts:
            group = conditions_edits[first : first + per_group]
            out += _decode_group(lm, sae, batch, task, cfg, group, newest_only, stop_when_answered, context)
            bar.update()
        return out

    with bar:
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
    context: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[list[Generation]]:
    """One prompt batch under ``len(group)`` conditions, as one decode.

    ``context`` (newest-only steering): every layer's keys and values of the prompt
    without its last column, unedited; the prompt pass is then the last column only.
    """
    size, copies = len(batch.rows), len(group)
    ids, mask = batch.input_ids.repeat(copies, 1), batch.attention_mask.repeat(copies, 1)
    like = torch.empty(0, dtype=sae.W_dec.dtype, device=ids.device)
    edits = merged_edits([edits_for(batch.rows) if edits_for else [] for edits_for in group], size, sae.cfg.d_sae, like)
    newest = newest_only and bool(edits)
    cache = _tiled_cache(lm, context, copies) if newest and context is not None else None
    replay = (
        replay_prefix(lm, batch.prefix.repeat(copies)) if batch.prefix is not None and cache is None else nullcontext()
    )
    tokenizer, stop = lm.tokenizer, stop_ids(lm)

    def answered(_row: int, tokens: list[int]) -> bool:
        return task.answered(tokenizer.decode(tokens, skip_special_tokens=True))

    spliced = splice(lm, sae, cfg.layer, mode=cfg.mode, edits=edits, record=False, skip_first=cfg.skip_first)
    with spliced as state, replay, torch.no_grad():

        def drop(keep: torch.Tensor) -> None:
            state.edits = [select_rows(edit, keep) for edit in state.edits]

        rows = greedy_tokens(
            lm.model,
            ids if cache is None else ids[:, -1:],
            mask,
            max_new_tokens=task.max_new_tokens,
            stop=stop,
            pad=pad_id(tokenizer),
            newest_only=state if newest else None,
            answered=answered if stop_when_answered else None,
            on_drop=drop,
            cache=cache,
        )
    gens = [generation_of(tokenizer, ids[r], mask[r], tokens, stop) for r, tokens in enumerate(rows)]
    return [gens[c * size : (c + 1) * size] for c in range(copies)]


def _context(
    lm: LoadedModel, sae: SAE, batch: PromptBatch, cfg: ExperimentConfig
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Every layer's keys and values of the prompts without their last column, spliced and unedited.

    Newest-only steering edits only the newest position of each pass, and the cache
    keeps unedited keys and values: the first ``P - 1`` prompt columns are the same in
    every condition. ``None`` when there is nothing to share (one-column prompts) or
    the model has sliding-window layers (whose cache keeps only the window).
    """
    from transformers import DynamicCache

    if batch.input_ids.shape[1] < 2:
        return None
    cache = DynamicCache(config=lm.model.config)
    ids, mask = batch.input_ids[:, :-1], batch.attention_mask[:, :-1]
    spliced = splice(lm, sae, cfg.layer, mode=cfg.mode, record=False, skip_first=cfg.skip_first)
    with spliced, torch.no_grad():
        lm.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids(mask),
            use_cache=True,
            logits_to_keep=1,
            **{cache_kwarg(lm.model): cache},
        )
    layers: list[Any] = list(cache.layers)
    if any(getattr(layer, "is_sliding", False) or not hasattr(layer, "keys") for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


def _tiled_cache(lm: LoadedModel, context: list[tuple[torch.Tensor, torch.Tensor]], copies: int) -> Any:
    """A croppable cache holding ``context`` repeated ``copies`` times along the batch (condition-major)."""
    cache = croppable_cache(lm.model)
    for index, (keys, values) in enumerate(context):
        cache.update(keys.repeat(copies, 1, 1, 1), values.repeat(copies, 1, 1, 1), index)
    return cache


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
