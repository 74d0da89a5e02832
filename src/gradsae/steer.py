"""Steer a model by adding SAE decoder rows, and score which latents to add.

The steering vector. With the SAE spliced in ``error`` mode at layer ``l``, the
edit ``Edit(latents=S, op="add", values=v, positions="all")`` turns the latents
``H`` of every edited position into ``H' = H + sum_{c in S} v_c e_c``, and since
``decode(H) = H W_dec + b_dec`` is affine the residual becomes::

    Z' = sg(Z) + decode(H') - decode(H) = Z + sum_{c in S} v_c W_dec[c]

on every forward pass (the prompt pass and each cached generation step), the
same vector whatever ``Z`` is: the classic "add alpha x feature direction".
Positions the splice skips (padding, each row's first token) stay unchanged.
:func:`steering_edit` sets ``v_c = alpha * a_c`` with ``a_c`` the latent's
typical activation (:func:`typical_activation`: its mean over the tokens where it
fires), so ``alpha = 1`` adds each latent as strongly as it usually fires.

Scores (``[d_sae]``, larger = a better steering latent; pick with :func:`top_latents`):

* :func:`mean_influence`: GradSAE (Shu et al. 2025) on an objective, averaged over
  rows: ``mean_b mean_n relu(H[b,n,c] dY_b/dH[b,n,c])``. With
  :class:`~gradsae.objectives.TargetLogProb` on ``prompt + target`` rows
  (:func:`target_rows`), ``Y = log p(target | prompt)``: latents whose presence
  makes the model more likely to say the concept.
* :func:`mean_activation`: the input side (AxBench's selection): mean activation over
  the tokens of texts that express the concept.
* :func:`logit_lens_scores`: the output side (after Arad et al., EMNLP 2025): the
  logit-lens projection of each decoder row onto the target tokens ``T`` with the
  final norm's gain ``g`` folded into the unembedding ``W_U``, centred over the
  vocabulary (a shift of every logit changes no probability)::

      s_c = mean_{t in T} u_t - mean_v u_v,   u = W_U (g * d_c),
      d_c = W_dec[c]  (RMSNorm; Gemma's RMSNorm multiplies by 1 + g),
      d_c = W_dec[c] - mean(W_dec[c])  (LayerNorm, which centres; its bias shifts
      every latent alike and is dropped).

  The norm's ``1 / rms(x)`` depends on the residual, not on ``c``, and is dropped.
* :func:`target_position_influence`: GradSAE scored on the target positions only:
  ``mean_b (1/L_b) sum_{n in T_b} relu(H[b,n,c] dY_b/dH[b,n,c])`` where ``T_b`` are the
  ``L_b`` positions whose next-token prediction is a target token (the last prompt
  token and every target token but the last), not the chat scaffold before them.
* :func:`arad_output_scores`: Arad et al.'s output score (EMNLP 2025, arXiv 2505.20063,
  §3.2). On the neutral prompt ``x = "In my experience,"`` add ``s x a_max`` to latent
  ``c`` (their Eq. 6: ``a_max`` the largest latent activation, ``s = 10``), at the last
  position as their released code does (``src/sae_utils.py``: ``AmlifySAEHook``; the
  paper does not say which positions), the SAE error kept (error mode, as the code
  does; the paper's Eq. 6 decodes without it). With ``l_c`` the ``k = 20`` top
  logit-lens tokens of ``W_dec[c]`` (their Eq. 4: final norm, then unembedding), ``l*``
  the best-ranked of them under a distribution ``p`` (rank 0 = most likely, ``V`` the
  vocabulary size)::

      P(p)  = (1 - rank_p(l*) / V) * p(l*),     S_out = P(p_c) - P(p_0)

  ``p_c`` / ``p_0`` the next-token distributions with / without the intervention.
  The released code (``src/output_score.py``) and the paper's experiments use
  ``P(p_c)`` alone (§3.2 takes ``S_out`` proportional to it for a neutral prompt) and the
  prompt "From my experience,": ``subtract_prior=False, prompt="From my experience,"``.
* :func:`delta_token_confidence`: ΔToken Confidence (Wang et al., arXiv 2510.03659,
  §4.1 and Appendix D). Token confidence (after Fu et al. 2025) of a distribution
  ``p``: ``C_k(p) = -(1/k) sum_{j in top-k(p)} log p_j``; with ``p_c`` the next-token
  distribution on the prefix "From my experience," when latent ``c``'s coefficient is
  amplified by the factor ``alpha`` (``H[n, c] -> alpha H[n, c]``, every other latent
  unchanged; ``alpha = 10``, ``k = 1``)::

      dC_k(c) = C_k(p_c) - C_k(p_0)         (:func:`token_confidence_change`)

  and the selector ranks latents by ``|dC_k|`` (§4.1: "rank by |dC_k|"). The paper
  does not say at which positions the coefficient is scaled; here at every spliced
  position of the prefix (each row's first token is never spliced). A latent that
  does not fire on the prefix is unchanged by the scaling and scores 0. Its
  Appendix D also words the pass as decoding the scaled code "while keeping all other
  codes at zero"; the main text's "leaving ... all other features unchanged" is the
  reading here. No code of that paper could be read where this was written.
* :func:`random_latents`: ``K`` latents drawn uniformly (seeded), the null.

Norm-matched strength (:func:`norm_matched_values`): a set ``S`` with weights ``w``
(each latent's typical activation) has the direction ``u = sum_i w_i W_dec[c_i]``;
the edit adds ``alpha * R * u / |u|`` with ``R`` the residual stream's typical norm
at the layer (:func:`residual_norm`: the median token norm of the block output,
each row's first token and padding left out), so every method's vector has the
norm ``alpha * R`` whatever its latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradsae.errors import GradSAEError
from gradsae.generate import encode_prompts, pad_id, pad_left
from gradsae.lens import lens_directions, top_tokens, unembedding
from gradsae.models import LoadedModel, block_output, position_ids
from gradsae.objectives import NextTokenProb, Objective, TargetLogProb
from gradsae.sae import SAE
from gradsae.scores import ScoreOptions, score_latents
from gradsae.splice import Edit, Mode, SparseActs, splice


# -- scores -------------------------------------------------------------------------
def target_rows(
    tokenizer: Any, prompts: Sequence[str], targets: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Every ``prompt + target`` pair, left-padded (``[rows, pos]``), and each row's target length.

    Prompts are already rendered (a chat template's generation prompt ends them);
    a prompt gets the BOS token unless it starts with it.
    """
    bos = getattr(tokenizer, "bos_token", None)
    rows, lengths = [], []
    for prompt in prompts:
        head = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
        for target in targets:
            tail = tokenizer.encode(target, add_special_tokens=False)
            if not tail:
                raise GradSAEError("a concept text is empty: give every target some words")
            rows.append([*head, *tail])
            lengths.append(len(tail))
    ids, mask = pad_left(rows, pad_id(tokenizer))
    return ids, mask, tuple(lengths)


