"""Prompt batches and greedy decoding: condition by condition, or many conditions as one batch.

:func:`prompt_batches` splits the prompts into left-padded batches (each with blocks
``0..l`` precomputed when reused); :func:`decode` greedy-decodes them under one set of
latent edits. :func:`decode_conditions` decodes many conditions of an experiment as one
batch: rows = examples x conditions.

Experiment 1 (and 2) decodes every prompt once per condition, each condition with
its own latent edits. Here the ``B`` examples of a prompt batch under ``C``
conditions are ``C * B`` rows ``(condition, example)``, decoded ``max_rows`` at a time:

* one unedited spliced pass over the batch's prompts (the *context*) gives every
  layer's keys and values and the latents at the spliced layer;
* a row's edits can change the residual only from its *first change* on: for
  ``zero`` at every position, the first column where one of its latents is active;
  for ``set`` / ``add`` at every position, its first spliced column; for edits at the
  last position (and newest-only steering, whose cache stays unedited), the last
  prompt column. By causal attention every earlier column is the context's in every
  layer, so rows are sorted by first change, and each chunk's prompt pass runs in at
  most :data:`MAX_STAGES` stages (:func:`stages`): a row joins at the stage holding its
  first change, on the context's keys and values of the columns before it, and the rows
  already running carry their own cache; the boundaries minimise the prompt columns
  computed, ``sum over rows of (P - begin of the row's stage)``, against
  ``rows x (P - earliest first change)`` for one stage (blocks ``0..l`` of the columns a
  stage covers come from the batch's prefix when there is one);
* the context depends only on the batch and the splice, so :class:`Contexts` computes it
  once per prompt batch for every group of conditions (experiment 1's methods, experiment
  2's) decoded on those batches;
* edits become per-row edits: the ``j``-th edit of every condition with the same op
  and positions is one :class:`~gradsae.splice.Edit` with latents ``[rows, n]``,
  ``-1`` on the other rows, so each row applies its own condition's edits in order;
* a row stops at a stop token or, with ``stop_when_answered``, as soon as the task's
  parser can no longer change its answer (:meth:`~gradsae.tasks.Task.answered`);
  stopped rows leave the batch, the KV cache and the edits;
* logits are computed at each pass's last position only.

The tokens are those of :func:`decode` run condition by
condition (rows do not interact; batched matrix products may round differently);
with ``stop_when_answered`` each generation is a prefix of that one with the same
parsed answer, hence the same score. Cost per condition: the prompt columns from
each row's stage on through blocks ``l+1..L`` (all of them at worst), plus
the steps until the answer is final, at batch size ``max_rows``; plus one context
pass per prompt batch, shared by all conditions and groups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache as memoised
from typing import Any

import torch
from tqdm.auto import tqdm

from gradsae import distributed
from gradsae.errors import GradSAEError
from gradsae.experiments.config import ExperimentConfig
from gradsae.generate import (
    Generation,
    cache_holding,
    cached_pass,
    encode_prompts,
    generate_batch,
    generation_of,
    greedy_tokens,
    keys_values,
    pad_id,
    stop_ids,
)
from gradsae.models import LoadedModel, position_ids
from gradsae.prefix import Prefix, compute_prefix, replay_prefix
from gradsae.sae import SAE
from gradsae.splice import Edit, SparseActs, edit_rows, splice
from gradsae.tasks import Task

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
    out: list[PromptBatch] = []
    for start in range(0, len(texts), cfg.batch_size):
        rows = range(start, min(start + cfg.batch_size, len(texts)))
        ids, mask = encode_prompts(lm.tokenizer, [texts[i] for i in rows])
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        mine = len(out) % distributed.world_size() == distributed.rank()  # the rank that decodes this batch
        prefix = compute_prefix(lm, ids, mask, cfg.layer) if reuse and mine else None
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
    budget = task.max_new_tokens

    def one(batch: PromptBatch) -> list[Generation]:
        if sae is None:
            return generate_batch(lm, batch.input_ids, batch.attention_mask, max_new_tokens=budget)
        edits = edits_for(batch.rows) if edits_for else []
        replay = replay_prefix(lm, batch.prefix) if batch.prefix is not None else nullcontext()
        spliced = splice(lm, sae, cfg.layer, mode=cfg.mode, edits=edits, record=False, skip_first=cfg.skip_first)
        with spliced as state, replay:
            newest = state if newest_only and edits else None
            return generate_batch(lm, batch.input_ids, batch.attention_mask, max_new_tokens=budget, newest_only=newest)

    return [gen for gens in distributed.map_items(one, batches) for gen in gens]  # batches sharded over ranks


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
    contexts: Contexts | None = None,
) -> list[list[Generation]]:
    """Generations of every example under every condition: ``out[c][i]``; see the module docstring.

    ``conditions_edits[c](rows)`` gives condition ``c``'s edits for a batch's rows
    (``None``: no edit), as ``edits_for`` does for :func:`decode`. ``contexts``: shares each
    batch's context pass with other calls on the same batches (computed here when absent).
    """
    contexts = Contexts() if contexts is None else contexts
    chunks = -(-len(conditions_edits) * max((len(b.rows) for b in batches), default=0) // max_rows)
    bar = tqdm(total=len(distributed.shard(batches)) * chunks, desc=desc, disable=None)

    def one(batch: PromptBatch) -> list[list[Generation]]:
        like = torch.empty(0, dtype=sae.W_dec.dtype, device=batch.input_ids.device)
        tables = [
            _tables(edits_for(batch.rows) if edits_for else [], len(batch.rows), sae.cfg.d_sae, like)
            for edits_for in conditions_edits
        ]
        context = contexts.get(lm, sae, batch, cfg)
        starts = _first_changes(tables, context, batch, sae.cfg.d_sae, newest_only)
        rows = sorted(((c, i) for c in range(len(tables)) for i in range(len(batch.rows))), key=lambda r: -starts[r])
        out: dict[tuple[int, int], Generation] = {}
        for first in range(0, len(rows), max_rows):
            chunk = sorted(rows[first : first + max_rows], key=lambda r: starts[r])  # stages add rows at the end
            gens = _decode_rows(
                lm,
                sae,
                batch,
                task,
                cfg,
                tables,
                chunk,
                context,
                [starts[r] for r in chunk],
                newest_only,
                stop_when_answered,
            )
            out.update(zip(chunk, gens, strict=True))
            bar.update()
        return [[out[c, i] for i in range(len(batch.rows))] for c in range(len(tables))]

    with bar:
        per_batch = distributed.map_items(one, batches)  # batches sharded over ranks, as in decode
    return [[gen for gens in per_batch for gen in gens[c]] for c in range(len(conditions_edits))]


@dataclass(frozen=True)
class _Table:
    """One edit of a condition, resolved for a prompt batch: per example, its latents and values."""

    op: str
    positions: str
    latents: torch.Tensor
    """``[batch, n]``, ``-1`` padding."""
    values: torch.Tensor
    """``[batch, n]``."""


def _tables(edits: Sequence[Edit], size: int, d_sae: int, like: torch.Tensor) -> list[_Table]:
    out = []
    for edit in edits:
        if not isinstance(edit.positions, str):
            raise GradSAEError("batched conditions take edit positions 'all', 'last' or 'cumulative', not a mask")
        latents, values = edit_rows(edit, size, d_sae, like)
        out.append(_Table(op=edit.op, positions=edit.positions, latents=latents, values=values))
    return out


@dataclass(frozen=True)
class _Context:
    """One unedited, spliced pass over a batch's prompts: what every row shares before its first change."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    """Every layer's keys and values ``[batch, kv_heads, P, head_dim]``."""
    latents: SparseActs
    """The latents at the spliced layer (spliced positions only)."""
    valid: torch.Tensor
    """``[batch, P]`` spliced positions."""


def _context(lm: LoadedModel, sae: SAE, batch: PromptBatch, cfg: ExperimentConfig) -> _Context | None:
    """The unedited spliced prompt pass (blocks ``0..l`` replayed when the batch has a prefix).

    ``None`` when the model has sliding-window or other non-standard cache layers
    (whose cache may not keep every column): rows then start at column 0.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    ids, mask = batch.input_ids, batch.attention_mask
    spliced = splice(lm, sae, cfg.layer, mode=cfg.mode, skip_first=cfg.skip_first)
    replay = replay_prefix(lm, batch.prefix) if batch.prefix is not None else nullcontext()
    with spliced as state, replay, torch.no_grad():
        cached_pass(lm.model, ids, mask, position_ids(mask), cache)
    if any(getattr(layer, "is_sliding", False) or not hasattr(layer, "keys") for layer in cache.layers):
        return None
    return _Context(kv=keys_values(cache), latents=state.latents[0], valid=state.valid[0])


