"""``oracle_cost`` (issue 21): one exact single-latent ablation / one plain forward of the same prompt.

The oracle is the curves' one (:func:`gradsae.oracle.ablation_effects`): every
latent active in the prompt zeroed at every spliced position, ``p(y*)`` read at
the last position with ``y*`` pinned to the clean greedy token. Its time covers
everything it runs for a prompt (blocks ``0..l`` once, the clean pass that fills
the cache, the batched ablated passes), divided by the number of active latents
``a``::

    oracle_cost = sum_prompts t_oracle / sum_prompts (a * t_forward)

The floor ``t_forward`` is the plain model's uncached forward over the same
prompt (batch 1, no splice, logits at the last position only), timed beside it.
Target <= 0.5. The prompts are the facts task's (the curves of the issue's real
cell), each to its answer step (the prompt itself: the task has no answer marker).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch

from benchmarks.common import Figure, compare

if TYPE_CHECKING:
    from gradsae.models import LoadedModel
    from gradsae.sae import SAE
    from gradsae.splice import Mode

ORACLE_TARGET = 0.5
"""Upper bound for ``oracle_cost`` (issue 21)."""


def facts_prompts(lm: LoadedModel, n: int) -> list[torch.Tensor]:
    """``n`` prompts of the facts task as ``[1, pos]`` ids (the curves' inputs at the answer step)."""
    from gradsae.tasks import load_task

    task = load_task("facts", n=n, seed=0)
    texts = [task.render(example, lm.tokenizer) for example in task.examples]
    return [torch.tensor([lm.tokenizer(t)["input_ids"]], device=lm.device) for t in texts]


def plain_forward(lm: LoadedModel, ids: torch.Tensor) -> None:
    """The floor: the model alone, uncached, logits at the last position only."""
    with torch.no_grad():
        lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=1)


def oracle_cost(
    lm: LoadedModel,
    sae: SAE,
    prompts: Sequence[torch.Tensor],
    layer: int,
    *,
    repeats: int,
    slow_repeats: int,
    mode: Mode = "error",
    batch_size: int = 32,
) -> Figure:
    """``oracle_cost`` over ``prompts`` (each ``[1, pos]``); see the module docstring."""
    timed = [_prompt_times(lm, sae, ids, layer, mode, batch_size, repeats, slow_repeats) for ids in prompts]
    actives = [a for _, _, a in timed]
    t_oracle = sum(t for t, _, _ in timed)
    floor_s = sum(f * a for _, f, a in timed) / max(1, sum(actives))
    per_latent = t_oracle / max(1, sum(actives))
    lengths = [ids.shape[1] for ids in prompts]
    detail = (
        f"{per_latent * 1e3:.2f} ms per latent ({t_oracle:.2f} s for {sum(actives)} latents, {len(prompts)} prompts "
        f"of {lengths} tokens, layer {layer}, {mode} mode, batch {batch_size}); "
        f"floor: one plain forward {floor_s * 1e3:.2f} ms"
    )
    return Figure(
        name="oracle_cost",
        value=per_latent / floor_s if floor_s > 0 else None,
        target=ORACLE_TARGET,
        detail=detail,
        extra={
            "floor": "plain forward of the same prompt",
            "floor_s": floor_s,
            "per_latent_s": per_latent,
            "oracle_s": t_oracle,
            "active_latents": actives,
            "prompt_tokens": lengths,
            "layer": layer,
            "mode": mode,
            "batch_size": batch_size,
        },
    )


def _prompt_times(
    lm: LoadedModel,
    sae: SAE,
    ids: torch.Tensor,
    layer: int,
    mode: Mode,
    batch_size: int,
    repeats: int,
    slow_repeats: int,
) -> tuple[float, float, int]:
    """Median seconds of the oracle over every active latent and of one plain forward, and the latent count."""
    from gradsae import oracle
    from gradsae.experiments.curves import greedy_token, pinned_token_prob
    from gradsae.splice import splice

    mask = torch.ones_like(ids)
    objective = pinned_token_prob(greedy_token(lm, sae, ids, mask, layer=layer, mode=mode))
    with splice(lm, sae, layer, mode=mode) as sp, torch.no_grad():
        lm.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    latents = torch.unique(sp.latents[0].index[:, 2])
    run = partial(
        oracle.ablation_effects, lm, sae, ids, mask, objective, latents, layer=layer, mode=mode, batch_size=batch_size
    )
    times = compare(
        {"oracle": run, "forward": partial(plain_forward, lm, ids)}, {"oracle": slow_repeats, "forward": repeats}
    )
    return times["oracle"].median, times["forward"].median, len(latents)