def mean_influence(
    lm: LoadedModel,
    sae: SAE,
    ids: torch.Tensor,
    mask: torch.Tensor,
    objective: Objective,
    *,
    layer: int,
    mode: Mode = "error",
) -> torch.Tensor:
    """``[d_sae]`` GradSAE influence (the paper's aggregation) averaged over the rows of one batch."""
    inputs = {"input_ids": ids, "attention_mask": mask}
    scores = score_latents(lm, sae, inputs, objective, options=ScoreOptions(layer=layer, mode=mode))
    return scores.per_latent.mean(dim=0)


def target_influence(
    lm: LoadedModel, sae: SAE, prompts: Sequence[str], targets: Sequence[str], *, layer: int, mode: Mode = "error"
) -> torch.Tensor:
    """``[d_sae]`` GradSAE influence on ``log p(target | prompt)``, averaged over every pair."""
    ids, mask, lengths = target_rows(lm.tokenizer, prompts, targets)
    return mean_influence(lm, sae, ids, mask, TargetLogProb(n_target=lengths), layer=layer, mode=mode)


def mean_activation(
    lm: LoadedModel, sae: SAE, texts: Sequence[str], *, layer: int, mode: Mode = "error"
) -> torch.Tensor:
    """``[d_sae]`` mean activation over the (spliced) tokens of each text, averaged over texts."""
    ids, mask = _encode(lm, texts)
    inputs = {"input_ids": ids, "attention_mask": mask}
    options = ScoreOptions(layer=layer, mode=mode)
    scores = score_latents(lm, sae, inputs, NextTokenProb(), method="activation", options=options)
    return scores.mean_act.mean(dim=0)