CONTEXT_BYTES = 1 << 30
"""Keys and values that :class:`Contexts` keeps at most (beyond: recomputed per call)."""


class Contexts:
    """Each prompt batch's context pass (:func:`_context`), computed once and reused.

    The context depends only on the batch, the SAE and the splice (layer, mode,
    ``skip_first``), never on a condition, so every group of conditions decoded on the
    same batches shares it (the same floats: the pass is recomputed identically).
    At most ``max_bytes`` of keys and values are kept; past that, contexts are recomputed.
    """

    def __init__(self, max_bytes: int = CONTEXT_BYTES) -> None:
        self.max_bytes = max_bytes
        self._held: dict[tuple[Any, ...], tuple[PromptBatch, _Context | None]] = {}
        self._bytes = 0

    def get(self, lm: LoadedModel, sae: SAE, batch: PromptBatch, cfg: ExperimentConfig) -> _Context | None:
        """The context of ``batch`` under this splice, kept if it fits."""
        key = (id(batch), id(sae), cfg.layer, cfg.mode, cfg.skip_first)
        if key in self._held:
            return self._held[key][1]
        context = _context(lm, sae, batch, cfg)
        size = 0 if context is None else sum(k.nbytes + v.nbytes for k, v in context.kv)
        if self._bytes + size <= self.max_bytes:
            self._held[key] = (batch, context)  # the batch is held too, so its id is not reused
            self._bytes += size
        return context


