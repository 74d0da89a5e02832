"""Splice an SAE into the residual stream after decoder block ``l``.

At every forward pass through block ``l`` (the prompt pass and each cached
generation step) the block's output ``Z`` (``[batch, pos, d_model]``) becomes::

    H      = encode(Z)                          [batch, pos, d_sae]
    H'     = edits(H)                           zero / set / add chosen latents
    replace:  Z' = decode(H')                   the paper's splice
    error:    Z' = decode(H') + sg(Z - decode(H))

``sg`` is stop-gradient. Positions that are padding, and the first real token
of each row (the attention sink: its residual norm is 10-100x the others' and
SAEs are trained without it), pass through unchanged with all latents zero
(``skip_first=False`` splices the first token too). With no edits, ``error`` mode leaves the model's output
exactly as it was while exposing the latents; ``replace`` runs the model on the
reconstruction. Hooks are removed on exit, also when the body raises.
``Splice.edits_on = False`` splices without edits until it is set again (the
newest-only decoding loop of :mod:`gradsae.generate` does so for the passes
that only fill its KV cache).

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

from gradsae.errors import GradSAEError
from gradsae.models import LoadedModel, block_output, with_block_output
from gradsae.sae import SAE, check_compatible

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
    """Encode at most this many ``token x latent`` entries at once (bounds memory for wide SAEs)."""
    edits_on: bool = True
    """Apply ``edits``; when off, passes are spliced unedited (the newest-only decoder's cache fills)."""

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
        """``Z -> Z'`` for one block output ``[batch, pos, d_model]``, in token chunks."""
        start, valid = self._positions(z)
        batch, pos, d_model = z.shape
        edits = self.edits if self.edits_on else []
        plans = [_EditPlan.build(edit, batch, pos, start, self.sae.cfg.d_sae, z) for edit in edits]
        flat_z, flat_valid = z.reshape(-1, d_model), valid.reshape(-1)
        rows = max(1, self.chunk_elements // self.sae.cfg.d_sae)
        outs, found = [], []
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.grad):
            for first in range(0, flat_z.shape[0], rows):
                part = slice(first, first + rows)
                out, edited = self._chunk(flat_z[part], flat_valid[part], plans, first, pos)
                outs.append(out)
                if self.record:
                    nz = torch.nonzero(edited.detach())
                    found.append((nz[:, 0] + first, nz[:, 1], edited.detach()[nz[:, 0], nz[:, 1]]))
            out = torch.cat(outs).reshape(z.shape)
        if self.record:
            self.latents.append(_sparse(found, batch, pos, self.sae.cfg.d_sae, z))
            self.valid.append(valid)
        if self.grad:
            out = out.detach().requires_grad_(True)
            self.leaves.append(out)
        return out

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
            out = out + (z - self.sae.decode(h)).detach()
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
) -> Iterator[Splice]:
    """Insert ``sae`` after block ``layer`` (default: the SAE's own) for the ``with`` body."""
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
    )
    handles = [
        lm.model.register_forward_pre_hook(_mask_hook(state), with_kwargs=True),
        lm.layers[layer].register_forward_hook(_hook(state)),
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


def apply_edits(h: torch.Tensor, edits: Sequence[Edit], *, offset: int = 0) -> torch.Tensor:
    """Apply ``edits`` to dense latents ``h`` (``[batch, pos, d_sae]``) of a pass starting at ``offset``."""
    batch, pos, d_sae = h.shape
    flat = h.reshape(batch * pos, d_sae)
    index = torch.arange(batch * pos, device=h.device)
    for edit in edits:
        flat = _EditPlan.build(edit, batch, pos, offset, d_sae, h).apply(flat, index // pos, index)
    return flat.reshape(batch, pos, d_sae)


def _sparse(
    found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], batch: int, pos: int, d_sae: int, like: torch.Tensor
) -> SparseActs:
    rows = torch.cat([f[0] for f in found]) if found else torch.zeros(0, dtype=torch.long, device=like.device)
    latents = torch.cat([f[1] for f in found]) if found else rows
    values = torch.cat([f[2] for f in found]) if found else torch.zeros(0, dtype=like.dtype, device=like.device)
    index = torch.stack([rows // pos, rows % pos, latents], dim=1)
    return SparseActs(index=index, values=values, shape=(batch, pos, d_sae))


def _latent_table(edit: Edit, batch: int, d_sae: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[batch, d_sae]`` choice mask and values for one edit."""
    latents = torch.as_tensor(edit.latents, dtype=torch.long, device=like.device)
    if latents.ndim == 1:
        latents = latents.expand(batch, -1)
    if latents.ndim != 2 or latents.shape[0] != batch:
        raise GradSAEError(f"edit latents must be [n] or [batch={batch}, n], got {tuple(latents.shape)}")
    if latents.numel() and int(latents.max()) >= d_sae:
        raise GradSAEError(f"latent {int(latents.max())} is out of range: the SAE has {d_sae} latents")
    values = torch.as_tensor(edit.values, dtype=like.dtype, device=like.device)
    values = values.expand(latents.shape) if values.ndim < 2 else values
    valid = latents >= 0
    index = torch.where(valid, latents, d_sae)  # padding writes to a spare column (a clamp to 0 could unset latent 0)
    chosen = torch.zeros(batch, d_sae + 1, dtype=torch.bool, device=like.device).scatter(1, index, valid)
    dense = torch.zeros(batch, d_sae + 1, dtype=like.dtype, device=like.device)
    dense = dense.scatter(1, index, torch.where(valid, values, torch.zeros_like(values)))
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
