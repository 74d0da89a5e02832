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

The paper's objective is the softmax probability of the greedy token at the
step that opens the answer: :func:`answer_step` finds that step and
:func:`answer_inputs` builds the prompt followed by the tokens generated before it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradsae.models import LoadedModel, cache_kwarg, position_ids

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
) -> list[Generation]:
    """Greedy continuations of ``texts``, decoded ``batch_size`` at a time."""
    out: list[Generation] = []
    for start in range(0, len(texts), batch_size):
        input_ids, mask = encode_prompts(lm.tokenizer, texts[start : start + batch_size])
        out.extend(generate_batch(lm, input_ids, mask, max_new_tokens=max_new_tokens))
    return out


@torch.no_grad()
def generate_batch(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stop: frozenset[int] | None = None,
) -> list[Generation]:
    """Greedy continuations of one left-padded batch (``[batch, pos]``); see the module docstring."""
    stop = stop_ids(lm) if stop is None else stop
    pad = pad_id(lm.tokenizer)
    tokens = greedy_tokens(lm.model, input_ids, attention_mask, max_new_tokens=max_new_tokens, stop=stop, pad=pad)
    return [_generation(lm.tokenizer, input_ids[i], attention_mask[i], row, stop) for i, row in enumerate(tokens)]


def greedy_tokens(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stop: frozenset[int],
    pad: int,
) -> list[list[int]]:
    """Generated ids per row (stop token included); one forward pass per step, cached."""
    device = next(model.parameters()).device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    positions = position_ids(mask)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    stop_t = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    rows: list[list[int]] = [[] for _ in range(ids.shape[0])]
    cache = None
    for _ in range(max_new_tokens):
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits are read
            **{cache_kwarg(model): cache},
        )
        cache = _output_cache(out)
        token = out.logits[:, -1].argmax(-1).masked_fill(done, pad)
        for i in (~done).nonzero().flatten().tolist():
            rows[i].append(int(token[i]))
        done = done | torch.isin(token, stop_t)
        if bool(done.all()):
            break
        ids, positions = token[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return rows


def _generation(
    tokenizer: Any, input_ids: torch.Tensor, mask: torch.Tensor, tokens: list[int], stop: frozenset[int]
) -> Generation:
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
    """Left-padded prompt + first ``steps[i]`` generated tokens, the input of :func:`next_token`."""
    rows = [g.prefix(step) for g, step in zip(generations, steps, strict=True)]
    return pad_left(rows, pad_id(tokenizer))
