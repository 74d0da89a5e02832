"""The authors' reference algorithm, re-implemented, and the same job done by ``gradsae``.

Job: greedy-decode ``n_new`` tokens with the SAE spliced after block ``l`` in
``replace`` mode (the residual becomes the reconstruction), ignoring EOS, then
score every latent by GradSAE with the paper's objective at the last step,
``Y = p(greedy token)`` given the prompt and the first ``n_new - 1`` tokens:
``g[c] = mean_n relu(H[n, c] * dY/dH[n, c])`` over the spliced positions.

Reference (as the authors' code does it): every step re-runs the whole sequence
without a KV cache; at the last step the dense latent tensor
``H [batch, pos, d_sae]`` is made a leaf inside the hook, decoded, and ``Y`` is
back-propagated to it, so ``H.grad`` is a dense tensor. To keep the comparison
conservative the reference computes logits at the last position only, and takes
the gradient on the last generation pass instead of an extra one.

Ours: :func:`gradsae.answer.generate_and_score`: cached greedy decoding (one pass
per step) under a grad splice, and one backward from the last step's objective
through the decoding passes themselves (no second forward). ``separate_pipeline``
is the previous route, kept for comparison: :func:`gradsae.generate.generate_batch`
under :func:`gradsae.splice.splice`, then :func:`gradsae.scores.score_latents` on
the prompt plus the first ``n_new - 1`` tokens (decode, forward, backward).

Both use the library's conventions (padding and each row's first real token are
not spliced), so tokens and scores must agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.common import residual_leaves
from gradsae.answer import generate_and_score
from gradsae.generate import cached_pass, croppable_cache, generate_batch
from gradsae.models import LoadedModel, block_output, position_ids
from gradsae.objectives import NextTokenProb
from gradsae.sae import SAE
from gradsae.scores import ScoreOptions, score_latents
from gradsae.splice import splice


@dataclass(frozen=True)
class Pipeline:
    """What the generate-then-score job returns."""

    tokens: torch.Tensor
    """``[batch, n_new]`` generated ids."""
    scores: torch.Tensor
    """``[batch, d_sae]`` paper-aggregated GradSAE scores at the last step."""


def spliced_positions(mask: torch.Tensor) -> torch.Tensor:
    """``[batch, pos]``: real tokens other than each row's first (the library's ``skip_first``)."""
    valid = mask.bool().clone()
    first = valid.int().argmax(dim=1)
    valid[torch.arange(len(first)), first] = False
    return valid


class DenseReplace:
    """Forward hook: ``Z -> decode(H)`` with a dense ``H``, optionally a leaf for autograd."""

    def __init__(self, sae: SAE) -> None:
        self.sae = sae
        self.valid: torch.Tensor | None = None
        self.leaf = False
        self.latents: torch.Tensor | None = None

    def __call__(self, _module: Any, _inputs: Any, output: Any) -> Any:
        z = block_output(output)
        assert self.valid is not None
        valid = self.valid[:, :, None]
        with torch.no_grad():
            h = self.sae.encode(z) * valid
        if self.leaf:
            h.requires_grad_(True)
        self.latents = h
        decoded = h @ self.sae.W_dec.detach() + self.sae.b_dec.detach()  # no gradient for the SAE's weights
        new = torch.where(valid, decoded.to(z.dtype), z)
        return (new, *output[1:]) if isinstance(output, tuple) else new


def reference_pipeline(
    lm: LoadedModel, sae: SAE, ids: torch.Tensor, mask: torch.Tensor, layer: int, n_new: int
) -> Pipeline:
    """Uncached greedy decoding, then a dense latent gradient at the last step."""
    hook = DenseReplace(sae)
    handle = lm.layers[layer].register_forward_hook(hook)
    tokens: list[torch.Tensor] = []
    try:
        for step in range(n_new):
            hook.valid, hook.leaf = spliced_positions(mask), step == n_new - 1
            with torch.set_grad_enabled(hook.leaf):
                out = lm.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=position_ids(mask),
                    use_cache=False,
                    logits_to_keep=1,
                )
            logits = out.logits[:, -1]
            token = logits.detach().argmax(-1)
            tokens.append(token)
            if not hook.leaf:
                ids = torch.cat([ids, token[:, None]], dim=1)
                mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        scores = _dense_scores(logits, token, hook)
    finally:
        handle.remove()
    return Pipeline(tokens=torch.stack(tokens, dim=1), scores=scores)


def _dense_scores(logits: torch.Tensor, token: torch.Tensor, hook: DenseReplace) -> torch.Tensor:
    """Backward ``p(greedy token)`` to the dense leaf; ``mean_n relu(H * dY/dH)``."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # as NextTokenProb: float32 or wider
    prob = torch.softmax(wide, dim=-1).gather(1, token[:, None])[:, 0]
    prob.sum().backward()
    h, valid = hook.latents, hook.valid
    assert h is not None and h.grad is not None and valid is not None
    per_token = (h.detach() * h.grad).clamp(min=0)
    return per_token.sum(dim=1) / valid.sum(dim=1).clamp(min=1)[:, None]