def typical_activation(lm: LoadedModel, sae: SAE, texts: Sequence[str], *, layer: int) -> torch.Tensor:
    """``[d_sae]`` each latent's mean activation over the tokens of ``texts`` where it fires (0: never)."""
    ids, mask = _encode(lm, texts)
    with splice(lm, sae, layer, mode="error") as state, torch.no_grad():
        lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False, logits_to_keep=1)
    acts = state.latents[0]
    d_sae = sae.cfg.d_sae
    total = torch.zeros(d_sae, dtype=acts.values.dtype, device=acts.values.device)
    total = total.index_add(0, acts.index[:, 2], acts.values)
    count = torch.zeros_like(total).index_add(0, acts.index[:, 2], torch.ones_like(acts.values))
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def latent_scales(typical: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a_c`` of each chosen latent, and ``[K]`` which of them never fired (given the median of those that did)."""
    fired = typical[typical > 0]
    fallback = fired.median() if len(fired) else torch.ones((), dtype=typical.dtype)
    scales = typical[latents]
    missing = scales <= 0
    return torch.where(missing, fallback.to(scales.dtype), scales), missing


def logit_lens_scores(lm: LoadedModel, sae: SAE, tokens: Sequence[int]) -> torch.Tensor:
    """``[d_sae]`` centred logit-lens score of each decoder row on ``tokens`` (module docstring; the lens is
    :mod:`gradsae.lens`)."""
    if not tokens:
        raise GradSAEError("the logit-lens score needs at least one target token")
    directions, _note = lens_directions(lm, sae)
    unembed = unembedding(lm)
    targets = unembed[torch.as_tensor(list(tokens))] - unembed.mean(dim=0)
    return (directions @ targets.T).mean(dim=-1)


def word_tokens(tokenizer: Any, words: Sequence[str]) -> tuple[int, ...]:
    """The first token of each word as it appears mid-sentence (after a space), each once."""
    out: list[int] = []
    for word in words:
        ids = tokenizer.encode(" " + word.strip(), add_special_tokens=False)
        if ids and int(ids[0]) not in out:
            out.append(int(ids[0]))
    return tuple(out)


# -- choice and edit ---------------------------------------------------------------
def top_latents(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[k]`` distinct latents with the largest scores, best first (ties: lower index first)."""
    if not 0 < k <= scores.shape[-1]:
        raise GradSAEError(f"K must be between 1 and {scores.shape[-1]} (the SAE's width), got {k}")
    return scores.argsort(descending=True, stable=True)[:k]


def random_latents(d_sae: int, k: int, *, seed: int) -> torch.Tensor:
    """``[k]`` distinct latents drawn uniformly from ``d_sae`` (seeded)."""
    return top_latents(torch.rand(d_sae, generator=torch.Generator().manual_seed(seed)), k)


def steering_edit(latents: torch.Tensor | Sequence[int], alpha: float, scales: torch.Tensor) -> Edit:
    """Add ``alpha * scales[i]`` to latent ``latents[i]`` at every position of every pass."""
    values = float(alpha) * torch.as_tensor(scales, dtype=torch.float32)
    return Edit(latents=torch.as_tensor(latents, dtype=torch.long), op="add", values=values, positions="all")


def steering_vector(
    sae: SAE, latents: torch.Tensor | Sequence[int], alpha: float, scales: torch.Tensor
) -> torch.Tensor:
    """``[d_model]`` what the edit adds to the residual in error mode: ``sum_i alpha a_i W_dec[latents[i]]``."""
    index = torch.as_tensor(latents, dtype=torch.long)
    values = float(alpha) * torch.as_tensor(scales, dtype=sae.W_dec.dtype)
    return values @ sae.W_dec.detach()[index]


def _encode(lm: LoadedModel, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = encode_prompts(lm.tokenizer, texts)
    return ids.to(lm.device), mask.to(lm.device)


# -- norm-matched strength ----------------------------------------------------------
@torch.no_grad()
def residual_norm(lm: LoadedModel, texts: Sequence[str], *, layer: int) -> float:
    """Median L2 norm of block ``layer``'s output over the tokens of ``texts`` (first token and padding left out)."""
    ids, mask = _encode(lm, texts)
    got: list[torch.Tensor] = []
    handle = lm.layers[layer].register_forward_hook(lambda _m, _i, out: got.append(block_output(out).detach()))
    try:
        lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    valid = mask.bool().clone()
    valid[torch.arange(len(valid)), valid.float().argmax(dim=1)] = False
    return float(got[0].float().norm(dim=-1)[valid].median())


def norm_matched_values(
    sae: SAE, latents: torch.Tensor | Sequence[int], weights: torch.Tensor, norm: float
) -> torch.Tensor:
    """``[K]`` values whose add edit puts ``norm * u / |u|`` on the residual, ``u = sum_i w_i W_dec[c_i]``."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    direction = w @ sae.W_dec.detach().double().cpu()[torch.as_tensor(latents, dtype=torch.long)]
    length = float(direction.norm())
    if length == 0:
        raise GradSAEError("the steering direction is zero: give the latents non-zero weights")
    return (w * (float(norm) / length)).float()


def norm_matched_edit(sae: SAE, latents: torch.Tensor | Sequence[int], weights: torch.Tensor, norm: float) -> Edit:
    """The add edit of :func:`norm_matched_values` at every position of every pass."""
    values = norm_matched_values(sae, latents, weights, norm)
    return Edit(latents=torch.as_tensor(latents, dtype=torch.long), op="add", values=values, positions="all")


# -- target positions ----------------------------------------------------------------
def target_position_influence(
    lm: LoadedModel, sae: SAE, prompts: Sequence[str], targets: Sequence[str], *, layer: int, mode: Mode = "error"
) -> torch.Tensor:
    """``[d_sae]`` GradSAE influence on ``log p(target | prompt)`` over the target-predicting positions only."""
    ids, mask, lengths = target_rows(lm.tokenizer, prompts, targets)
    objective = TargetLogProb(n_target=lengths)
    inputs = {"input_ids": ids, "attention_mask": mask}
    scores = score_latents(lm, sae, inputs, objective, options=ScoreOptions(layer=layer, mode=mode))
    width = ids.shape[1]
    rows, pos, lat = scores.token_index.unbind(-1)
    length = torch.as_tensor(lengths, device=rows.device)[rows]
    inside = (pos >= width - 1 - length) & (pos <= width - 2)
    weight = scores.token_score.clamp(min=0) * inside / length
    total = torch.zeros(sae.cfg.d_sae, dtype=weight.dtype, device=weight.device).index_add(0, lat, weight)
    return total / len(lengths)


# -- intervention-based output scores (Arad et al.; ΔToken Confidence) -------------------
ARAD_PROMPT = "In my experience,"
"""Arad et al.'s neutral prompt (their §3.2; their released code uses "From my experience,")."""
DTC_PROMPT = "From my experience,"
"""Wang et al.'s neutral prefix (their Appendix D: "following the previous work", Arad et al.)."""


@torch.no_grad()
def _prompt_pass(
    lm: LoadedModel, sae: SAE, prompt: str, *, layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SparseActs]:
    """``(ids, mask, p_0 [V], latents)``: the prompt, its unedited next-token distribution and its latents."""
    ids, mask = _encode(lm, [prompt])
    with splice(lm, sae, layer, mode="error") as state:
        logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
    return ids, mask, logits[0, -1].double().softmax(-1).cpu(), state.latents[0]


@torch.no_grad()
def _edited_probs(
    lm: LoadedModel, sae: SAE, ids: torch.Tensor, mask: torch.Tensor, edits: Sequence[Edit], *, layer: int, rows: int
) -> torch.Tensor:
    """``[rows, V]`` next-token distributions of ``rows`` copies of the prompt, row ``i`` edited by ``edits``."""
    batch, batch_mask = ids.repeat(rows, 1), mask.repeat(rows, 1)
    with splice(lm, sae, layer, mode="error", edits=list(edits), record=False):
        out = lm.model(
            input_ids=batch, attention_mask=batch_mask, position_ids=position_ids(batch_mask), use_cache=False
        )
    return out.logits[:, -1].double().softmax(-1).cpu()


def amplified_probs(
    lm: LoadedModel, sae: SAE, prompt: str, latents: Sequence[int], *, layer: int, amp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p_0 [V], p [len(latents), V])``: next-token distributions without and with each latent amplified.

    Amplified as in Arad et al.'s Eq. 6 and code: ``amp x`` the largest latent
    activation at the last position is added to the latent there (error mode: the
    residual gets that times ``W_dec[c]``).
    """
    ids, mask, p0, acts = _prompt_pass(lm, sae, prompt, layer=layer)
    at_last = acts.values[acts.index[:, 1] == ids.shape[1] - 1]
    top = float(at_last.max()) if len(at_last) else 0.0
    n = len(latents)
    edit = Edit(
        latents=torch.as_tensor(list(latents), dtype=torch.long)[:, None],
        op="add",
        values=torch.full((n, 1), amp * top),
        positions="last",
    )
    return p0, _edited_probs(lm, sae, ids, mask, [edit], layer=layer, rows=n)


def scaled_probs(
    lm: LoadedModel, sae: SAE, prompt: str, latents: Sequence[int], *, layer: int, factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p_0 [V], p [len(latents), V])``: next-token distributions without and with each latent's coefficient
    multiplied by ``factor`` at every spliced position (``H[n, c] -> factor H[n, c]``; error mode: the residual
    gets ``(factor - 1) H[n, c] W_dec[c]``)."""
    ids, mask, p0, acts = _prompt_pass(lm, sae, prompt, layer=layer)
    chosen = torch.as_tensor(list(latents), dtype=torch.long)
    n, width = len(chosen), ids.shape[1]
    dense = torch.zeros(width, sae.cfg.d_sae, dtype=torch.float64)
    dense[acts.index[:, 1].cpu(), acts.index[:, 2].cpu()] = acts.values.detach().double().cpu()
    edits = []
    for pos in range(width):
        here = dense[pos, chosen]
        if bool((here != 0).any()):
            where = torch.zeros(n, width, dtype=torch.bool)
            where[:, pos] = True
            values = (float(factor) * here).to(sae.W_dec.dtype)[:, None]
            edits.append(Edit(latents=chosen[:, None], op="set", values=values, positions=where, extend=False))
    return p0, _edited_probs(lm, sae, ids, mask, edits, layer=layer, rows=n)


def rank_weighted_prob(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[rows]`` Arad et al.'s ``P = (1 - rank(l*) / V) p(l*)``, ``l*`` the best-ranked of each row's ``tokens``."""
    order = probs.argsort(dim=-1, descending=True, stable=True)
    ranks = order.argsort(dim=-1, stable=True)
    best_rank = ranks.gather(-1, tokens).min(dim=-1).values.double()
    top_prob = probs.gather(-1, tokens).max(dim=-1).values.double()
    return (1 - best_rank / probs.shape[-1]) * top_prob


def arad_output_scores(
    lm: LoadedModel,
    sae: SAE,
    latents: Sequence[int],
    *,
    layer: int,
    prompt: str = ARAD_PROMPT,
    amp: float = 10.0,
    top_k: int = 20,
    subtract_prior: bool = True,
) -> torch.Tensor:
    """``[len(latents)]`` Arad et al.'s output score ``S_out = P(p_c) - P(p_0)`` (§3.2; module docstring).

    ``subtract_prior=False`` gives ``P(p_c)`` alone, what their released code computes.
    """
    p0, probs = amplified_probs(lm, sae, prompt, latents, layer=layer, amp=amp)
    tokens = top_tokens(lm, sae, latents, top_k)
    score = rank_weighted_prob(probs, tokens)
    if subtract_prior:
        score = score - rank_weighted_prob(p0.expand_as(probs), tokens)
    return score


def token_confidence(probs: torch.Tensor, k: int = 1) -> torch.Tensor:
    """``C_k(p) = -(1/k) sum_{j in top-k(p)} log p_j`` over the last dimension (Wang et al. §4.1, after Fu et al.)."""
    if not 0 < k <= probs.shape[-1]:
        raise GradSAEError(f"token confidence needs 1 <= k <= {probs.shape[-1]} (the vocabulary), got {k}")
    return -probs.topk(k, dim=-1).values.log().mean(dim=-1)


def token_confidence_change(
    lm: LoadedModel,
    sae: SAE,
    latents: Sequence[int],
    *,
    layer: int,
    prompt: str = DTC_PROMPT,
    amp: float = 10.0,
    k: int = 1,
) -> torch.Tensor:
    """``[len(latents)]`` ``dC_k(c) = C_k(p_c) - C_k(p_0)``, each latent's coefficient scaled by ``amp`` (signed:
    negative = the amplified latent sharpens the top-k; module docstring)."""
    p0, probs = scaled_probs(lm, sae, prompt, latents, layer=layer, factor=amp)
    return token_confidence(probs, k) - token_confidence(p0, k)


def delta_token_confidence(
    lm: LoadedModel,
    sae: SAE,
    latents: Sequence[int],
    *,
    layer: int,
    prompt: str = DTC_PROMPT,
    amp: float = 10.0,
    k: int = 1,
) -> torch.Tensor:
    """``[len(latents)]`` the ΔToken Confidence selection score ``|dC_k(c)|`` (Wang et al. §4.1 rank by it).

    A latent silent on every spliced position of the prompt scores exactly 0 (scaling 0 changes nothing).
    """
    return token_confidence_change(lm, sae, latents, layer=layer, prompt=prompt, amp=amp, k=k).abs()
