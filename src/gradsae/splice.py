"""Splice an SAE into the residual stream at its hook point of decoder block ``l``.

The SAE's ``hook_point`` says where: ``resid_post`` is block ``l``'s output (a
forward hook on block ``l``), ``resid_pre`` its input (a forward pre-hook on block
``l`` that replaces the ``hidden_states`` argument; for ``l = 0`` that is the
embedding output). At every forward pass through block ``l`` (the prompt pass and
each cached generation step) that residual ``Z`` (``[batch, pos, d_model]``) becomes::

    H      = encode(Z)                          [batch, pos, d_sae]
    H'     = edits(H)                           zero / set / add chosen latents
    replace:  Z' = decode(H')                   the paper's splice
    error:    Z' = decode(H') + sg(Z - decode(H))
                 = sg(Z) + (decode(H') - sg(decode(H)))   (as computed)

``sg`` is stop-gradient. The SAE maths (encode, edits, decode, the error term)
runs in the SAE's dtype (float32 for a half-precision model; see
:func:`gradsae.pretrained.resolve_sae`) and ``Z'`` is cast back to the model's
dtype only at the end; the second form of the error splice makes ``Z' = Z`` bit
for bit wherever ``H' = H``. Positions that are padding, and the first real token
of each row (the attention sink: its residual norm is 10-100x the others' and
SAEs are trained without it), pass through unchanged with all latents zero
(``skip_first=False`` splices the first token too). With no edits, ``error`` mode leaves the model's output
exactly as it was while exposing the latents; ``replace`` runs the model on the
reconstruction. Hooks are removed on exit, also when the body raises.
``Splice.edits_on = False`` splices without edits until it is set again (the
newest-only decoding loop of :mod:`gradsae.generate` does so for the passes
that only fill its KV cache).

How it is computed (:mod:`gradsae.sparse`): unless an autograd graph must run
through the splice, the latents are sparse codes and never a dense
``[tokens, d_sae]`` tensor. Only the rows that are needed are encoded (every
spliced row when recording or in replace mode; in error mode without recording,
only the rows an edit touches), edits act on the entries, and the error splice
decodes only the change, ``Z' = Z + (H' - H) W_dec`` on the rows it touches: with
no edit and no recording the pass is not encoded at all (``Z' = Z``). When grad is
on without a leaf and the input or the SAE requires grad, the dense path runs
instead (``H`` in token chunks of ``chunk_elements / d_sae`` rows, decoded twice in
error mode), differentiable as the formulas above.

For gradients, the splice can hand the rest of the network a leaf tensor
``R = Z'.detach().requires_grad_()``: a backward pass from any objective then
stops at layer ``l`` and ``R.grad = d objective / d Z'``, from which every
latent's gradient is one dot product, ``d objective / d H[n, c] = W_dec[c] . R.grad[n]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from gradsae import sparse
from gradsae.checks import check_edit
from gradsae.errors import GradSAEError
from gradsae.models import LoadedModel, block_output, with_block_output
from gradsae.sae import SAE, check_compatible
from gradsae.sparse import Codes

Mode = Literal["replace", "error"]
MODES = ("replace", "error")
Op = Literal["zero", "set", "add"]
Positions = Literal["all", "last", "cumulative"] | torch.Tensor
POSITIONS = ("all", "last", "cumulative")


@dataclass(frozen=True)
class Edit:
    """Change chosen latents at chosen positions on every forward pass.

    ``latents`` is ``[n]`` (the same for every batch row) or ``[batch, n]``
    (entries ``< 0`` are padding and ignored). ``values`` is a scalar, ``[n]`` or
    ``[batch, n]``, used by ``set`` and ``add``. ``positions`` is

    * ``"all"``: every position of every forward pass;
    * ``"last"``: the last position of each forward pass. Under plain cached
      decoding that is the cumulative variant below; under
      ``generate_batch(..., newest_only=splice)`` it is the authors' variant:
      only the newest position is edited, the cache keeps unedited keys/values;
    * ``"cumulative"``: the same per pass as ``"last"``, named for what it gives
      under plain cached decoding: each token is edited when it is the newest
      (the last prompt token, then each generated one) and the edit is kept in
      the cache, so at step ``t`` every position from the last prompt token on
      carries it. ``newest_only`` decoding refuses it;
    * a boolean ``[batch, pos]`` mask over absolute positions; positions past the
      mask's end follow ``extend``.
    """

    latents: torch.Tensor | Sequence[int]
    op: Op = "zero"
    values: float | torch.Tensor = 0.0
    positions: Positions = "all"
    extend: bool = True

    def __post_init__(self) -> None:
        if self.op not in ("zero", "set", "add"):
            raise GradSAEError(f"unknown edit {self.op!r}: use zero, set or add")
        if isinstance(self.positions, str) and self.positions not in POSITIONS:
            raise GradSAEError(f"unknown positions {self.positions!r}: use 'all', 'last', 'cumulative' or a bool mask")
        check_edit(self)


@dataclass(frozen=True)
class SparseActs:
    """Latents of one forward pass, kept sparse: only the non-zero entries."""

    index: torch.Tensor
    """``[nnz, 3]`` (batch, pos, latent) of each non-zero entry, row-major order."""
    values: torch.Tensor
    """``[nnz]`` their values."""
    shape: tuple[int, int, int]
    """``(batch, pos, d_sae)``."""

    def to_dense(self) -> torch.Tensor:
        """``[batch, pos, d_sae]``."""
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        dense[self.index[:, 0], self.index[:, 1], self.index[:, 2]] = self.values
        return dense


@dataclass
class Splice:
    """Live state of a splice; returned by :func:`splice`."""

    sae: SAE
    layer: int
    mode: Mode
    edits: list[Edit] = field(default_factory=list)
    grad: bool = False
    """Hand the rest of the model a leaf so ``backward`` stops here."""
    record: bool = True
    """Keep the latents of every forward pass in ``latents``."""
    latents: list[SparseActs] = field(default_factory=list)
    """Latents ``H'`` (after edits) of each forward pass, sparse."""
    leaves: list[torch.Tensor] = field(default_factory=list)
    """The leaf ``R`` of each forward pass when ``grad`` is on."""
    skip_first: bool = True
    """Leave each row's first real token (the attention sink) unspliced."""
    valid: list[torch.Tensor] = field(default_factory=list)
    """``[batch, pos]`` spliced positions of each forward pass (not padding, not skipped)."""
    offset: int = 0
    """Absolute position of the next forward pass's first token (without an attention mask)."""
    attention_mask: torch.Tensor | None = None
    """The attention mask of the forward pass in flight (set by a model pre-hook)."""
    chunk_elements: int = 1 << 23
    """Compute at most this many ``token x latent`` pre-activations at once (bounds memory for wide SAEs)."""
    edits_on: bool = True
    """Apply ``edits``; when off, passes are spliced unedited (the newest-only decoder's cache fills)."""
    sparse: bool = True
    """Use sparse codes whenever no autograd graph runs through the splice; ``False``: always the dense path."""

    @property
    def acts(self) -> list[torch.Tensor]:
        """Dense ``[batch, pos, d_sae]`` latents of each pass (built on demand)."""
        return [latents.to_dense() for latents in self.latents]

    def reset(self) -> None:
        """Forget recorded passes; the next pass starts at position 0."""
        self.latents.clear()
        self.leaves.clear()
        self.valid.clear()
        self.offset = 0

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """``Z -> Z'`` for one block output ``[batch, pos, d_model]``.

        On the SAE's device: a residual on another device (a model spread by a
        device map, see :func:`gradsae.models.sae_device`) is moved there and back.
        """
        home = z.device
        if home != self.sae.W_dec.device:
            return self.transform(z.to(self.sae.W_dec.device)).to(home)
        start, valid = self._positions(z)
        edits = self.edits if self.edits_on else []
        if self._differentiable(z):
            out, found = self._dense(z, valid, edits, start)
        else:
            with torch.no_grad():
                out, found = self._sparse(z, valid, edits, start)
        if found is not None:
            self.latents.append(found)
            self.valid.append(valid)
        if self.grad:
            out = out.detach().requires_grad_(True)
            self.leaves.append(out)
        return out

    def _differentiable(self, z: torch.Tensor) -> bool:
        """Does autograd record through the splice (no leaf, grad on, something requiring grad)?"""
        if not self.sparse:
            return True
        if self.grad or not torch.is_grad_enabled():
            return False
        return z.requires_grad or any(p.requires_grad for p in self.sae.parameters())

    def _sparse(
        self, z: torch.Tensor, valid: torch.Tensor, edits: Sequence[Edit], start: int
    ) -> tuple[torch.Tensor, SparseActs | None]:
        """Encode only the rows needed, edit entries, decode only what changed (see :mod:`gradsae.sparse`)."""
        batch, pos, d_model = z.shape
        like = torch.empty(0, dtype=self.sae.W_dec.dtype, device=z.device)
        plans = [_SparsePlan.build(edit, batch, pos, start, self.sae.cfg.d_sae, like) for edit in edits]
        flat, flat_valid = z.reshape(-1, d_model), valid.reshape(-1)
        if self.mode == "error" and not plans and not self.record:
            return z, None  # Z' = Z exactly: nothing to encode or decode
        need = flat_valid
        if self.mode == "error" and not self.record:
            need = flat_valid & torch.stack([plan.where for plan in plans]).any(dim=0)
        rows = torch.nonzero(need).squeeze(-1)
        codes = sparse.encode(self.sae, flat[rows], budget=self.chunk_elements).at_rows(rows, len(flat))
        edited = codes
        for plan in plans:
            edited = plan.apply(edited, flat_valid)
        if self.mode == "replace":
            out = torch.where(flat_valid[:, None], sparse.decode(self.sae, edited).to(z.dtype), flat)
        else:
            out = self._add_change(flat, sparse.difference(edited, codes))
        found = _acts(edited.nonzero(), batch, pos) if self.record else None
        return out.reshape(z.shape), found

    def _add_change(self, flat: torch.Tensor, change: Codes) -> torch.Tensor:
        """``Z + sum_D v W_dec[c]`` (in the SAE's dtype or wider) on the rows ``D`` touches; ``Z`` elsewhere."""
        touched = sparse.touched_rows(change)
        if not bool(touched.any()):
            return flat
        wide = torch.promote_types(flat.dtype, self.sae.W_dec.dtype)
        moved = (flat.to(wide) + sparse.decode(self.sae, change, bias=False)).to(flat.dtype)
        return torch.where(touched[:, None], moved, flat)

    def _dense(
        self, z: torch.Tensor, valid: torch.Tensor, edits: Sequence[Edit], start: int
    ) -> tuple[torch.Tensor, SparseActs | None]:
        """The dense reference path, differentiable: ``[tokens, d_sae]`` latents in token chunks."""
        batch, pos, d_model = z.shape
        like = torch.empty(0, dtype=self.sae.W_dec.dtype, device=z.device)
        plans = [_EditPlan.build(edit, batch, pos, start, self.sae.cfg.d_sae, like) for edit in edits]
        flat_z, flat_valid = z.reshape(-1, d_model), valid.reshape(-1)
        rows = max(1, self.chunk_elements // self.sae.cfg.d_sae)
        outs, found = [], []
        for first in range(0, flat_z.shape[0], rows):
            part = slice(first, first + rows)
            out, edited = self._chunk(flat_z[part], flat_valid[part], plans, first, pos)
            outs.append(out)
            if self.record:
                nz = torch.nonzero(edited.detach())
                found.append((nz[:, 0] + first, nz[:, 1], edited.detach()[nz[:, 0], nz[:, 1]]))
        out = torch.cat(outs).reshape(z.shape)
        return out, _gathered(found, batch, pos, self.sae.cfg.d_sae, like) if self.record else None

    def _chunk(
        self, z: torch.Tensor, valid: torch.Tensor, plans: Sequence[_EditPlan], first: int, pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``first..`` of the flattened ``[batch * pos, d_model]`` block output."""
        keep = valid[:, None]
        h = self.sae.encode(z) * keep
        edited = h
        if plans:
            index = torch.arange(first, first + z.shape[0], device=z.device)
            for plan in plans:
                edited = plan.apply(edited, index // pos, index)
            edited = edited * keep
        out = self.sae.decode(edited)
        if self.mode == "error":
            wide = torch.promote_types(z.dtype, out.dtype)
            out = z.detach().to(wide) + (out - self.sae.decode(h).detach())
        return torch.where(keep, out.to(z.dtype), z), edited

    def _positions(self, z: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Absolute start of this pass and its ``[batch, pos]`` spliced positions."""
        batch, pos = z.shape[:2]
        mask = self.attention_mask
        if mask is None or mask.ndim != 2 or mask.shape[1] < pos:
            start = self.offset
            self.offset += pos
            valid = torch.ones(batch, pos, dtype=torch.bool, device=z.device)
            if self.skip_first and start == 0:
                valid[:, 0] = False
            return start, valid
        mask = mask.to(z.device).bool()
        start = mask.shape[1] - pos
        valid = mask[:, start:].clone()
        if self.skip_first:
            first = mask.int().argmax(dim=1)
            columns = torch.arange(start, mask.shape[1], device=z.device)
            valid &= columns[None, :] != first[:, None]
        return start, valid


@contextmanager
def splice(
    lm: LoadedModel,
    sae: SAE,
    layer: int | None = None,
    *,
    mode: Mode = "error",
    edits: Sequence[Edit] = (),
    grad: bool = False,
    record: bool = True,
    skip_first: bool = True,
    chunk_elements: int = 1 << 23,
    sparse: bool = True,
) -> Iterator[Splice]:
    """Insert ``sae`` at its hook point of block ``layer`` (default: the SAE's own) for the ``with`` body.

    ``sparse=False`` forces the dense reference path (the tests compare the two).
    """
    layer = resolve_layer(sae, layer)
    check_compatible(sae, d_model=lm.d_model, n_layers=lm.n_layers, layer=layer)
    if mode not in MODES:
        raise GradSAEError(f"unknown splice mode {mode!r}: use 'replace' or 'error'")
    state = Splice(
        sae=sae,
        layer=layer,
        mode=mode,
        edits=list(edits),
        grad=grad,
        record=record,
        skip_first=skip_first,
        chunk_elements=chunk_elements,
        sparse=sparse,
    )
    block = lm.layers[layer]
    handles = [
        lm.model.register_forward_pre_hook(_mask_hook(state), with_kwargs=True),
        block.register_forward_pre_hook(_pre_hook(state), with_kwargs=True)
        if sae.cfg.hook_point == "resid_pre"
        else block.register_forward_hook(_hook(state)),
    ]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


def resolve_layer(sae: SAE, layer: int | None) -> int:
    """The layer to splice at: the one given, else the SAE's ``hook_layer``."""
    if layer is None:
        layer = sae.cfg.hook_layer
    if layer is None:
        raise GradSAEError("this SAE does not say its layer: pass --layer / layer=")
    return int(layer)


def _mask_hook(state: Splice) -> Any:
    def hook(_module: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        state.attention_mask = kwargs.get("attention_mask")

    return hook


def _hook(state: Splice) -> Any:
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        return with_block_output(output, state.transform(block_output(output)))

    return hook


def _pre_hook(state: Splice) -> Any:
    """``resid_pre``: replace the block's ``hidden_states`` input (positional, or by keyword)."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        _refuse_replayed(module, state.layer)
        if args:
            return (state.transform(args[0]), *args[1:]), kwargs
        if "hidden_states" not in kwargs:
            raise GradSAEError(f"block {state.layer} was called without hidden_states: this model is not supported")
        return args, {**kwargs, "hidden_states": state.transform(kwargs["hidden_states"])}

    return hook


def _refuse_replayed(block: nn.Module, layer: int) -> None:
    """A replayed prefix (:mod:`gradsae.prefix`) returns block ``layer``'s stored output, ignoring its input."""
    forward = vars(block).get("forward")
    if forward is not None and "_replaying" in getattr(forward, "__qualname__", ""):
        raise GradSAEError(
            f"a resid_pre SAE at layer {layer} changes the input of block {layer}, which a prefix cached "
            f"through block {layer} skips: cache the prefix through block {layer - 1} only (none for layer 0)"
        )


# -- edits --------------------------------------------------------------------
@dataclass(frozen=True)
class _EditPlan:
    """One edit resolved for a pass: which latents per row, their values, and where."""

    op: str
    chosen: torch.Tensor
    """``[batch, d_sae]`` bool."""
    values: torch.Tensor
    """``[batch, d_sae]``."""
    where: torch.Tensor
    """``[batch * pos]`` bool: flattened positions the edit touches."""

    @classmethod
    def build(cls, edit: Edit, batch: int, pos: int, offset: int, d_sae: int, like: torch.Tensor) -> _EditPlan:
        chosen, values = _latent_table(edit, batch, d_sae, like)
        where = _position_mask(edit, batch, pos, offset, like.device).reshape(-1)
        return cls(op=edit.op, chosen=chosen, values=values, where=where)

    def apply(self, h: torch.Tensor, rows: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Edit ``h`` (``[n, d_sae]``) whose rows are batch rows ``rows``, flat positions ``flat``."""
        sel = self.chosen[rows] & self.where[flat][:, None]
        if self.op == "zero":
            return h.masked_fill(sel, 0.0)
        if self.op == "set":
            return torch.where(sel, self.values[rows].to(h.dtype), h)
        return h + sel * self.values[rows].to(h.dtype)


@dataclass(frozen=True)
class _SparsePlan:
    """One edit resolved for a pass, for sparse codes: each row's latents and values, and where."""

    op: str
    latents: torch.Tensor
    """``[batch, m]`` ascending, ``-1`` padding."""
    values: torch.Tensor
    """``[batch, m]``."""
    where: torch.Tensor
    """``[batch * pos]`` bool: flattened positions the edit touches."""
    pos: int

    @classmethod
    def build(cls, edit: Edit, batch: int, pos: int, offset: int, d_sae: int, like: torch.Tensor) -> _SparsePlan:
        latents, values = _latent_lists(edit, batch, d_sae, like)
        where = _position_mask(edit, batch, pos, offset, like.device).reshape(-1)
        return cls(op=edit.op, latents=latents, values=values, where=where, pos=pos)

    def apply(self, codes: Codes, valid: torch.Tensor) -> Codes:
        """Edit ``codes`` (rows = flattened ``batch x pos``) at the valid positions it touches."""
        tokens = torch.nonzero(self.where & valid).squeeze(-1)
        rows = tokens // self.pos
        return sparse.edit(codes, self.op, tokens, self.latents[rows], self.values[rows])


def apply_edits(h: torch.Tensor, edits: Sequence[Edit], *, offset: int = 0) -> torch.Tensor:
    """Apply ``edits`` to dense latents ``h`` (``[batch, pos, d_sae]``) of a pass starting at ``offset``."""
    batch, pos, d_sae = h.shape
    flat = h.reshape(batch * pos, d_sae)
    index = torch.arange(batch * pos, device=h.device)
    for edit in edits:
        flat = _EditPlan.build(edit, batch, pos, offset, d_sae, h).apply(flat, index // pos, index)
    return flat.reshape(batch, pos, d_sae)


def _acts(codes: Codes, batch: int, pos: int) -> SparseActs:
    """A pass's codes (rows = flattened ``batch x pos``) as :class:`SparseActs`."""
    index = torch.stack([codes.rows // pos, codes.rows % pos, codes.latents], dim=1)
    return SparseActs(index=index, values=codes.values, shape=(batch, pos, codes.d_sae))


def _gathered(
    found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], batch: int, pos: int, d_sae: int, like: torch.Tensor
) -> SparseActs:
    rows = torch.cat([f[0] for f in found]) if found else torch.zeros(0, dtype=torch.long, device=like.device)
    latents = torch.cat([f[1] for f in found]) if found else rows
    values = torch.cat([f[2] for f in found]) if found else torch.zeros(0, dtype=like.dtype, device=like.device)
    index = torch.stack([rows // pos, rows % pos, latents], dim=1)
    return SparseActs(index=index, values=values, shape=(batch, pos, d_sae))


def edit_rows(edit: Edit, batch: int, d_sae: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, n]`` latents (``-1`` padding) and values of one edit, checked."""
    latents = torch.as_tensor(edit.latents, dtype=torch.long, device=like.device)
    if latents.ndim == 1:
        latents = latents.expand(batch, -1)
    if latents.ndim != 2 or latents.shape[0] != batch:
        raise GradSAEError(f"edit latents must be [n] or [batch={batch}, n], got {tuple(latents.shape)}")
    if latents.numel() and int(latents.max()) >= d_sae:
        raise GradSAEError(f"latent {int(latents.max())} is out of range: the SAE has {d_sae} latents")
    values = torch.as_tensor(edit.values, dtype=like.dtype, device=like.device)
    return latents, values.expand(latents.shape) if values.ndim < 2 else values


def _latent_lists(edit: Edit, batch: int, d_sae: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, m]`` latents per row, ascending without repeats (``-1`` padding), and their values.

    A latent listed twice in a row keeps its last value (as the dense table's scatter does).
    """
    latents, values = edit_rows(edit, batch, d_sae, like)
    used = latents >= 0
    keys = (torch.arange(batch, device=like.device)[:, None] * d_sae + latents)[used]
    keys, order = keys.sort(stable=True)
    unique, counts = torch.unique_consecutive(keys, return_counts=True)
    last = values[used][order][counts.cumsum(0) - 1]
    rows = unique // d_sae
    per_row = torch.bincount(rows, minlength=batch)
    column = torch.arange(len(unique), device=like.device) - (per_row.cumsum(0) - per_row)[rows]
    width = max(1, int(per_row.max())) if len(unique) else 1
    table = torch.full((batch, width), -1, dtype=torch.long, device=like.device)
    table[rows, column] = unique % d_sae
    table_values = torch.zeros(batch, width, dtype=like.dtype, device=like.device)
    table_values[rows, column] = last
    return table, table_values


def _latent_table(edit: Edit, batch: int, d_sae: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[batch, d_sae]`` choice mask and values for one edit.

    Padding entries (``< 0``) are scattered into a spare column ``d_sae`` that is
    then dropped, so they never collide with a real latent (latent 0 included).
    """
    latents, values = edit_rows(edit, batch, d_sae, like)
    index = torch.where(latents >= 0, latents, d_sae)  # padding writes to a spare column, dropped below
    chosen = torch.zeros(batch, d_sae + 1, dtype=torch.bool, device=like.device)
    chosen = chosen.scatter(1, index, torch.ones_like(index, dtype=torch.bool))
    dense = torch.zeros(batch, d_sae + 1, dtype=like.dtype, device=like.device).scatter(1, index, values)
    return chosen[:, :d_sae], dense[:, :d_sae]


def _position_mask(edit: Edit, batch: int, pos: int, offset: int, device: torch.device) -> torch.Tensor:
    """``[batch, pos]`` positions of this pass that the edit touches."""
    if isinstance(edit.positions, str):
        mask = torch.ones(batch, pos, dtype=torch.bool, device=device)
        if edit.positions in ("last", "cumulative"):
            mask[:, :-1] = False
        return mask
    given = edit.positions.to(device=device, dtype=torch.bool)
    if given.ndim != 2 or given.shape[0] != batch:
        raise GradSAEError(f"a position mask must be [batch={batch}, pos], got {tuple(given.shape)}")
    mask = torch.full((batch, pos), edit.extend, dtype=torch.bool, device=device)
    inside = max(0, min(pos, given.shape[1] - offset))
    if inside:
        mask[:, :inside] = given[:, offset : offset + inside]
    return mask
