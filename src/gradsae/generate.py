"""Batched greedy decoding with a KV cache, and the answer-step objective.

For a left-padded batch (``input_ids``, ``attention_mask``: ``[batch, pos]``)
decoding is an explicit loop of forward passes, so that forward hooks (an SAE
splice) act on every pass, the prompt pass and each cached step alike::

    position_ids = cumsum(attention_mask) - 1   (0 on padding)
    pass 0:      logits = model(prompt, mask, position_ids)           -> cache
    step t >= 1: logits = model(y[t-1], mask + ones, last position + 1, cache)
    y[t] = argmax logits[:, -1]; a row stops after emitting a stop token
    (EOS, <|im_end|>, <end_of_turn>, <|eot_id|>) or after ``max_new_tokens``.

Finished rows are fed the pad token until every row has stopped, as in
``model.generate``; their outputs are discarded. The tokens equal those of
``model.generate(do_sample=False)`` and of decoding each row alone.

Steering at the newest position (``newest_only=splice``, the authors' final
experiment 2). Their code re-runs the whole sequence ``x[0..n]`` uncached for
every token and edits only the last position ``n``: the logits of ``y`` come
from a pass in which position ``n`` is edited and positions ``0..n-1`` are
spliced unedited. With the plain loop above an edit at ``positions="last"``
is instead written into the cache with its token, so the pass of step ``t``
(prompt width ``P``) sees it at positions ``P-1 .. P+t-1`` (the *cumulative*
variant). ``newest_only`` keeps
the cache unedited; every pass of the loop above becomes::

    edited:   logits = model(x_new, cache[0..n-1])   edits at the pass's last position n
              (the cache now also holds the edited keys/values of n)
    crop:     cache <- cache[0..n-1]                 DynamicCache.crop(-1)
    unedited: model(x_new[:, -1:], cache[0..n-1])    splice on, edits off -> cache[0..n]

so the logits of every step equal the uncached authors' pass and the cache
holds, for every position, the keys/values of the spliced but unedited model
(causal attention: an edit at ``n`` changes nothing before ``n``, so cropping
one position removes all of it). The unedited refill is skipped after the last
step. Cost: one extra one-token pass per step (and one after the prompt pass),
about twice the cumulative loop's per-step cost; blocks ``0..l`` give the same
result in both passes and could be shared, but are not. Sliding-window cache
layers record their past so that cropping works past the window. Prefix replay
(:func:`gradsae.prefix.replay_prefix`) still applies to the prompt pass.

The paper's objective is the softmax probability of the greedy token at the
step that opens the answer: :func:`answer_step` finds that step and
:func:`answer_inputs` builds the prompt followed by the tokens generated before it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradsae.errors import GradSAEError
from gradsae.models import LoadedModel, cache_kwarg, position_ids
from gradsae.splice import Splice

log = logging.getLogger(__name__)

STOP_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "<|end|>")
"""End-of-turn tokens that stop generation when the vocabulary has them."""


@dataclass(frozen=True)
class Generation:
    """One row's greedy continuation."""

    prompt_ids: tuple[int, ...]
    """The prompt's token ids, padding removed."""
    token_ids: tuple[int, ...]
    """Generated ids, including the stop token when one was produced."""
    text: str
    """The generated text without special tokens."""
    stopped: bool
    """True if a stop token ended it (else ``max_new_tokens`` did)."""

    def prefix(self, step: int) -> tuple[int, ...]:
        """The prompt followed by the first ``step`` generated tokens."""
        return self.prompt_ids + self.token_ids[:step]


# -- inputs -------------------------------------------------------------------
def chat_text(message: str, tokenizer: Any = None) -> str:
    """``message`` as one user turn of ``tokenizer``'s chat template, else unchanged."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return message
    messages = [{"role": "user", "content": message}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def encode_prompts(
    tokenizer: Any, texts: Sequence[str], *, add_special_tokens: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` (``[batch, pos]``) for ``texts``.

    ``add_special_tokens=None`` adds them unless a text already starts with the
    BOS token (a chat template that writes its own BOS).
    """
    bos = getattr(tokenizer, "bos_token", None)
    rows = []
    for text in texts:
        add = add_special_tokens if add_special_tokens is not None else not (bos and text.startswith(bos))
        rows.append(tokenizer(text, add_special_tokens=add)["input_ids"])
    return pad_left(rows, pad_id(tokenizer))


