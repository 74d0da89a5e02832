"""Sparse latent codes: encode, edit and decode without a dense ``[tokens, d_sae]`` tensor.

A :class:`Codes` holds the non-zero latents of ``n`` token rows as entries
``(row, latent, value)`` sorted by ``key = row * d_sae + latent`` (row-major, the
order ``torch.nonzero`` lists a dense tensor in).

Encode (:func:`encode`), ``T`` token rows and a block ``B`` of latents at a time::

    pre[:, B] = (x - b_dec * apply_b_dec_to_input) @ W_enc[:, B] + b_enc[B]     [T, |B|]
    relu, jumprelu:  the non-zero entries of sigma(pre[:, B])
    topk:            best = topk(best ++ topk(pre[:, B], k), k) over the blocks; then relu

``T * |B| <= budget`` pre-activations exist at once, and each column block of
``W_enc`` is read once per ``T`` rows. The encoder matmul itself stays dense: it
costs ``2 d_in d_sae`` flops per token whatever the sparsity; what goes is the
dense activation tensor, the scan for its non-zeros, and the dense decode.

Edits (:func:`edit`) act on entries. For latents ``C_t`` (padding ``-1`` ignored)
with values ``v`` at token rows ``t``::

    zero:  drop (t, c) for c in C_t
    set:   drop them, then insert (t, c, v_c) for every c in C_t (inactive latents included)
    add:   (t, c, h) -> (t, c, h + v_c), inserting (t, c, v_c) where c was inactive

Decode (:func:`decode`): ``x^[t] = b_dec + sum_{(t, c, v)} v W_dec[c]``, one
``embedding_bag`` bag per row. The error splice decodes only the change
``D = H' - H`` (:func:`difference`: exact zeros dropped), ``Z' = Z + sum_D v W_dec[c]``
on the rows ``D`` touches; every other row keeps ``Z`` bit for bit.

Nothing here is differentiable by design: the splice uses these paths when no
autograd graph runs through it (inference, or the leaf of a GradSAE backward).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

from gradsae.sae import SAE

BUDGET = 1 << 23
"""Pre-activations computed at once (``T x |B|``; 32 MiB in float32)."""
MIN_BLOCK = 16384
"""Latent block width that token chunks are sized for (wide SAEs are read in blocks of at least this)."""


@dataclass(frozen=True)
class Codes:
    """Non-zero latents of ``n_rows`` token rows, sorted by ``(row, latent)``."""

    rows: torch.Tensor
    """``[nnz]`` token row of each entry."""
    latents: torch.Tensor
    """``[nnz]`` latent of each entry."""
    values: torch.Tensor
    """``[nnz]`` value of each entry (SAE dtype)."""
    n_rows: int
    d_sae: int

    @property
    def keys(self) -> torch.Tensor:
        """``[nnz]`` ``row * d_sae + latent`` (ascending)."""
        return self.rows * self.d_sae + self.latents

    def select(self, keep: torch.Tensor) -> Codes:
        """The entries where ``keep`` (``[nnz]`` bool) holds."""
        return replace(self, rows=self.rows[keep], latents=self.latents[keep], values=self.values[keep])

    def nonzero(self) -> Codes:
        """Without entries equal to zero (what ``torch.nonzero`` of the dense tensor keeps)."""
        return self.select(self.values != 0)

    def at_rows(self, rows: torch.Tensor, n_rows: int) -> Codes:
        """Codes of a subset of rows (``rows[i]`` is row ``i``'s place) placed among ``n_rows`` rows."""
        return replace(self, rows=rows[self.rows], n_rows=n_rows)

    def to_dense(self) -> torch.Tensor:
        """``[n_rows, d_sae]``."""
        dense = torch.zeros(self.n_rows, self.d_sae, dtype=self.values.dtype, device=self.values.device)
        dense[self.rows, self.latents] = self.values
        return dense

    @classmethod
    def from_keys(cls, keys: torch.Tensor, values: torch.Tensor, n_rows: int, d_sae: int) -> Codes:
        return cls(rows=keys // d_sae, latents=keys % d_sae, values=values, n_rows=n_rows, d_sae=d_sae)


# -- encode -------------------------------------------------------------------------
def encode(sae: SAE, x: torch.Tensor, *, budget: int = BUDGET) -> Codes:
    """Codes of ``x`` (``[n, d_in]``), ``budget`` pre-activations at a time; see the module docstring."""
    n, d_sae = x.shape[0], sae.cfg.d_sae
    chunk = max(1, min(n, budget // min(d_sae, MIN_BLOCK)))
    block = max(1, budget // chunk)
    parts = [_encode_rows(sae, x[first : first + chunk], block) for first in range(0, n, chunk)]
    if not parts:
        return _empty(0, d_sae, sae.W_enc)
    rows = torch.cat([p.rows + first for p, first in zip(parts, range(0, n, chunk), strict=True)])
    latents = torch.cat([p.latents for p in parts])
    values = torch.cat([p.values for p in parts])
    return Codes(rows=rows, latents=latents, values=values, n_rows=n, d_sae=d_sae)


def _encode_rows(sae: SAE, x: torch.Tensor, block: int) -> Codes:
    if sae.cfg.activation == "topk":
        return _encode_topk(sae, x, block)
    d_sae, parts = sae.cfg.d_sae, []
    for start in range(0, d_sae, block):
        latents = slice(start, min(d_sae, start + block))
        h = sae.activate(sae.pre_acts(x, latents), latents)
        rows, cols = torch.nonzero(h, as_tuple=True)
        parts.append((rows * d_sae + cols + start, h[rows, cols]))
    keys, values = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if len(parts) > 1:
        keys, order = keys.sort()
        values = values[order]
    return Codes.from_keys(keys, values, x.shape[0], d_sae)


def _encode_topk(sae: SAE, x: torch.Tensor, block: int) -> Codes:
    """Running top-``k`` over latent blocks, then ``relu``; entries sorted by latent within each row.

    After the first block only pre-activations above each row's current ``k``-th
    value can enter: a comparison finds them (few, and fewer with every block) and
    only they are merged, instead of a top-``k`` over every block.
    """
    d_sae, k = sae.cfg.d_sae, int(sae.cfg.k or 0)
    best_v, best_i = sae.pre_acts(x, slice(0, min(d_sae, block))).topk(min(k, block), dim=-1, sorted=False)
    for start in range(block, d_sae, block):
        pre = sae.pre_acts(x, slice(start, min(d_sae, start + block)))
        if best_v.shape[-1] < k:  # fewer than k seen so far (blocks narrower than k)
            v, i = pre.topk(min(k, pre.shape[-1]), dim=-1, sorted=False)
            best_v, best_i = _merge(best_v, best_i, v, i + start, k)
            continue
        rows, cols = torch.nonzero(pre > best_v.min(dim=-1, keepdim=True).values, as_tuple=True)
        if len(rows):
            v, i = _padded(rows, cols + start, pre[rows, cols], x.shape[0], best_v)
            best_v, best_i = _merge(best_v, best_i, v, i, k)
    latents, order = best_i.sort(dim=-1)
    values = torch.relu(best_v.gather(-1, order))
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(latents)
    keep = values > 0
    return Codes(rows=rows[keep], latents=latents[keep], values=values[keep], n_rows=x.shape[0], d_sae=d_sae)


def _merge(
    best_v: torch.Tensor, best_i: torch.Tensor, v: torch.Tensor, i: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` of two ``[n, *]`` sets of (value, latent) per row."""
    values = torch.cat([best_v, v], dim=-1)
    top, pick = values.topk(min(k, values.shape[-1]), dim=-1, sorted=False)
    return top, torch.cat([best_i, i], dim=-1).gather(-1, pick)


def _padded(
    rows: torch.Tensor, latents: torch.Tensor, values: torch.Tensor, n: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries (row-major) as ``[n, m]`` values and latents per row, padded with ``-inf``."""
    counts = torch.bincount(rows, minlength=n)
    column = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    width = int(counts.max())
    out_v = torch.full((n, width), -torch.inf, dtype=like.dtype, device=like.device)
    out_i = torch.zeros((n, width), dtype=torch.long, device=like.device)
    out_v[rows, column], out_i[rows, column] = values, latents
    return out_v, out_i


def _empty(n_rows: int, d_sae: int, like: torch.Tensor) -> Codes:
    index = torch.zeros(0, dtype=torch.long, device=like.device)
    return Codes(index, index, torch.zeros(0, dtype=like.dtype, device=like.device), n_rows, d_sae)


# -- edit ---------------------------------------------------------------------------
def edit(codes: Codes, op: str, tokens: torch.Tensor, latents: torch.Tensor, values: torch.Tensor) -> Codes:
    """Apply ``op`` (``zero``, ``set``, ``add``) at token rows ``tokens`` (``[t]``, ascending).

    ``latents`` and ``values`` are ``[t, m]``: each token's latents (ascending, no
    repeats, ``-1`` padding) and their values.
    """
    used = latents >= 0
    e_keys = (tokens[:, None] * codes.d_sae + latents)[used]
    e_values = values[used].to(codes.values.dtype)
    keys = codes.keys
    if op == "zero":
        return codes.select(~torch.isin(keys, e_keys))
    if op == "set":
        kept = ~torch.isin(keys, e_keys)
        merged, order = torch.cat([keys[kept], e_keys]).sort()
        return Codes.from_keys(merged, torch.cat([codes.values[kept], e_values])[order], codes.n_rows, codes.d_sae)
    return _summed(torch.cat([keys, e_keys]), torch.cat([codes.values, e_values]), codes)


def difference(after: Codes, before: Codes) -> Codes:
    """``after - before`` entry by entry, exact zeros dropped."""
    keys = torch.cat([after.keys, before.keys])
    return _summed(keys, torch.cat([after.values, -before.values]), after).nonzero()


def _summed(keys: torch.Tensor, values: torch.Tensor, like: Codes) -> Codes:
    """Entries with equal keys added (in the order given), sorted by key."""
    keys, order = keys.sort(stable=True)
    unique, inverse = torch.unique_consecutive(keys, return_inverse=True)
    total = torch.zeros(len(unique), dtype=values.dtype, device=values.device).index_add_(0, inverse, values[order])
    return Codes.from_keys(unique, total, like.n_rows, like.d_sae)


# -- decode -------------------------------------------------------------------------
def decode(sae: SAE, codes: Codes, *, bias: bool = True) -> torch.Tensor:
    """``[n_rows, d_in]``: ``b_dec + sum v W_dec[c]`` per row (without ``b_dec`` if not ``bias``)."""
    w_dec = sae.W_dec.detach()
    counts = torch.bincount(codes.rows, minlength=codes.n_rows)
    offsets = counts.cumsum(0) - counts
    out = F.embedding_bag(codes.latents, w_dec, offsets, mode="sum", per_sample_weights=codes.values.to(w_dec.dtype))
    return out + sae.b_dec.detach() if bias else out


def touched_rows(codes: Codes) -> torch.Tensor:
    """``[n_rows]`` bool: rows with at least one entry."""
    return torch.bincount(codes.rows, minlength=codes.n_rows) > 0