def _first_changes(
    tables: Sequence[Sequence[_Table]], context: _Context | None, batch: PromptBatch, d_sae: int, newest_only: bool
) -> dict[tuple[int, int], int]:
    """Each row's first change (see the module docstring), at most ``P - 1``; 0 without a context."""
    size, width = batch.input_ids.shape
    if context is None:
        return {(c, i): 0 for c in range(len(tables)) for i in range(size)}
    columns = torch.arange(width, device=context.valid.device)
    first_spliced = torch.where(context.valid, columns, width - 1).amin(dim=1)
    index = context.latents.index
    out = {}
    for c, table in enumerate(tables):
        first = torch.full((size,), width - 1, dtype=torch.long, device=columns.device)
        for edit in table if not newest_only else ():
            if edit.positions != "all":
                continue
            if edit.op != "zero":
                first = torch.minimum(first, first_spliced)
                continue
            rows = torch.arange(size, device=columns.device)[:, None].expand_as(edit.latents)
            chosen = (rows * d_sae + edit.latents)[edit.latents >= 0]
            hit = torch.isin(index[:, 0] * d_sae + index[:, 2], chosen)
            first = first.scatter_reduce(0, index[hit, 0], index[hit, 1], reduce="amin")
        out.update({(c, i): int(first[i]) for i in range(size)})
    return out