def our_pipeline(lm: LoadedModel, sae: SAE, ids: torch.Tensor, mask: torch.Tensor, layer: int, n_new: int) -> Pipeline:
    """Cached greedy decoding under a grad splice; one backward from the last step through its passes."""
    gens, scores = generate_and_score(
        lm,
        sae,
        ids,
        mask,
        max_new_tokens=n_new,
        step_of=lambda g: n_new - 1,
        layer=layer,
        mode="replace",
        stop=frozenset(),
    )
    tokens = torch.tensor([g.token_ids for g in gens], dtype=torch.long)
    return Pipeline(tokens=tokens, scores=scores.per_latent)


def separate_pipeline(
    lm: LoadedModel, sae: SAE, ids: torch.Tensor, mask: torch.Tensor, layer: int, n_new: int
) -> Pipeline:
    """Cached greedy decoding under the splice, then sparse GradSAE scoring of prompt + prefix."""
    with splice(lm, sae, layer, mode="replace", record=False):
        gens = generate_batch(lm, ids, mask, max_new_tokens=n_new, stop=frozenset())
    tokens = torch.tensor([g.token_ids for g in gens], dtype=torch.long)
    prefix = torch.cat([ids, tokens[:, :-1]], dim=1)
    prefix_mask = torch.cat([mask, mask.new_ones(len(mask), n_new - 1)], dim=1)
    scores = score_latents(
        lm,
        sae,
        {"input_ids": prefix, "attention_mask": prefix_mask},
        NextTokenProb(),
        options=ScoreOptions(layer=layer, mode="replace"),
    )
    return Pipeline(tokens=tokens, scores=scores.per_latent)


def plain_decode(lm: LoadedModel, sae: SAE, ids: torch.Tensor, mask: torch.Tensor, layer: int, n_new: int) -> None:
    """The floor of any generate-then-score job: the plain model's cached greedy decode, no splice, no grad."""
    del sae, layer
    with torch.no_grad():
        generate_batch(lm, ids, mask, max_new_tokens=n_new, stop=frozenset())


def plain_decode_with_graph(
    lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, layer: int, tokens: torch.Tensor
) -> torch.Tensor:
    """The floor of GradSAE from a generation's own passes: the plain model's cached decode, graph kept, one backward.

    No splice. One cached pass per step with grad on (the prompt, then each of the
    first ``n_new - 1`` tokens of ``tokens [batch, n_new]``, fed as a greedy decode
    would feed them, so both sides see the same tokens), every pass's autograd graph
    kept through the KV cache, the residual after block ``layer`` made a leaf in each
    pass (parameters frozen, so the backward stops there, as ours does); then
    ``Y = p(greedy token)`` at the last step is back-propagated once. Returns ``Y``.
    """
    with residual_leaves(lm, layer), torch.enable_grad():
        cache = croppable_cache(lm.model)
        positions, step = position_ids(mask), ids
        for t in range(tokens.shape[1]):
            logits, cache = cached_pass(lm.model, step, mask, positions, cache)
            logits.detach().argmax(-1)  # the greedy choice a decode makes at every step
            if t + 1 < tokens.shape[1]:
                step, positions = tokens[:, t : t + 1], positions[:, -1:] + 1
                mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        y = NextTokenProb()(logits[:, None], ids)
        y.sum().backward()
    return y.detach()


def agreement(ours: Pipeline, reference: Pipeline) -> dict[str, Any]:
    """Do both produce the same tokens and (close to) the same scores?"""
    same_tokens = bool(torch.equal(ours.tokens, reference.tokens))
    scale = float(reference.scores.abs().max().clamp(min=1e-30))
    max_diff = float((ours.scores - reference.scores).abs().max()) if same_tokens else float("nan")
    top_ours = ours.scores.argmax(dim=-1)
    return {
        "same_tokens": same_tokens,
        "max_abs_score_diff": max_diff,
        "max_rel_score_diff": max_diff / scale,
        "same_top_latent": bool(torch.equal(top_ours, reference.scores.argmax(dim=-1))),
    }
