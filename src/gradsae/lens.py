"""The one logit lens of the house: what a decoder direction pushes in the output.

For a decoder row ``d_c = W_dec[c]`` (``[d_model]``) the lens reads it through the final norm
and the unembedding ``W_U`` (``[vocab, d_model]``)::

    v_c = W_U (g * P d_c)      [vocab]

* ``g``: the final norm's per-channel gain (Gemma's RMSNorm multiplies by ``1 + weight``; a norm
  without a weight has ``g = 1``);
* ``P``: centring over channels, ``P d = d - mean(d)``, when the final norm is a LayerNorm (it
  subtracts the mean before scaling); the identity for RMSNorm.

Left out, and why: the norm's division by the residual's scale (``1 / rms(x)`` or ``1 / std(x)``)
depends on the residual, not on ``c``, and is positive, so it changes no ranking of tokens; a
LayerNorm's bias adds the same ``W_U b`` to every direction, so it says nothing about ``c``.

Users: feature cards (promoted / suppressed tokens), ``gradsae score`` (each latent's top tokens),
the logit-lens steering selector (a centred projection onto the concept's tokens) and Arad et
al.'s output score (each latent's top tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradsae.errors import GradSAEError
from gradsae.models import LoadedModel
from gradsae.sae import SAE

FINAL_NORMS = (
    "model.norm",
    "model.final_layernorm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
    "model.decoder.final_layer_norm",
    "model.language_model.norm",
)
"""Where causal LMs keep the norm before the unembedding (module paths from the ``*ForCausalLM``)."""


def final_norm(model: Any) -> tuple[nn.Module | None, str]:
    """The norm applied to the residual before the unembedding, and its module path (``None, ""`` if none)."""
    for path in FINAL_NORMS:
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.Module):
            return module, path
    return None, ""


def folded_gain(norm: nn.Module | None, d_model: int) -> tuple[torch.Tensor, bool]:
    """``(g [d_model], centre)``: the final norm's per-channel gain and whether it centres its input."""
    weight = getattr(norm, "weight", None)
    gain = torch.ones(d_model) if not isinstance(weight, torch.Tensor) else weight.detach().float().cpu()
    if norm is not None and "Gemma" in type(norm).__name__:  # Gemma's RMSNorm scales by (1 + weight)
        gain = 1.0 + gain
    return gain, isinstance(norm, nn.LayerNorm)


def lens_directions(lm: LoadedModel, sae: SAE, latents: Sequence[int] | None = None) -> tuple[torch.Tensor, str]:
    """``([n, d_model] g * P d_c, note)`` for ``latents`` (all when ``None``), float32 on the CPU; ``note`` says
    what was folded in."""
    norm, path = final_norm(lm.model)
    gain, centre = folded_gain(norm, lm.d_model)
    rows = sae.W_dec.detach().float().cpu()
    if latents is not None:
        rows = rows[torch.as_tensor(list(latents), dtype=torch.long)]
    if centre:
        rows = rows - rows.mean(dim=-1, keepdim=True)
    if norm is None:
        note = "v = W_U W_dec[c] (no final norm could be found)"
    else:
        folded = "1 + weight" if "Gemma" in type(norm).__name__ else "weight"
        centred = ", W_dec[c] centred (LayerNorm)" if centre else ""
        note = (
            f"v = W_U (g * W_dec[c]), g = the final norm's {folded} ({path}){centred}; its scale division is left out"
        )
    return rows * gain, note


def unembedding(lm: LoadedModel) -> torch.Tensor:
    """``W_U`` ``[vocab, d_model]`` (float32, CPU)."""
    head = lm.model.get_output_embeddings()
    if head is None:
        raise GradSAEError(f"{type(lm.model).__name__} has no output embedding: the logit lens needs one")
    return head.weight.detach().float().cpu()


def logit_lens(lm: LoadedModel, sae: SAE, latents: Sequence[int]) -> tuple[torch.Tensor, str]:
    """``([len(latents), vocab] v_c, note)``: the lens of each latent (module docstring)."""
    directions, note = lens_directions(lm, sae, latents)
    return directions @ unembedding(lm).T, note


def top_tokens(lm: LoadedModel, sae: SAE, latents: Sequence[int], k: int) -> torch.Tensor:
    """``[len(latents), k]`` the ``k`` tokens each latent's lens promotes most, best first."""
    return logit_lens(lm, sae, latents)[0].topk(k, dim=-1).indices