def _decode_rows(
    lm: LoadedModel,
    sae: SAE,
    batch: PromptBatch,
    task: Task,
    cfg: ExperimentConfig,
    tables: Sequence[Sequence[_Table]],
    chunk: Sequence[tuple[int, int]],
    context: _Context | None,
    starts: Sequence[int],
    newest_only: bool,
    stop_when_answered: bool,
) -> list[Generation]:
    """Rows ``(condition, example)`` of one prompt batch (sorted by first change ``starts``), decoded together.

    The prompt pass runs in stages (:func:`stages`): a row joins at the stage that holds its first
    change, on the context's keys and values of the columns before; earlier rows carry their own cache.
    """
    examples = torch.tensor([i for _, i in chunk], device=batch.input_ids.device)
    ids, mask = batch.input_ids[examples], batch.attention_mask[examples]
    like = torch.empty(0, dtype=sae.W_dec.dtype, device=ids.device)
    bounds = stages(starts) if context is not None else [(0, len(chunk))]
    tokenizer, stop = lm.tokenizer, stop_ids(lm)

    def answered(_row: int, tokens: list[int]) -> bool:
        return task.answered(tokenizer.decode(tokens, skip_special_tokens=True))

    spliced = splice(lm, sae, cfg.layer, mode=cfg.mode, record=False, skip_first=cfg.skip_first)
    with spliced as state, torch.no_grad():
        cache = None
        for stage, (begin, joined) in enumerate(bounds):
            cache = _join(lm, context, cache, examples, joined, begin)
            state.edits = _row_edits(tables, chunk[:joined], like)
            if stage + 1 < len(bounds):
                cache = _prompt_stage(lm, batch, examples[:joined], cache, begin, bounds[stage + 1][0])
        begin = bounds[-1][0]
        prefix = batch.prefix.columns(begin if cache is not None else 0).select(examples) if batch.prefix else None
        with replay_prefix(lm, prefix) if prefix is not None else nullcontext():

            def drop(keep: torch.Tensor) -> None:
                state.edits = [select_rows(edit, keep) for edit in state.edits]

            rows = greedy_tokens(
                lm.model,
                ids[:, begin:] if cache is not None else ids,
                mask,
                max_new_tokens=task.max_new_tokens,
                stop=stop,
                pad=pad_id(tokenizer),
                newest_only=state if newest_only and state.edits else None,
                answered=answered if stop_when_answered else None,
                on_drop=drop,
                cache=cache,
            )
    return [generation_of(tokenizer, ids[r], mask[r], tokens, stop) for r, tokens in enumerate(rows)]


MAX_STAGES = 4
"""Stages of a chunk's prompt pass at most (each copies the keys and values of the rows it carries)."""


def stages(starts: Sequence[int], max_stages: int = MAX_STAGES) -> list[tuple[int, int]]:
    """Stage boundaries ``[(begin, rows joined), ...]`` for rows whose first changes ``starts`` ascend.

    Stage ``s`` runs the prompt columns ``begin_s .. begin_{s+1} - 1`` for the first ``joined_s``
    rows; the first ``begin`` is the earliest start and each ``begin`` is some row's start. Chosen
    (dynamic programming) to minimise the prompt columns computed, sum over rows of
    ``width - begin(row)``, which falls from ``rows x (width - min start)`` towards ``sum(width - start)``.
    """
    if list(starts) != sorted(starts):
        raise ValueError("starts must ascend")
    if not starts:
        return []
    values = sorted(set(starts))
    before = [sum(1 for s in starts if s < v) for v in values]  # rows that joined before each candidate

    @memoised
    def best(i: int, left: int) -> tuple[int, tuple[int, ...]]:
        """Cheapest cost of the rows from candidate ``i`` on, with at most ``left`` more boundaries."""
        whole: tuple[int, tuple[int, ...]] = ((len(starts) - before[i]) * -values[i], (i,))
        if left == 1:
            return whole
        options = [whole]
        for j in range(i + 1, len(values)):
            cost, rest = best(j, left - 1)
            options.append(((before[j] - before[i]) * -values[i] + cost, (i, *rest)))
        return min(options)

    chosen = best(0, max_stages)[1]
    joined = [*(before[j] for j in chosen[1:]), len(starts)]
    return [(values[i], n) for i, n in zip(chosen, joined, strict=True)]


