"""Score every latent of an SAE spliced at layer ``l`` by its influence on an objective.

Notation: latents ``H [batch, pos, d_sae]`` at the spliced positions, objective
``Y [batch]`` (see :mod:`gradsae.objectives`), ``R`` the residual after the splice.

Algorithm for ``gradsae`` (Shu et al., EMNLP 2025, eq. 3-4):

1. Forward with the SAE spliced and ``R`` made a leaf (parameters frozen, so
   nothing before layer ``l`` is recorded for autograd).
2. One backward pass of ``sum(Y)``; it stops at ``R``: ``G = dY/dR [batch, pos, d_model]``.
3. For each *active* entry ``(b, n, c)`` of ``H`` only (never a dense latent gradient):
   ``dY/dH[b, n, c] = W_dec[c] . G[b, n]`` and the per-token influence is
   ``g[b, n, c] = H[b, n, c] * dY/dH[b, n, c]``, the first-order estimate of
   ``Y(H) - Y(H with H[b, n, c] = 0)``.
4. Aggregate over the spliced positions ``n`` (``N_b`` of them in row ``b``):
   ``paper``: ``mean_n relu(g)``; ``signed``: ``mean_n g``; ``abs``: ``mean_n |g|``;
   ``sum``: ``sum_n g`` (the first-order estimate of zeroing ``c`` everywhere);
   ``last``: ``g`` at the last position.

With :class:`~gradsae.objectives.NextTokenProb`, ``Y = p(y*)`` where ``y*`` is the
greedy token of this spliced, unedited run (a constant for the gradient).

Spliced positions: every real (non-padding) token except, by default, each row's
first (``skip_first=True``): SAEs trained without position 0 reconstruct the
attention sink badly. The paper's code splices and averages over every position,
BOS included: pass ``ScoreOptions(skip_first=False)`` for that.

Baselines: ``activation`` scores ``mean_n H[b, n, c]`` (the paper's input-side
ranking); ``ablation`` is the exact ``Y(H) - Y(H with latent c zeroed at every
position)`` with ``y*`` held at the clean run's greedy token (``p_clean(y*) -
p_edit(y*)``), one forward per active latent, the clean ``Y`` taken in the same
batched, prefix-replayed forward with an empty edit; ``random`` gives each
active latent a seeded uniform score (one seed for the batch, or one per row: then a
row's scores do not depend on the rows beside it).

Entry points: ``score_latents(lm, sae, inputs, objective, *, method, options)`` (one method; ``inputs`` the
tokenizer's output or a tensor of ids) and ``score_methods(lm, sae, input_ids, attention_mask, objective, *,
methods, options)`` (several from one pass); ``options`` is one frozen :class:`ScoreOptions` for both.

Dtypes: latents, latent gradients and scores are in the SAE's dtype (float32
for a half-precision model), ``Y`` in at least float32.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from gradsae import _files, oracle
from gradsae.checks import check_inputs
from gradsae.errors import GradSAEError
from gradsae.estimators import (
    ESTIMATORS,
    IG_STEPS,
    Baseline,
    path_gradient,
    relp_rules,
    removal,
    removal_effects,
)
from gradsae.models import LoadedModel, position_ids
from gradsae.objectives import NextTokenProb, Objective
from gradsae.sae import SAE
from gradsae.splice import Mode, SparseActs, resolve_layer, splice

Method = Literal["gradsae", "activation", "ablation", "random", "ig", "relp"]
METHODS: tuple[str, ...] = ("gradsae", "activation", "ablation", "random", *ESTIMATORS)
Aggregation = Literal["paper", "signed", "abs", "sum", "last"]
AGGREGATIONS: tuple[str, ...] = ("paper", "signed", "abs", "sum", "last")
DOT_CHUNK = 16384


@dataclass(frozen=True)
class Scores:
    """Latent scores for one batch of inputs."""

    method: str
    """``gradsae``, ``activation``, ``ablation`` or ``random``."""
    aggregation: str
    """How per-token scores became per-latent ones."""
    per_latent: torch.Tensor
    """``[batch, d_sae]`` aggregated score (0 for latents never active)."""
    token_index: torch.Tensor
    """``[nnz, 3]`` (batch, pos, latent) of each active entry; pairs with ``token_score``."""
    token_score: torch.Tensor
    """``[nnz]`` per-token score of each active entry (the activation for ``activation``)."""
    mean_act: torch.Tensor
    """``[batch, d_sae]`` mean activation over spliced positions."""
    last_act: torch.Tensor
    """``[batch, d_sae]`` activation at the last position."""
    active_last: torch.Tensor
    """``[batch]`` number of latents active at the last position."""
    objective: torch.Tensor
    """``[batch]`` objective value ``Y`` with the SAE spliced and no edits."""
    token: torch.Tensor | None = None
    """``[batch]`` greedy token ``y*`` the objective read (``NextTokenProb``), else ``None``."""

    def ranking(self, row: int) -> torch.Tensor:
        """Latents of ``row`` with a positive score, best first."""
        scores = self.per_latent[row]
        positive = torch.nonzero(scores > 0).squeeze(-1)
        order = scores[positive].argsort(descending=True, stable=True)
        return positive[order]

    def per_token(self) -> torch.Tensor:
        """Per-token scores as a sparse ``[batch, pos, d_sae]`` tensor."""
        batch, d_sae = self.per_latent.shape
        pos = int(self.token_index[:, 1].max()) + 1 if len(self.token_index) else 1
        return torch.sparse_coo_tensor(
            self.token_index.T, self.token_score, (batch, pos, d_sae), check_invariants=False
        )

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` + ``<path>.json``, each atomically (:mod:`gradsae._files`)."""
        path = Path(path)
        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        if self.token is not None:
            tensors["token"] = self.token.contiguous()
        with _files.atomic_path(path.with_suffix(".safetensors")) as tmp:
            save_file(tensors, str(tmp))
        meta = {"method": self.method, "aggregation": self.aggregation}
        _files.write_text(path.with_suffix(".json"), json.dumps(meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        tensors = load_file(str(path.with_suffix(".safetensors")))
        return cls(
            method=meta["method"],
            aggregation=meta["aggregation"],
            **{k: tensors[k] for k in _TENSORS},
            token=tensors.get("token"),
        )


_TENSORS = ("per_latent", "token_index", "token_score", "mean_act", "last_act", "active_last", "objective")


@dataclass(frozen=True)
class ScoreOptions:
    """How :func:`score_latents` and :func:`score_methods` splice, aggregate and estimate (shared by both)."""

    layer: int | None = None
    """Decoder block the SAE is spliced after; ``None``: the SAE's own ``hook_layer``."""
    mode: Mode = "error"
    """Splice mode: ``error`` (the output is exactly unchanged) or ``replace`` (the paper's)."""
    aggregation: Aggregation = "paper"
    """Per-token scores to per-latent ones: ``paper``, ``signed``, ``abs``, ``sum`` or ``last`` (module docstring)."""
    skip_first: bool = True
    """Leave each row's first real token unspliced (no latents, not counted in means); ``False``: the paper's code."""
    seed: int | Sequence[int] = 0
    """Seed of the ``random`` scores: one for the batch, or one per row (a row's scores then ignore its neighbours)."""
    ablation_batch: int = 32
    """Forwards batched together by the exact ``ablation`` and the estimators' interpolation steps."""
    ig_steps: int = IG_STEPS
    """Midpoint steps of integrated gradients (``ig``)."""
    baseline: Baseline | None = None
    """What a removed latent is set to (:mod:`gradsae.estimators`); ``None``: zero."""

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise GradSAEError(f"unknown aggregation {self.aggregation!r}: use one of {', '.join(AGGREGATIONS)}")


Inputs = Mapping[str, Any] | torch.Tensor
"""The tokenizer's output (``input_ids``, optional ``attention_mask``; left-padded), or ``input_ids`` alone."""


def score_latents(
    lm: LoadedModel,
    sae: SAE,
    inputs: Inputs,
    objective: Objective,
    *,
    method: Method = "gradsae",
    options: ScoreOptions = ScoreOptions(),
) -> Scores:
    """Score every latent for a batch of (left-padded) inputs with one ``method``; see the module docstring.

    ``inputs``: the tokenizer's output (a mapping with ``input_ids`` and optionally
    ``attention_mask``) or a ``[batch, pos]`` tensor of ids without padding.
    """
    input_ids, attention_mask = split_inputs(lm, inputs)
    return score_methods(lm, sae, input_ids, attention_mask, objective, methods=(method,), options=options)[method]


def split_inputs(lm: LoadedModel, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_ids, attention_mask)`` on the model's device from :data:`Inputs`."""
    if isinstance(inputs, torch.Tensor):
        ids, mask = inputs, None
    elif isinstance(inputs, Mapping) and "input_ids" in inputs:
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    else:
        raise GradSAEError(
            "score_latents(lm, sae, inputs, objective): inputs is the tokenizer's output (with input_ids) "
            "or a tensor of input_ids"
        )
    ids = torch.as_tensor(ids, device=lm.device)
    mask = None if mask is None else torch.as_tensor(mask, device=lm.device)
    return ids, mask


def score_methods(
    lm: LoadedModel,
    sae: SAE,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    objective: Objective,
    *,
    methods: Sequence[str],
    options: ScoreOptions = ScoreOptions(),
) -> dict[str, Scores]:
    """Several methods from one spliced forward (and one backward if ``gradsae`` is among them).

    ``ig`` and ``relp`` and any ``options.baseline`` but zero: :mod:`gradsae.estimators` (the same baseline
    for every estimator and the exact ``ablation``).
    """
    if not isinstance(objective, Objective):
        raise TypeError(
            f"objective must be one of gradsae.objectives' objectives (NextTokenProb, ...), not "
            f"{type(objective).__name__}: call score_latents(lm, sae, inputs, objective, options=ScoreOptions(...))"
        )
    if not isinstance(options, ScoreOptions):
        raise TypeError(f"options must be a ScoreOptions, not {type(options).__name__}")
    for method in methods:
        if method not in METHODS:
            raise GradSAEError(f"unknown scoring method {method!r}: use one of {', '.join(METHODS)}")
    check_inputs(lm, input_ids, attention_mask)
    relp_pass = "relp" in methods and "gradsae" not in methods  # RelP's rules leave the forward values as they are
    with relp_rules(lm) if relp_pass else nullcontext():
        run = forward_backward(
            lm,
            sae,
            input_ids,
            attention_mask,
            objective,
            layer=options.layer,
            mode=options.mode,
            grad="gradsae" in methods or relp_pass,
            skip_first=options.skip_first,
        )
    out = {}
    beyond = {"ig", "relp"} | (
        {"gradsae", "ablation"} if options.baseline is not None and not options.baseline.is_zero else set()
    )
    for method in methods:
        if method in beyond:
            out[method] = estimated(
                method,
                lm,
                sae,
                input_ids,
                attention_mask,
                objective,
                run,
                options,
                relp_grad=run.grad if relp_pass else None,
            )
            continue
        if method == "gradsae":
            out[method] = scores_from_gradient(sae, run, options.aggregation)
            continue
        if method == "activation":
            token_score, per_latent = run.values, run.mean_act
        elif method == "ablation":
            token_score = torch.zeros_like(run.values)
            per_latent = ablation_effects(
                lm,
                sae,
                input_ids,
                attention_mask,
                objective,
                run,
                layer=options.layer,
                mode=options.mode,
                batch_size=options.ablation_batch,
                skip_first=options.skip_first,
            )
        else:
            token_score, per_latent = torch.zeros_like(run.values), random_scores(run.mean_act, seed=options.seed)
        out[method] = _scores(method, options.aggregation, per_latent, token_score, run)
    return out


def estimated(
    method: str,
    lm: LoadedModel,
    sae: SAE,
    ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    objective: Objective,
    run: SplicedRun,
    options: ScoreOptions,
    *,
    relp_grad: torch.Tensor | None = None,
) -> Scores:
    """``ig``, ``relp``, or ``gradsae`` / ``ablation`` to a non-zero baseline (:mod:`gradsae.estimators`).

    ``relp_grad``: the RelP gradient when the main pass already ran under RelP's rules.
    """
    layer, mode, batch = resolve_layer(sae, options.layer), options.mode, options.ablation_batch
    aggregation, skip_first = options.aggregation, options.skip_first
    rem = removal(
        lm,
        sae,
        options.baseline or Baseline(),
        run.index,
        run.values,
        run.valid,
        attention_mask,
        layer=layer,
        mode=mode,
        skip_first=skip_first,
    )
    moved = replace(run, index=rem.index, values=rem.delta)
    pinned = [_pinned(objective, run.token, row) for row in range(ids.shape[0])]
    clean = SparseActs(index=run.index, values=run.values, shape=(*run.valid.shape, sae.cfg.d_sae))
    if method == "ablation":
        effects = removal_effects(
            lm, sae, ids, attention_mask, pinned, rem, clean, run.valid, layer=layer, mode=mode, batch=batch
        )
        return _scores(method, aggregation, effects, torch.zeros_like(rem.delta), moved)
    grad: torch.Tensor | None
    if method == "relp" and relp_grad is not None:
        grad = relp_grad  # the main pass ran under RelP's rules
    elif method == "relp":
        fixed = (
            objective.pinned(run.token) if isinstance(objective, NextTokenProb) and run.token is not None else objective
        )
        with relp_rules(lm):
            grad = forward_backward(
                lm, sae, ids, attention_mask, fixed, layer=layer, mode=mode, grad=True, skip_first=skip_first
            ).grad
    elif method == "ig":
        grad = path_gradient(
            lm,
            sae,
            ids,
            attention_mask,
            pinned,
            rem,
            clean,
            run.valid,
            layer=layer,
            mode=mode,
            steps=options.ig_steps,
            batch=batch,
        )
    else:
        grad = run.grad
    return replace(scores_from_gradient(sae, replace(moved, grad=grad), aggregation), method=method)


def scores_from_gradient(sae: SAE, run: SplicedRun, aggregation: str = "paper") -> Scores:
    """Steps 3-4 for a run that holds ``dY/dR``: GradSAE scores."""
    token_score = latent_gradients(sae, run.index, run.grad) * run.values
    per_latent = aggregate(run.index, token_score, run.valid, sae.cfg.d_sae, aggregation)
    return _scores("gradsae", aggregation, per_latent, token_score, run)


def _scores(
    method: str, aggregation: str, per_latent: torch.Tensor, token_score: torch.Tensor, run: SplicedRun
) -> Scores:
    return Scores(
        method=method,
        aggregation=aggregation if method == "gradsae" else "mean" if method == "activation" else "all",
        per_latent=per_latent,
        token_index=run.index,
        token_score=token_score,
        mean_act=run.mean_act,
        last_act=run.last_act,
        active_last=run.active_last,
        objective=run.objective,
        token=run.token,
    )


@dataclass(frozen=True)
class SplicedRun:
    """One forward (and optional backward) pass with the SAE spliced in."""

    objective: torch.Tensor
    """``[batch]``"""
    index: torch.Tensor
    """``[nnz, 3]`` active (batch, pos, latent) entries."""
    values: torch.Tensor
    """``[nnz]`` their activations."""
    valid: torch.Tensor
    """``[batch, pos]`` spliced positions."""
    mean_act: torch.Tensor
    """``[batch, d_sae]``"""
    last_act: torch.Tensor
    """``[batch, d_sae]``"""
    active_last: torch.Tensor
    """``[batch]``"""
    grad: torch.Tensor | None
    """``[batch, pos, d_model]`` ``dY/dR``, when asked for."""
    token: torch.Tensor | None = None
    """``[batch]`` greedy token ``y*`` a :class:`NextTokenProb` read in this run."""


def forward_backward(
    lm: LoadedModel,
    sae: SAE,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    objective: Objective,
    *,
    layer: int | None,
    mode: Mode,
    grad: bool,
    skip_first: bool = True,
) -> SplicedRun:
    """Steps 1-2: forward with the splice, then (if ``grad``) one backward to the splice.

    ``skip_first``: leave each row's first real token unspliced (see :func:`score_latents`).
    """
    with splice(lm, sae, layer, mode=mode, grad=grad, skip_first=skip_first) as sp, torch.set_grad_enabled(grad):
        logits = _logits(lm, input_ids, attention_mask, objective)
        y = objective(logits, input_ids)
        token = objective.token(logits) if isinstance(objective, NextTokenProb) else None
        if grad:
            y.sum().backward()
    grad_r = sp.leaves[0].grad if grad else None
    return spliced_run(sp.latents[0], sp.valid[0], y.detach(), grad_r, token)


def spliced_run(
    latents: SparseActs,
    valid: torch.Tensor,
    objective: torch.Tensor,
    grad: torch.Tensor | None,
    token: torch.Tensor | None,
) -> SplicedRun:
    """A :class:`SplicedRun` from one pass's latents (left-padded: each row's last input is column ``-1``)."""
    index, values = latents.index, latents.values
    batch, pos, d_sae = latents.shape
    flat = index[:, 0] * d_sae + index[:, 2]
    total = torch.zeros(batch * d_sae, dtype=values.dtype, device=values.device).index_add_(0, flat, values)
    is_last = index[:, 1] == pos - 1
    last = torch.zeros(batch * d_sae, dtype=values.dtype, device=values.device)
    last = last.index_add_(0, flat[is_last], values[is_last]).view(batch, d_sae)
    n_valid = valid.sum(dim=1).clamp(min=1)
    return SplicedRun(
        objective=objective,
        index=index,
        values=values,
        valid=valid,
        mean_act=total.view(batch, d_sae) / n_valid[:, None],
        last_act=last,
        active_last=(last > 0).sum(dim=-1),
        grad=grad,
        token=token,
    )


def objective_value(
    lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, objective: Objective
) -> torch.Tensor:
    """``Y [batch]``: one uncached forward, with the LM head only where the objective reads."""
    return objective(_logits(lm, input_ids, attention_mask, objective), input_ids)


def _logits(
    lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, objective: Objective
) -> torch.Tensor:
    """Logits of the last ``objective.keep`` positions from one uncached forward."""
    out = lm.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
        logits_to_keep=objective.keep or 0,
    )
    logits: torch.Tensor = out.logits
    return logits


def latent_gradients(sae: SAE, index: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """Step 3: ``dY/dH[b, n, c] = W_dec[c] . G[b, n]`` for each active entry, in chunks.

    The dot products run in at least float32 (``G`` of a half-precision model is upcast).
    """
    if grad is None:
        raise GradSAEError("no gradient was recorded: the objective may not depend on the spliced layer")
    w_dec = sae.W_dec.detach()
    dtype = torch.promote_types(torch.promote_types(grad.dtype, w_dec.dtype), torch.float32)
    out = torch.empty(len(index), dtype=dtype, device=grad.device)
    for start in range(0, len(index), DOT_CHUNK):
        b, n, c = index[start : start + DOT_CHUNK].unbind(dim=1)
        out[start : start + DOT_CHUNK] = (w_dec[c].to(dtype) * grad[b, n].to(dtype)).sum(dim=-1)
    return out


def aggregate(
    index: torch.Tensor, token_score: torch.Tensor, valid: torch.Tensor, d_sae: int, aggregation: str
) -> torch.Tensor:
    """Step 4: per-token scores ``[nnz]`` to per-latent ``[batch, d_sae]``."""
    batch, pos = valid.shape
    score = token_score
    if aggregation == "paper":
        score = score.clamp(min=0)
    elif aggregation == "abs":
        score = score.abs()
    elif aggregation == "last":
        score = torch.where(index[:, 1] == pos - 1, score, torch.zeros_like(score))
    flat = index[:, 0] * d_sae + index[:, 2]
    total = torch.zeros(batch * d_sae, dtype=score.dtype, device=score.device).index_add_(0, flat, score)
    total = total.view(batch, d_sae)
    if aggregation in ("paper", "signed", "abs"):
        total = total / valid.sum(dim=1).clamp(min=1)[:, None]
    return total


def ablation_effects(
    lm: LoadedModel,
    sae: SAE,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    objective: Objective,
    run: SplicedRun,
    *,
    layer: int | None,
    mode: Mode,
    batch_size: int,
    skip_first: bool = True,
) -> torch.Tensor:
    """Exact ``Y - Y(latent c zeroed at every spliced position)`` per active latent, ``[batch, d_sae]``.

    A :class:`NextTokenProb` is pinned to ``run.token``, the clean greedy token, so
    this is ``p_clean(y*) - p_edit(y*)``. Computed by :func:`gradsae.oracle.ablation_effects`
    (only the columns from each latent's first active one, on the clean KV cache).
    ``skip_first`` must match the run's (see :func:`score_latents`).
    """
    effects = torch.zeros_like(run.mean_act)
    layer = resolve_layer(sae, layer)
    for row in range(input_ids.shape[0]):
        latents = torch.nonzero(run.mean_act[row] > 0).squeeze(-1)
        if not len(latents):
            continue
        ids = input_ids[row : row + 1]
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask[row : row + 1]
        fixed = _pinned(objective, run.token, row)
        y = oracle.ablation_effects(
            lm, sae, ids, mask, fixed, latents, layer=layer, mode=mode, batch_size=batch_size, skip_first=skip_first
        )
        effects[row, latents] = y.to(effects.dtype)
    return effects


def _pinned(objective: Objective, token: torch.Tensor | None, row: int) -> Objective:
    """The objective with its greedy token held at ``token[row]`` (objectives with a fixed target as they are)."""
    if isinstance(objective, NextTokenProb) and token is not None:
        return objective.pinned(int(token[row]))
    return objective


def random_scores(mean_act: torch.Tensor, *, seed: int | Sequence[int]) -> torch.Tensor:
    """A seeded uniform score in (0, 1] for each latent active in the row, else 0.

    ``seed``: one seed for the whole ``[batch, d_sae]`` draw, or one per row (``batch`` of them).
    """
    if isinstance(seed, int):
        draw = torch.rand(mean_act.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    else:
        if len(seed) != mean_act.shape[0]:
            raise GradSAEError(f"random scores: {len(seed)} seeds for {mean_act.shape[0]} rows: pass one per row")
        rows = [
            torch.rand(mean_act.shape[1:], generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in seed
        ]
        draw = torch.stack(rows)
    noise = 1.0 - draw.to(mean_act.dtype)
    return torch.where(mean_act > 0, noise.to(mean_act.device), torch.zeros_like(mean_act))
