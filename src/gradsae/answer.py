"""GradSAE at the answer step of a greedy generation, without a second forward over the prompt.

The paper's objective is ``Y_i = p(y*_i)`` at step ``t_i`` of row ``i``'s greedy
decoding (the step whose token opens the answer): a function of the prompt and the
first ``t_i`` generated tokens. Decoding and then scoring prompt + prefix costs the
decode, one more forward over prompt and prefix, and a backward. Here the decode's
own prompt pass is that forward's first part:

1. Prompt pass under a splice with ``grad=True``: block ``l`` hands the rest a leaf
   ``R_0`` (``[batch, P, d_model]``), the latents are recorded, and the autograd
   graph of blocks ``> l`` is kept, their keys and values included.
2. Greedy decoding from there without grad (a detached copy of the cache; the
   splice neither records nor makes leaves): the tokens are those of plain decoding.
3. Pick ``t_i = step_of(generation_i)``. With ``S = max_i t_i > 0``, one suffix pass
   over the first ``S`` generated tokens, with grad, on the prompt pass's graph-carrying
   keys and values (leaf ``R_1``: ``[batch, S, d_model]``); logits only at the columns
   read. ``Y_i`` is read from the prompt pass (``t_i = 0``) or column ``t_i - 1`` of the
   suffix, and ``sum_i Y_i`` is back-propagated once: ``R_0.grad`` and ``R_1.grad`` are
   ``dY/dR`` at every position (zero past a row's answer step, by causality).
4. Lay both passes out as :func:`gradsae.generate.answer_inputs` does (each row's
   prompt and first ``t_i`` tokens, left-padded) and score as
   :func:`gradsae.scores.score_latents` does.

Cost: the decode plus a forward over the ``S`` suffix tokens and one backward, instead
of the decode plus a forward over all ``P + S`` tokens and one backward. For an answer
that opens at the first token (classification), no suffix pass at all. The scores equal
``score_latents`` on ``answer_inputs`` up to rounding (a cached and an uncached pass add
in different orders).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gradsae.generate import (
    Generation,
    cache_holding,
    cached_pass,
    croppable_cache,
    generation_of,
    greedy_tokens,
    keys_values,
    pad_id,
    stop_ids,
)
from gradsae.models import LoadedModel, cache_kwarg, position_ids
from gradsae.objectives import NextTokenProb
from gradsae.sae import SAE
from gradsae.scores import Aggregation, Scores, SplicedRun, scores_from_gradient, spliced_run
from gradsae.splice import Mode, SparseActs, Splice, splice

KeysValues = list[tuple[torch.Tensor, torch.Tensor]]


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
    ``score_methods(lm, sae, *answer_inputs(tokenizer, generations, steps), NextTokenProb(), methods=("gradsae",))``.
    """
    stop = stop_ids(lm) if stop is None else stop
    ids, mask = input_ids.to(lm.device), attention_mask.to(lm.device)
    with splice(lm, sae, layer, mode=mode, grad=True, skip_first=skip_first) as sp:
        prompt_logits, kv = _prompt_pass(lm, ids, mask)
        sp.grad, sp.record = False, False
        with torch.no_grad():
            rows = greedy_tokens(
                lm.model,
                ids,
                mask,
                max_new_tokens=max_new_tokens,
                stop=stop,
                pad=pad_id(lm.tokenizer),
                cache=cache_holding(lm.model, [(k.detach(), v.detach()) for k, v in kv]),
                prompt_logits=prompt_logits.detach(),
            )
        gens = [generation_of(lm.tokenizer, ids[i], mask[i], row, stop) for i, row in enumerate(rows)]
        steps = [min(max(0, step_of(g) if step_of else 0), len(g.token_ids) - 1) for g in gens]
        sp.grad, sp.record = True, True
        y, token = _objective(lm, ids, mask, rows, steps, prompt_logits, kv)
        y.sum().backward()
    prompt_lengths = mask.sum(dim=1).tolist()
    return gens, scores_from_gradient(sae, answer_run(sp, prompt_lengths, steps, y.detach(), token), aggregation)


