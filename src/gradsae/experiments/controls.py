"""Two more activation rankings, controls for "is activation a straw man?".

The paper's activation ranking scores a latent by its mean activation over the spliced positions,
``A_c = (1/|P|) sum_{n in P} H[n, c]``. Few-shot prompts carry a massive-activation token near the
start whose latents can dominate that mean. Two variants take it out:

* ``activation_answer``: ``H[N, c]``, the activation at the answer position only (the last input
  position, whose output is the answer token ``Y`` reads);
* ``activation_nosink``: the mean over the sink-free spliced positions
  ``P' = {n in P : ||r_n|| < f median_{m in P} ||r_m||}`` (``r_n`` the residual after block ``l``,
  ``f = 10``): ``A'_c = (1/|P'|) sum_{n in P'} H[n, c]``.

Each is a :class:`~gradsae.scores.Scores` like the activation one (same activations, same donor values),
with only the per-latent score replaced, so every experiment ranks, masks and steers with it unchanged.
"""

from __future__ import annotations

import dataclasses

import torch

from gradsae.scores import Scores

ANSWER = "activation_answer"
NOSINK = "activation_nosink"
CONTROLS = (ANSWER, NOSINK)
SINK_FACTOR = 10.0
"""A position whose residual norm is at least this many times the row's median is a sink."""


def spliced_positions(mask: torch.Tensor, *, skip_first: bool) -> torch.Tensor:
    """``[batch, pos]`` bool: real tokens, less each row's first real token when ``skip_first``."""
    valid = mask.bool()
    if skip_first:
        first = valid.int().argmax(dim=1)
        valid = valid.clone()
        valid[torch.arange(valid.shape[0]), first] = False
    return valid


def sink_free(residual: torch.Tensor, valid: torch.Tensor, *, factor: float = SINK_FACTOR) -> torch.Tensor:
    """``[batch, pos]`` bool: the ``valid`` positions whose residual norm is below ``factor`` x the row's median."""
    norms = residual.to(torch.promote_types(residual.dtype, torch.float32)).norm(dim=-1)
    keep = torch.zeros_like(valid)
    for row in range(valid.shape[0]):
        if valid[row].any():
            median = norms[row, valid[row]].median()
            keep[row] = valid[row] & (norms[row] < factor * median)
    return keep


def mean_over(activation: Scores, keep: torch.Tensor) -> torch.Tensor:
    """``[batch, d_sae]``: each latent's activation averaged over the ``keep`` positions of its row."""
    index, values = activation.token_index, activation.token_score
    chosen = keep[index[:, 0], index[:, 1]]
    total = torch.zeros_like(activation.mean_act, dtype=torch.float64)
    total.index_put_((index[chosen, 0], index[chosen, 2]), values[chosen].double(), accumulate=True)
    count = keep.sum(dim=1, keepdim=True).clamp(min=1)
    return (total / count).to(activation.mean_act.dtype)


def control_scores(
    activation: Scores,
    name: str,
    *,
    residual: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    skip_first: bool = True,
    factor: float = SINK_FACTOR,
) -> Scores:
    """The ``name`` control built from the ``activation`` scores (``residual`` and ``mask`` for ``NOSINK``)."""
    if name == ANSWER:
        per_latent = activation.last_act
    elif name == NOSINK:
        if residual is None or mask is None:
            raise ValueError("the sink-excluded ranking needs the residual and the attention mask")
        keep = sink_free(residual, spliced_positions(mask, skip_first=skip_first), factor=factor)
        per_latent = mean_over(activation, keep)
    else:
        raise ValueError(f"unknown control {name!r}: use {', '.join(CONTROLS)}")
    return dataclasses.replace(activation, method=name, per_latent=per_latent)
