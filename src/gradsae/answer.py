"""GradSAE at the answer step of a greedy generation, from the generation's own passes.

The paper's objective is ``Y_i = p(y*_i)`` at step ``t_i`` of row ``i``'s greedy
decoding (the step whose token opens the answer): a function of the prompt and the
first ``t_i`` generated tokens. Decoding and then scoring prompt + prefix costs the
decode, one more forward over the whole sequence, and a backward. Here the decoding
passes are the forward:

1. Decode under a splice with ``grad=True``: each pass ``s`` (the prompt pass, then one
   per step) hands layers ``> l`` a leaf ``R_s`` and records its latents. Grad stays
   on, so the KV cache of layers ``> l`` keeps its graph back to earlier leaves.
2. Keep every step's ``Y_t = p(argmax logits_t)`` (``[batch]``). After decoding, pick
   ``t_i = step_of(generation_i)`` and back-propagate ``sum_i Y_{t_i, i}`` once: through
   the cached keys and values, ``R_s.grad = dY/dR`` at every position of every pass
   (zero past a row's answer step, by causality).
3. Lay the passes out as :func:`gradsae.generate.answer_inputs` does (each row's prompt
   and first ``t_i`` tokens, left-padded) and score as :func:`gradsae.scores.score_latents`.

Cost: the decode's passes (recording a graph) and one backward, instead of decode +
forward + backward. Memory: the graph keeps the activations of layers ``> l`` for the
whole generation, as a forward over the full sequence would. The scores equal
``score_latents`` on ``answer_inputs`` up to rounding (cached and uncached attention
add in different orders).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gradsae.generate import Generation, generation_of, greedy_tokens, pad_id, stop_ids
from gradsae.models import LoadedModel
from gradsae.objectives import NextTokenProb
from gradsae.sae import SAE
from gradsae.scores import Aggregation, Scores, SplicedRun, scores_from_gradient, spliced_run
from gradsae.splice import Mode, SparseActs, Splice, splice


def generate_and_score(
    lm: LoadedModel,
    sae: SAE,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    step_of: Callable[[Generation], int] | None = None,
    layer: int | None = None,
    mode: Mode = "error",
    aggregation: Aggregation = "paper",
    skip_first: bool = True,
    stop: frozenset[int] | None = None,
) -> tuple[list[Generation], Scores]:
    """Greedy continuations of a left-padded batch and GradSAE scores at each row's answer step.

    ``step_of(generation)``: the step whose greedy token is the objective (default 0,
    the prompt pass; clipped to the tokens generated). The scores are those of
    ``score_latents(lm, sae, *answer_inputs(tokenizer, generations, steps), NextTokenProb())``.
    """
    objective, per_step, tokens = NextTokenProb(), [], []

    def keep(logits: torch.Tensor) -> None:
        per_step.append(objective(logits[:, None], input_ids))
        tokens.append(objective.token(logits[:, None]))

    stop = stop_ids(lm) if stop is None else stop
    with splice(lm, sae, layer, mode=mode, grad=True, skip_first=skip_first) as sp, torch.enable_grad():
        rows = greedy_tokens(
            lm.model,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            stop=stop,
            pad=pad_id(lm.tokenizer),
            on_step=keep,
        )
        gens = [generation_of(lm.tokenizer, input_ids[i], attention_mask[i], row, stop) for i, row in enumerate(rows)]
        steps = [min(max(0, step_of(g) if step_of else 0), len(g.token_ids) - 1) for g in gens]
        pick = (torch.as_tensor(steps, device=per_step[0].device), torch.arange(len(gens), device=per_step[0].device))
        y = torch.stack(per_step)[pick]
        y.sum().backward()
    prompt_lengths = attention_mask.sum(dim=1).tolist()
    run = answer_run(sp, prompt_lengths, steps, y.detach(), torch.stack(tokens)[pick])
    return gens, scores_from_gradient(sae, run, aggregation)


def answer_run(
    sp: Splice, prompt_lengths: Sequence[int], steps: Sequence[int], objective: torch.Tensor, token: torch.Tensor
) -> SplicedRun:
    """Step 3: the passes of a recorded, back-propagated decode as one left-padded run over each row's input.

    Pass 0 covers positions ``0..P-1`` (``P`` the prompt width), pass ``s >= 1`` position
    ``P + s - 1``; row ``i``'s input ends before ``P + t_i`` and is shifted right to end
    at the last column of width ``max_i(prompt_i + t_i)``.
    """
    width = sp.valid[0].shape[1]
    offsets = [0] + [width + s - 1 for s in range(1, len(sp.latents))]
    device = sp.valid[0].device
    valid = torch.cat(sp.valid, dim=1)
    grad = torch.cat([leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in sp.leaves], dim=1)
    end = width + torch.as_tensor(steps, device=device)
    out_width = max(n + t for n, t in zip(prompt_lengths, steps, strict=True))
    shift = out_width - end
    source = torch.arange(out_width, device=device)[None, :] - shift[:, None]
    inside = (source >= 0) & (source < end[:, None])
    source = source.clamp(0, valid.shape[1] - 1)
    new_valid = valid.gather(1, source) & inside
    new_grad = grad.gather(1, source[..., None].expand(-1, -1, grad.shape[-1])) * inside[..., None]
    index = torch.cat(
        [a.index + torch.tensor([0, off, 0], device=device) for a, off in zip(sp.latents, offsets, strict=True)]
    )
    values = torch.cat([a.values for a in sp.latents])
    kept = index[:, 1] < end[index[:, 0]]
    index, values = index[kept], values[kept]
    index[:, 1] += shift[index[:, 0]]
    d_sae = sp.latents[0].shape[2]
    order = ((index[:, 0] * out_width + index[:, 1]) * d_sae + index[:, 2]).argsort()
    latents = SparseActs(index=index[order], values=values[order], shape=(len(steps), out_width, d_sae))
    return spliced_run(latents, new_valid, objective, new_grad, token)