def pad_left(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token id lists into left-padded ``input_ids`` and ``attention_mask`` ``[batch, pos]``."""
    width = max((len(row) for row in rows), default=0)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return input_ids, mask


def pad_id(tokenizer: Any) -> int:
    """The pad token id (EOS when the tokenizer has no pad token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def stop_ids(lm: LoadedModel) -> frozenset[int]:
    """Ids that end generation: the tokenizer's and generation config's EOS and end-of-turn tokens."""
    ids: set[int] = set()
    for value in (lm.tokenizer.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    vocab = lm.tokenizer.get_vocab()
    ids.update(vocab[token] for token in STOP_TOKENS if token in vocab)
    return frozenset(int(i) for i in ids)


# -- decoding -----------------------------------------------------------------
def generate(
    lm: LoadedModel,
    texts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    newest_only: Splice | None = None,
) -> list[Generation]:
    """Greedy continuations of ``texts``, decoded ``batch_size`` at a time."""
    out: list[Generation] = []
    for start in range(0, len(texts), batch_size):
        input_ids, mask = encode_prompts(lm.tokenizer, texts[start : start + batch_size])
        out.extend(generate_batch(lm, input_ids, mask, max_new_tokens=max_new_tokens, newest_only=newest_only))
    return out


@torch.no_grad()
def generate_batch(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stop: frozenset[int] | None = None,
    newest_only: Splice | None = None,
) -> list[Generation]:
    """Greedy continuations of one left-padded batch (``[batch, pos]``); see the module docstring.

    ``newest_only``: the active splice (from :func:`gradsae.splice.splice`) whose
    edits, all at ``positions="last"``, apply to the newest position only while
    the KV cache stays unedited (the authors' steering); ``None``: plain decoding.
    A recording splice then also records the unedited refill passes.
    """
    stop = stop_ids(lm) if stop is None else stop
    pad = pad_id(lm.tokenizer)
    tokens = greedy_tokens(
        lm.model, input_ids, attention_mask, max_new_tokens=max_new_tokens, stop=stop, pad=pad, newest_only=newest_only
    )
    return [generation_of(lm.tokenizer, input_ids[i], attention_mask[i], row, stop) for i, row in enumerate(tokens)]


def greedy_tokens(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stop: frozenset[int],
    pad: int,
    newest_only: Splice | None = None,
    on_step: Callable[[torch.Tensor], None] | None = None,
    answered: Callable[[int, list[int]], bool] | None = None,
    on_drop: Callable[[torch.Tensor], None] | None = None,
    cache: Any = None,
    prompt_logits: torch.Tensor | None = None,
) -> list[list[int]]:
    """Generated ids per row (stop token included); one forward pass per step, cached.

    With ``newest_only`` each step is an edited pass, a crop and an unedited
    refill of the newest position (see the module docstring). ``on_step`` sees
    each step's ``[batch, vocab]`` logits (with their autograd graph, if grad is on).
    ``answered(row, tokens)``: the row also stops once this says its answer is
    complete. ``on_drop``: finished rows leave the batch (and the KV cache) instead
    of being fed padding; it is called with the batch indices kept, so that per-row
    state elsewhere (a splice's edits) can follow. ``cache``: a KV cache that
    already holds the prompt's first columns; ``input_ids`` are then only its last
    columns (``attention_mask`` still covers the whole prompt). ``prompt_logits``:
    the ``[batch, vocab]`` last-position logits of a prompt pass already run,
    whose keys and values ``cache`` holds; decoding starts from them.
    """
    device = next(model.parameters()).device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    positions = position_ids(mask)[:, mask.shape[1] - ids.shape[1] :]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    stop_t = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    rows: list[list[int]] = [[] for _ in range(ids.shape[0])]
    active = list(range(ids.shape[0]))
    if newest_only is not None:
        _check_newest(newest_only)
        cache = croppable_cache(model) if cache is None else cache
    for step in range(max_new_tokens):
        if step == 0 and prompt_logits is not None:
            logits = prompt_logits
        else:
            logits, cache = cached_pass(model, ids, mask, positions, cache)
        if on_step is not None:
            on_step(logits)
        token = logits.detach().argmax(-1).masked_fill(done, pad)
        done = _append(rows, active, token, done, stop_t, answered)
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        if on_drop is not None and bool(done.any()):
            keep = (~done).nonzero().flatten()
            cache.batch_select_indices(keep)
            ids, mask, positions, token, done = ids[keep], mask[keep], positions[keep], token[keep], done[keep]
            active = [active[i] for i in keep.tolist()]
            on_drop(keep)
        if newest_only is not None:
            _unedit_newest(model, newest_only, ids[:, -1:], mask, positions[:, -1:], cache)
        ids, positions = token[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return rows


def _append(
    rows: list[list[int]],
    active: list[int],
    token: torch.Tensor,
    done: torch.Tensor,
    stop: torch.Tensor,
    answered: Callable[[int, list[int]], bool] | None,
) -> torch.Tensor:
    """Add each unfinished row's token; the rows finished after this step."""
    running = (~done).nonzero().flatten().tolist()
    for i in running:
        rows[active[i]].append(int(token[i]))
    done = done | torch.isin(token, stop)
    if answered is not None:
        complete = [i for i in running if not bool(done[i]) and answered(active[i], rows[active[i]])]
        done[complete] = True
    return done


def cached_pass(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
) -> tuple[torch.Tensor, Any]:
    """``[batch, vocab]`` logits at the last position, and the cache extended by ``ids``."""
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,  # only the last position's logits are read
        **{cache_kwarg(model): cache},
    )
    return out.logits[:, -1], _output_cache(out)


def keys_values(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's ``(keys, values)`` held by ``cache`` (with their autograd graph, if any)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_holding(model: Any, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A :func:`croppable_cache` holding ``kv`` (every layer's keys and values)."""
    cache = croppable_cache(model)
    for index, (keys, values) in enumerate(kv):
        cache.update(keys, values, index)
    return cache


def croppable_cache(model: Any) -> Any:
    """An empty ``DynamicCache`` that can drop its newest position, also past a sliding window."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if hasattr(cache, "activate_past_recording"):  # transformers >= 5: sliding layers keep what crop needs
        cache.activate_past_recording()
    return cache


def _check_newest(state: Splice) -> None:
    """Newest-only decoding edits the last position of each pass: refuse any other edit."""
    wrong = [e.positions for e in state.edits if not (isinstance(e.positions, str) and e.positions == "last")]
    if wrong:
        shown = ", ".join("a mask" if isinstance(p, torch.Tensor) else repr(p) for p in wrong)
        raise GradSAEError(f"newest-only steering needs every edit at positions='last', got {shown}")


def _unedit_newest(
    model: Any, state: Splice, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
) -> None:
    """Replace the cache's newest position (written by an edited pass) with that of an unedited pass."""
    cache.crop(-1)
    edits_on, state.edits_on = state.edits_on, False
    try:
        cached_pass(model, ids, mask, positions, cache)
    finally:
        state.edits_on = edits_on


def generation_of(
    tokenizer: Any, input_ids: torch.Tensor, mask: torch.Tensor, tokens: list[int], stop: frozenset[int]
) -> Generation:
    """Row ``input_ids`` (``[pos]``, padding per ``mask``) and its generated ``tokens`` as a :class:`Generation`."""
    prompt = tuple(int(t) for t in input_ids[mask.bool()].tolist())
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    stopped = bool(tokens) and tokens[-1] in stop
    return Generation(prompt_ids=prompt, token_ids=tuple(tokens), text=text, stopped=stopped)


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


# -- the answer step ----------------------------------------------------------------
def answer_step(tokenizer: Any, generation: Generation, marker: str | None) -> int:
    """Index of the generated token that opens the answer: the first containing ``marker``, else 0."""
    if marker is None:
        return 0
    for step, token in enumerate(generation.token_ids):
        if marker in tokenizer.decode([token]):
            return step
    return 0


def answer_inputs(
    tokenizer: Any, generations: Sequence[Generation], steps: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt + first ``steps[i]`` generated tokens, the input of the answer-step objective."""
    rows = [g.prefix(step) for g, step in zip(generations, steps, strict=True)]
    return pad_left(rows, pad_id(tokenizer))
