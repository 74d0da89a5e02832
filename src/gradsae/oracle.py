"""The exact single-latent ablation oracle, computed only where the ablation can change anything.

For one prompt (``T`` columns, left padding allowed), an SAE spliced at block ``l``
of an ``L``-block model, an objective ``Y`` and each active latent ``c``::

    effect(c) = Y(H) - Y(H with latent c zeroed at every spliced position)

with a :class:`~gradsae.objectives.NextTokenProb` pinned by the caller to the
clean greedy token. This is the same number as one full forward per latent with
``Edit(latents=[c])`` in the splice; what changes is how much of that forward is
run. Let ``P_c`` be the spliced positions where ``H[n, c] > 0`` in the clean
pass and ``f_c = min P_c``.

1. Blocks ``0..l`` do not see the edit: their keys, values and output ``Z`` are
   computed once (:func:`gradsae.prefix.compute_prefix`).
2. Zeroing ``c`` where it is already zero changes nothing, so the spliced
   residual differs from the clean one only on ``P_c``:

   * error mode: ``Z'_c[n] = Z[n] - H[n, c] W_dec[c]`` for ``n in P_c``, ``Z[n]`` elsewhere;
   * replace mode: ``Z'_c[n] = decode(H[n] - H[n, c] e_c)`` at the spliced positions
     (``Z[n]`` at the others).

   Both come straight from the clean pass's sparse codes (the encoder is not
   rerun): the same entry arithmetic as the splice (:mod:`gradsae.sparse`).
3. Causality: every column ``n < f_c`` of every block after ``l`` has the
   same input as in the clean pass, so the same keys and values. The ablated
   pass runs only columns ``s..T-1`` (``s <= f_c``) on a KV cache holding the
   clean pass's columns ``0..s-1`` of every block; blocks ``0..l`` replay
   their stored columns ``s..`` and block ``l`` hands the rest ``Z'_c``.
4. The LM head runs only at the ``keep`` columns the objective reads
   (``s <= T - keep``; an objective that reads every column starts at 0).
5. Latents are sorted by ``f_c`` and taken ``batch_size`` at a time: one
   forward runs the batch's rows from ``s = min f_c`` of the batch (rows whose
   ``f_c`` is later recompute a few unchanged columns, exactly).

``Y_clean`` is taken in each batched forward, from one more row that zeroes
nothing (latent ``-1``), so that the subtraction cancels the rounding that the
batch's path shares (the clean pass that fills the cache gives the same value
up to rounding).

Per latent, the cost is ``(T - s) / T * (L - l - 1) / L`` of a full forward
plus the cached attention over the first ``s`` columns, against ``(L - l - 1) / L``
for a prefix-replayed full pass. Memory per forward: ``batch_size`` copies of
the cache (``T`` columns, every block) and of the activations of ``T - s``
columns; ``batch_size`` bounds it.

Models whose cache layers are not plain (sliding windows, which drop old
columns) start every pass at column 0 (steps 1, 2, 4 and 5 still apply).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from gradsae import sparse
from gradsae.generate import cache_holding, keys_values
from gradsae.models import LoadedModel, cache_kwarg, position_ids
from gradsae.objectives import Objective
from gradsae.prefix import Prefix, compute_prefix, replay_prefix
from gradsae.sae import SAE
from gradsae.sparse import Codes
from gradsae.splice import Mode, splice


@dataclass(frozen=True)
class CleanPass:
    """The unedited spliced pass over one prompt: what every ablated pass shares."""

    prefix: Prefix
    """Blocks ``0..l``: keys, values and the block output ``Z`` ``[1, T, d_model]``."""
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    """Every block's keys and values ``[1, kv_heads, T, head_dim]``; ``None`` when the cache is not plain."""
    codes: Codes
    """The clean latents ``H``, one code row per column ``0..T-1``."""
    valid: torch.Tensor
    """``[T]`` spliced columns."""
    value: torch.Tensor
    """``[]`` the objective ``Y`` of the clean pass."""


def ablation_effects(
    lm: LoadedModel,
    sae: SAE,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    objective: Objective,
    latents: torch.Tensor,
    *,
    layer: int,
    mode: Mode,
    batch_size: int = 32,
    skip_first: bool = True,
) -> torch.Tensor:
    """``[len(latents)]`` exact ``Y - Y(latent c zeroed at every spliced position)`` for one prompt ``[1, T]``.

    See the module docstring. ``objective`` is used as given (pin a ``NextTokenProb``
    first); ``batch_size`` ablated copies run per forward, with one more copy that
    zeroes nothing: its ``Y`` is the clean value the batch's effects are taken from,
    so that baseline and edits share one path and batch (and its rounding).
    """
    clean = clean_pass(lm, sae, input_ids, attention_mask, objective, layer=layer, mode=mode, skip_first=skip_first)
    starts = first_columns(clean, latents, keep=objective.keep)
    order = torch.argsort(starts, stable=True)
    out = torch.empty(len(latents), dtype=clean.value.dtype, device=clean.value.device)
    size = max(1, batch_size)
    for first in range(0, len(latents), size):
        chosen = order[first : first + size]
        start = int(starts[chosen].min())
        rows = torch.cat([latents.new_full((1,), -1), latents[chosen]])  # row 0: no latent zeroed
        y = _ablated(lm, sae, clean, input_ids, attention_mask, objective, rows, start, mode=mode)
        out[chosen] = y[0] - y[1:]
    return out


