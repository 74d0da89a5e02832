"""Reuse the computation before the spliced layer across perturbation conditions.

Editing latents at layer ``l`` changes nothing in blocks ``0..l`` on the prompt
pass: their keys/values and block ``l``'s output ``Z`` are the same in every
condition. :func:`compute_prefix` runs the prompt once through blocks ``0..l``
(stopping there) and keeps those tensors; inside :func:`replay_prefix`, a forward
pass over exactly that prompt with an empty KV cache skips blocks ``0..l``: each
of them writes its stored keys/values into the cache and block ``l`` returns the
stored ``Z`` (forward hooks, the SAE splice among them, still run on it). Later
cached decoding steps run every block as usual. A prompt pass then costs
``(L - l - 1) / L`` of a full one. :meth:`Prefix.columns` keeps the columns from
``start`` on, for a prompt pass that begins there on a cache holding the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any

import torch

from gradsae.models import LoadedModel, StopForwardError, cache_kwarg, capture_residuals, position_ids


@dataclass(frozen=True)
class Prefix:
    """Blocks ``0..layer`` of one left-padded prompt batch."""

    layer: int
    input_ids: torch.Tensor
    """``[batch, pos]``"""
    keys: tuple[torch.Tensor, ...]
    """Per block ``0..layer``: ``[batch, kv_heads, pos, head_dim]``."""
    values: tuple[torch.Tensor, ...]
    residual: torch.Tensor
    """``[batch, pos, d_model]`` output of block ``layer`` (before any splice)."""
    start: int = 0
    """Column of the prompt that ``input_ids`` begins at: a pass over columns ``start..`` replays it on a
    cache that already holds columns ``0..start-1``."""

    def expand(self, copies: int) -> Prefix:
        """The prefix of a one-row batch repeated ``copies`` times (no copy of the data)."""
        if self.input_ids.shape[0] != 1:
            raise ValueError("only a one-row prefix can be expanded")
        return Prefix(
            layer=self.layer,
            input_ids=self.input_ids.expand(copies, -1),
            keys=tuple(k.expand(copies, *k.shape[1:]) for k in self.keys),
            values=tuple(v.expand(copies, *v.shape[1:]) for v in self.values),
            residual=self.residual.expand(copies, -1, -1),
        )

    def select(self, rows: torch.Tensor) -> Prefix:
        """The batch rows ``rows`` (indices; repeats allowed): ``[len(rows), ...]``."""
        return replace(
            self,
            input_ids=self.input_ids[rows],
            keys=tuple(k[rows] for k in self.keys),
            values=tuple(v[rows] for v in self.values),
            residual=self.residual[rows],
        )

    def columns(self, start: int, stop: int | None = None) -> Prefix:
        """Columns ``start..stop-1`` only (a pass that begins there, on a cache holding the columns before)."""
        return replace(
            self,
            input_ids=self.input_ids[:, start:stop],
            keys=tuple(k[..., start:stop, :] for k in self.keys),
            values=tuple(v[..., start:stop, :] for v in self.values),
            residual=self.residual[:, start:stop],
            start=self.start + start,
        )


def compute_prefix(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> Prefix:
    """Run the prompt through blocks ``0..layer`` only and keep their cache and output."""
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    with capture_residuals(lm, [layer]) as found, torch.no_grad(), suppress(StopForwardError):
        lm.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=True,
            **{cache_kwarg(lm.model): cache},
        )
    layers: list[Any] = list(cache.layers[: layer + 1])
    return Prefix(
        layer=layer,
        input_ids=input_ids,
        keys=tuple(entry.keys for entry in layers),
        values=tuple(entry.values for entry in layers),
        residual=found[layer],
    )


@contextmanager
def replay_prefix(lm: LoadedModel, prefix: Prefix) -> Iterator[None]:
    """Within the block, a prompt pass over ``prefix.input_ids`` skips blocks ``0..layer``."""
    blocks = list(lm.layers[: prefix.layer + 1])
    originals = [block.forward for block in blocks]
    try:
        for index, block in enumerate(blocks):
            block.forward = _replaying(block.forward, index, prefix)  # type: ignore[method-assign]
        yield
    finally:
        for block, original in zip(blocks, originals, strict=True):
            block.forward = original  # type: ignore[method-assign]
            with suppress(AttributeError):
                del block.forward  # drop the instance attribute: back to the class's method


def _replaying(original: Any, index: int, prefix: Prefix) -> Any:
    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        is_prompt = hidden_states.shape[:2] == prefix.input_ids.shape
        if not is_prompt or (cache is not None and cache.get_seq_length(index) != prefix.start):
            return original(hidden_states, *args, **kwargs)
        if cache is not None:
            cache.update(prefix.keys[index], prefix.values[index], index)
        return prefix.residual if index == prefix.layer else hidden_states

    return forward