def _join(
    lm: LoadedModel, context: _Context | None, cache: Any, examples: torch.Tensor, joined: int, begin: int
) -> Any:
    """The cache of the first ``joined`` rows at column ``begin``: ``cache``'s rows, then the context's."""
    if context is None or begin == 0:
        return cache
    carried = 0 if cache is None else int(cache.layers[0].keys.shape[0])
    if carried == joined:
        return cache
    new = examples[carried:joined]
    fresh = [(k[new, :, :begin], v[new, :, :begin]) for k, v in context.kv]
    if cache is None:
        return cache_holding(lm.model, fresh)
    own = keys_values(cache)
    return cache_holding(
        lm.model, [(torch.cat([k, fk]), torch.cat([v, fv])) for (k, v), (fk, fv) in zip(own, fresh, strict=True)]
    )


def _prompt_stage(lm: LoadedModel, batch: PromptBatch, examples: torch.Tensor, cache: Any, begin: int, end: int) -> Any:
    """``cache`` (a new one if ``None``) extended by prompt columns ``begin .. end - 1`` of rows ``examples``."""
    mask = batch.attention_mask[examples, :end]
    prefix = batch.prefix.columns(begin, end).select(examples) if batch.prefix is not None else None
    with replay_prefix(lm, prefix) if prefix is not None else nullcontext():
        ids = batch.input_ids[examples, begin:end]
        return cached_pass(lm.model, ids, mask, position_ids(mask)[:, begin:], cache)[1]


def _row_edits(tables: Sequence[Sequence[_Table]], chunk: Sequence[tuple[int, int]], like: torch.Tensor) -> list[Edit]:
    """Per-row edits of the rows ``(condition, example)``: one :class:`Edit` per (index, op, positions)."""
    keys: list[tuple[int, str, str]] = []
    for c, _ in chunk:
        for j, edit in enumerate(tables[c]):
            if (j, edit.op, edit.positions) not in keys:
                keys.append((j, edit.op, edit.positions))
    out = []
    for j, op, positions in sorted(keys, key=lambda key: key[0]):
        parts = [
            (r, tables[c][j], i)
            for r, (c, i) in enumerate(chunk)
            if j < len(tables[c]) and (tables[c][j].op, tables[c][j].positions) == (op, positions)
        ]
        width = max(max(part.latents.shape[1] for _, part, _ in parts), 1)
        latents = torch.full((len(chunk), width), -1, dtype=torch.long, device=like.device)
        values = torch.zeros(latents.shape, dtype=like.dtype, device=like.device)
        for r, part, i in parts:
            latents[r, : part.latents.shape[1]] = part.latents[i]
            values[r, : part.values.shape[1]] = part.values[i]
        out.append(Edit(latents=latents, op=op, values=values, positions=positions))  # type: ignore[arg-type]
    return out


def merged_edits(per_condition: Sequence[Sequence[Edit]], size: int, d_sae: int, like: torch.Tensor) -> list[Edit]:
    """Each condition's edits (for ``size`` rows) as per-row edits of ``len(per_condition) * size`` rows,
    condition-major (row ``c * size + i``)."""
    tables = [_tables(edits, size, d_sae, like) for edits in per_condition]
    return _row_edits(tables, [(c, i) for c in range(len(tables)) for i in range(size)], like)


def select_rows(edit: Edit, keep: torch.Tensor) -> Edit:
    """``edit`` on the rows ``keep`` only (per-row latents and values follow the rows)."""
    latents = torch.as_tensor(edit.latents)
    values = edit.values
    if isinstance(values, torch.Tensor) and values.ndim == 2:
        values = values[keep.to(values.device)]
    return dataclasses.replace(
        edit, latents=latents[keep.to(latents.device)] if latents.ndim == 2 else latents, values=values
    )
