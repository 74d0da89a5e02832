"""Every layer in one backward: score the latents of SAEs at several layers from one forward and one backward.

SAEs at layers ``l_1 < ... < l_m``, each on its block's output, all in error mode.
In ONE forward, at each ``l`` the block output ``Z_l`` is encoded without a graph
(the latents ``H_l`` are recorded, sparse, at the spliced positions) and the block
hands on ``Z_l + delta_l`` with ``delta_l = 0`` a leaf: the model's values are
exactly the unspliced model's, and ``dY/d delta_l = dY/dR_l`` is the gradient that
a single-layer score takes at its leaf ``R_l`` (the gradient to earlier layers flows
through ``Z_l`` as in the model, never through an SAE's reconstruction; each
layer's error node is, in effect, the whole residual, detached from nothing). One
backward of ``sum(Y)`` fills every ``delta_l.grad``; then, per layer, GradSAE's
steps 3-4 (:func:`gradsae.scores.scores_from_gradient`). Ranking across layers
orders the ``(layer, latent)`` pairs by their score.

Cost: one forward, each layer's encoder on its positions, and one backward from
the output down to ``l_1`` (a single-layer score at ``l_1`` pays the same backward).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from gradsae.errors import GradSAEError
from gradsae.models import LoadedModel, block_output, position_ids, with_block_output
from gradsae.objectives import NextTokenProb, Objective
from gradsae.sae import SAE, check_compatible
from gradsae.scores import Scores, scores_from_gradient, spliced_run
from gradsae.splice import Splice


def score_layers(
    lm: LoadedModel,
    saes: Mapping[int, SAE],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    objective: Objective,
    *,
    aggregation: str = "paper",
    skip_first: bool = True,
) -> dict[int, Scores]:
    """Layer -> GradSAE :class:`Scores` of its SAE, all from one forward and one backward (module docstring)."""
    if not saes:
        raise GradSAEError("no SAE to score: pass at least one layer")
    states = {}
    for layer, sae in saes.items():
        check_compatible(sae, d_model=lm.d_model, n_layers=lm.n_layers, layer=layer)
        if sae.cfg.hook_point != "resid_post":
            raise GradSAEError(f"the SAE at layer {layer} reads resid_pre: scoring layers together needs resid_post")
        states[layer] = Splice(sae=sae, layer=layer, mode="error", record=True, skip_first=skip_first)
        states[layer].attention_mask = attention_mask
    deltas: dict[int, torch.Tensor] = {}
    with ExitStack() as stack, torch.enable_grad():
        for layer in saes:
            stack.callback(lm.layers[layer].register_forward_hook(_recorder(states[layer], deltas)).remove)
        logits = lm.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
            logits_to_keep=objective.keep or 0,
        ).logits
        y = objective(logits, input_ids)
        y.sum().backward()
    token = objective.token(logits) if isinstance(objective, NextTokenProb) else None
    out = {}
    for layer, state in states.items():
        grad = deltas[layer].grad
        if grad is None:
            raise GradSAEError(f"the objective does not depend on layer {layer}: drop that layer")
        run = spliced_run(state.latents[0], state.valid[0], y.detach(), grad, token)
        out[layer] = scores_from_gradient(state.sae, run, aggregation)
    return out


def _recorder(state: Splice, deltas: dict[int, torch.Tensor]) -> Any:
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        z = block_output(output)
        with torch.no_grad():
            state.transform(z.detach())  # records the latents; error mode without edits: Z' = Z
        deltas[state.layer] = torch.zeros_like(z, requires_grad=True)
        return with_block_output(output, z + deltas[state.layer])

    return hook


def rank_across_layers(by_layer: Mapping[int, Scores], row: int = 0) -> list[tuple[int, int, float]]:
    """``(layer, latent, score)`` for every positive score of ``row`` at every layer, best first."""
    found = [
        (layer, int(latent), float(scores.per_latent[row, latent]))
        for layer, scores in by_layer.items()
        for latent in scores.ranking(row).tolist()
    ]
    return sorted(found, key=lambda item: (-item[2], item[0], item[1]))
