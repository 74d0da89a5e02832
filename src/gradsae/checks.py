"""Checks of library inputs that would otherwise fail deep inside ``torch`` with a traceback.

Each check raises :class:`GradSAEError` with one line naming the problem and the
fix, before any forward pass runs:

* :func:`check_edit`: an :class:`gradsae.splice.Edit`'s latents are integer ids
  (``[n]`` or ``[batch, n]``), its values finite, its position mask ``[batch, pos]``;
* :func:`check_inputs`: token ids are a ``[batch, pos]`` integer tensor inside the
  model's vocabulary, with an attention mask of the same shape that leaves every
  row at least one real token.
"""

from __future__ import annotations

from typing import Any

import torch

from gradsae.errors import GradSAEError


def check_edit(edit: Any) -> None:
    """Refuse an edit whose latents, values or positions cannot be applied."""
    latents = _as_tensor(edit.latents, "Edit latents", "pass a list of latent ids or a [batch, n] tensor")
    if latents.is_floating_point() and not bool((latents == latents.round()).all()):
        raise GradSAEError("Edit latents must be whole latent ids, got fractions: pass integer ids")
    if latents.is_complex() or latents.dtype == torch.bool:
        raise GradSAEError(f"Edit latents must be integer latent ids, got {latents.dtype}: pass integer ids")
    if latents.ndim not in (1, 2):
        raise GradSAEError(
            f"Edit latents must be [n] or [batch, n], got shape {tuple(latents.shape)}: pass one id list per row"
        )
    values = _as_tensor(edit.values, "Edit values", "pass a number, an [n] or a [batch, n] tensor")
    if values.ndim > 2:
        raise GradSAEError(
            f"Edit values must be a scalar, [n] or [batch, n], got shape {tuple(values.shape)}: match the latents"
        )
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise GradSAEError("Edit values hold NaN or infinity: pass finite values")
    positions = edit.positions
    if isinstance(positions, torch.Tensor) and positions.ndim != 2:
        raise GradSAEError(
            f"an Edit position mask must be [batch, pos], got shape {tuple(positions.shape)}: pass one row per input"
        )


def _as_tensor(value: Any, what: str, fix: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise GradSAEError(f"{what} cannot be read as a tensor ({type(value).__name__}): {fix}") from None


def check_inputs(lm: Any, input_ids: Any, attention_mask: Any) -> None:
    """Refuse token ids or an attention mask the model cannot run."""
    fix = "pass enc['input_ids'] and enc['attention_mask'] from the tokenizer (return_tensors='pt')"
    if not isinstance(input_ids, torch.Tensor):
        raise GradSAEError(
            f"input_ids must be a [batch, pos] tensor of token ids, got {type(input_ids).__name__}: {fix}"
        )
    if input_ids.ndim != 2 or input_ids.numel() == 0:
        raise GradSAEError(
            f"input_ids must be a non-empty [batch, pos] tensor, got shape {tuple(input_ids.shape)}: "
            "add a batch dimension (ids[None]) or pass at least one token"
        )
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise GradSAEError(f"input_ids must hold integer token ids, got {input_ids.dtype}: {fix}")
    vocab = int(lm.model.get_input_embeddings().num_embeddings)
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise GradSAEError(f"token id {bad} is outside the model's vocabulary 0..{vocab - 1}: {fix}")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise GradSAEError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {shape}: {fix}")
    empty = (attention_mask != 0).sum(dim=1) == 0
    if bool(empty.any()):
        row = int(torch.nonzero(empty)[0])
        raise GradSAEError(f"row {row} of attention_mask is all padding: give every row at least one real token")