def _prompt_pass(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, KeysValues]:
    """Step 1: last-position logits ``[batch, vocab]`` and every layer's keys and values, with their graph."""
    cache = croppable_cache(lm.model)
    with torch.enable_grad():
        logits, _ = cached_pass(lm.model, ids, mask, position_ids(mask), cache)
    return logits, keys_values(cache)


def _objective(
    lm: LoadedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    rows: Sequence[Sequence[int]],
    steps: Sequence[int],
    prompt_logits: torch.Tensor,
    kv: KeysValues,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: ``Y [batch]`` at each row's answer step (with its graph) and the greedy token read."""
    objective, batch = NextTokenProb(), len(steps)
    width = max(steps)
    logits = prompt_logits[:, None]
    column = torch.zeros(batch, dtype=torch.long, device=ids.device)
    if width > 0:
        pad = pad_id(lm.tokenizer)
        suffix = torch.tensor([list(r[:width]) + [pad] * (width - len(r[:width])) for r in rows], device=ids.device)
        full = torch.cat([mask, mask.new_ones(batch, width)], dim=1)
        read = sorted({t - 1 for t in steps if t > 0})
        with torch.enable_grad():
            out = lm.model(
                input_ids=suffix,
                attention_mask=full,
                position_ids=position_ids(full)[:, -width:],
                use_cache=True,
                logits_to_keep=torch.tensor(read, device=ids.device),
                **{cache_kwarg(lm.model): cache_holding(lm.model, kv)},
            )
        logits = torch.cat([logits, out.logits], dim=1)
        where = {t: i + 1 for i, t in enumerate(read)}
        column = torch.tensor([where[t - 1] if t > 0 else 0 for t in steps], device=ids.device)
    picked = logits[torch.arange(batch, device=ids.device), column][:, None]
    with torch.enable_grad():
        return objective(picked, ids), objective.token(picked)


def answer_run(
    sp: Splice, prompt_lengths: Sequence[int], steps: Sequence[int], objective: torch.Tensor, token: torch.Tensor
) -> SplicedRun:
    """Step 4: the recorded passes (contiguous columns) as one left-padded run over each row's input.

    The passes cover columns ``0..P-1`` (the prompt) and ``P..`` (generated tokens);
    row ``i``'s input ends before ``P + t_i`` and is shifted right to end at the last
    column of width ``max_i(prompt_i + t_i)``.
    """
    device = sp.valid[0].device
    widths = [v.shape[1] for v in sp.valid]
    offsets = [sum(widths[:s]) for s in range(len(widths))]
    valid = torch.cat(sp.valid, dim=1)
    grad = torch.cat([leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in sp.leaves], dim=1)
    end = widths[0] + torch.as_tensor(steps, device=device)
    out_width = max(n + t for n, t in zip(prompt_lengths, steps, strict=True))
    shift = out_width - end
    source = torch.arange(out_width, device=device)[None, :] - shift[:, None]
    inside = (source >= 0) & (source < end[:, None])
    source = source.clamp(0, valid.shape[1] - 1)
    new_valid = valid.gather(1, source) & inside
    new_grad = grad.gather(1, source[..., None].expand(-1, -1, grad.shape[-1])) * inside[..., None]
    moved = [a.index + torch.tensor([0, off, 0], device=device) for a, off in zip(sp.latents, offsets, strict=True)]
    index, values = torch.cat(moved), torch.cat([a.values for a in sp.latents])
    kept = index[:, 1] < end[index[:, 0]]
    index, values = index[kept], values[kept]
    index[:, 1] += shift[index[:, 0]]
    d_sae = sp.latents[0].shape[2]
    order = ((index[:, 0] * out_width + index[:, 1]) * d_sae + index[:, 2]).argsort()
    latents = SparseActs(index=index[order], values=values[order], shape=(len(steps), out_width, d_sae))
    return spliced_run(latents, new_valid, objective, new_grad, token)