@torch.no_grad()
def clean_pass(
    lm: LoadedModel,
    sae: SAE,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    objective: Objective,
    *,
    layer: int,
    mode: Mode,
    skip_first: bool = True,
) -> CleanPass:
    """Blocks ``0..l`` once, then the spliced, unedited pass with its cache, latents and ``Y``."""
    from transformers import DynamicCache

    prefix = compute_prefix(lm, input_ids, attention_mask, layer)
    cache = DynamicCache(config=lm.model.config)
    spliced = splice(lm, sae, layer, mode=mode, record=True, skip_first=skip_first)
    with spliced as state, replay_prefix(lm, prefix):
        out = lm.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=True,
            logits_to_keep=objective.keep or 0,
            **{cache_kwarg(lm.model): cache},
        )
    value = objective(out.logits, input_ids)[0]
    plain = all(hasattr(entry, "keys") and not getattr(entry, "is_sliding", False) for entry in cache.layers)
    found = state.latents[0]
    codes = Codes(
        rows=found.index[:, 1],
        latents=found.index[:, 2],
        values=found.values,
        n_rows=input_ids.shape[1],
        d_sae=sae.cfg.d_sae,
    )
    kv = keys_values(cache) if plain else None
    return CleanPass(prefix=prefix, kv=kv, codes=codes, valid=state.valid[0][0], value=value)


def first_columns(clean: CleanPass, latents: torch.Tensor, *, keep: int | None) -> torch.Tensor:
    """``[len(latents)]`` first column each ablated pass must run: ``min(f_c, T - keep)`` (0 without a plain cache).

    A latent not active in the clean pass starts at ``T - keep`` (its ablation changes nothing).
    """
    width = clean.codes.n_rows
    last = width - keep if keep else 0
    device = clean.codes.latents.device
    if clean.kv is None or last <= 0:
        return torch.zeros(len(latents), dtype=torch.long, device=device)
    first = torch.full((clean.codes.d_sae,), last, dtype=torch.long, device=device)
    first = first.scatter_reduce(0, clean.codes.latents, clean.codes.rows, reduce="amin")
    return first[latents.to(device)]


@torch.no_grad()
def _ablated(
    lm: LoadedModel,
    sae: SAE,
    clean: CleanPass,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    objective: Objective,
    latents: torch.Tensor,
    start: int,
    *,
    mode: Mode,
) -> torch.Tensor:
    """``[m]`` ``Y`` with ``latents[i]`` zeroed in row ``i`` (``-1``: none), columns ``start..`` on the clean cache."""
    m = len(latents)
    residual = ablated_residuals(sae, clean, latents, start, mode=mode)
    prefix = replace(clean.prefix.expand(m).columns(start), residual=residual)
    mask = attention_mask.expand(m, -1)
    cache: Any = None
    if start > 0 and clean.kv is not None:
        held = [(k[..., :start, :].expand(m, -1, -1, -1), v[..., :start, :].expand(m, -1, -1, -1)) for k, v in clean.kv]
        cache = cache_holding(lm.model, held)
    with replay_prefix(lm, prefix):
        out = lm.model(
            input_ids=prefix.input_ids,
            attention_mask=mask,
            position_ids=position_ids(mask)[:, start:],
            use_cache=cache is not None,
            logits_to_keep=objective.keep or 0,
            **({cache_kwarg(lm.model): cache} if cache is not None else {}),
        )
    result: torch.Tensor = objective(out.logits, input_ids.expand(m, -1))
    return result


def ablated_residuals(sae: SAE, clean: CleanPass, latents: torch.Tensor, start: int, *, mode: Mode) -> torch.Tensor:
    """``[m, T - start, d_model]``: the spliced block output from column ``start``, row ``i`` without ``latents[i]``.

    The splice's arithmetic (:class:`gradsae.splice.Splice`) on the clean codes:
    ``replace`` decodes the codes without the latent's entries; ``error`` adds
    ``-H[n, c] W_dec[c]`` to ``Z`` on the columns where ``c`` was active.
    """
    z = clean.prefix.residual[0, start:]
    home, device = z.device, sae.W_dec.device
    width, d_model = z.shape
    m = len(latents)
    codes = clean.codes
    inside = codes.rows >= start
    rows, lats, values = codes.rows[inside] - start, codes.latents[inside], codes.values[inside]
    copy = torch.arange(m, device=device).repeat_interleave(len(rows))
    rows, lats, values = rows.repeat(m) + copy * width, lats.repeat(m), values.repeat(m)
    dropped = lats == latents.to(device)[copy]
    flat = z.to(device).repeat(m, 1)
    if mode == "replace":
        kept = Codes(
            rows=rows[~dropped], latents=lats[~dropped], values=values[~dropped], n_rows=m * width, d_sae=codes.d_sae
        )
        valid = clean.valid[start:].to(device).repeat(m)
        out = torch.where(valid[:, None], sparse.decode(sae, kept).to(z.dtype), flat)
    else:
        change = Codes(
            rows=rows[dropped], latents=lats[dropped], values=-values[dropped], n_rows=m * width, d_sae=codes.d_sae
        )
        touched = sparse.touched_rows(change)
        wide = torch.promote_types(flat.dtype, sae.W_dec.dtype)
        moved = (flat.to(wide) + sparse.decode(sae, change, bias=False)).to(flat.dtype)
        out = torch.where(touched[:, None], moved, flat)
    return out.view(m, width, d_model).to(home)
