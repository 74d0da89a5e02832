"""Estimators beyond first order, baselines for "removing" a latent, and every layer in one backward.

Notation (one row; the batch is independent rows): the SAE spliced at block ``l``,
``H [pos, d_sae]`` the clean latents at the spliced positions (0 elsewhere), ``R``
the residual after the splice (``Z`` in error mode; ``decode(H)`` at spliced
positions in replace mode), ``W_dec [d_sae, d_model]``, ``Y`` the objective with
the clean run's greedy token pinned (so every estimator and the oracle read the
same token).

Removal. A baseline ``B [pos, d_sae]`` says what a removed latent is set to:

* ``zero``: ``B = 0`` (the paper's and, until now, the only one);
* ``mean``: ``B[n, c] = m_c``, the latent's mean activation over the spliced
  tokens of a held-out corpus (:func:`mean_activations`; ``gradsae score
  --baseline mean`` takes 32 held-out news sequences of 128 tokens);
* ``counterfactual``: ``B[n, c]`` = the latent's value at position ``n`` of a
  corrupted prompt of the same token length (feature-circuits' patching); its
  objective can be :func:`logit_diff`, ``logit(clean answer) - logit(corrupted answer)``.

Removing latent ``c`` sets ``H[n, c] := B[n, c]`` at every spliced position ``n``.
In either splice mode that moves the residual by ``-Delta[:, c] W_dec[c]`` with
``Delta = H - B``: the error node (or, in replace mode, ``b_dec``) is unchanged.
The latents scored are those active at some spliced position of the clean run,
plus, for ``counterfactual``, those active in the corrupted run; a ``mean``
baseline scores the clean run's active latents only (setting a latent that never
fired to its mean is an edit of a latent the prompt does not use; scoring all
``d_sae`` of them would cost the oracle ``d_sae`` forwards). Every estimator and
the exact oracle use the same ``B`` and the same latents.

Estimators, each a per-entry score ``a[n, c]`` for the entries with ``Delta != 0``
(aggregated over positions exactly as GradSAE's are: ``paper`` mean of positive
parts, ``signed`` mean, ``sum`` sum, ...; the curves use ``sum``):

* first order (``gradsae`` / ``signed``): ``a = Delta[n, c] W_dec[c] . dY/dR(H)[n]``
  (with ``B = 0`` exactly the paper's ``H dY/dH``);
* ``ig``, integrated gradients (Sundararajan et al. 2017; the 10-step variant of
  feature-circuits, Marks et al. 2024) along the straight path from ``B`` to ``H``:
  ``R(alpha) = R - (1 - alpha) Delta W_dec``, midpoint rule with
  ``alpha_k = (k - 1/2) / N``, ``k = 1..N``::

      G_bar = (1/N) sum_k dY/dR(alpha_k),        a[n, c] = Delta[n, c] W_dec[c] . G_bar[n]

  Completeness: ``sum_{n,c} a = Y(R) - Y(R - Delta W_dec) + E_N`` with the midpoint
  error ``|E_N| <= sup|Y''| |Delta W_dec|^2 / (24 N^2)``: it falls as ``1/N^2``
  (tested). The ``N`` copies run blocks ``l+1..L`` only (the prefix is replayed,
  :mod:`gradsae.prefix`) as one batch of up to ``batch`` copies with one backward:
  cost ``N`` suffix forward+backward passes plus one prefix forward, i.e. at most
  ``N + 1`` model forward+backward equivalents;
  IG splits the removal of *all* latents at once among them; a single latent's
  removal is a different quantity, and on the tiny model IG is no closer to it
  than first order (both converge as the removal shrinks, tested);
* ``relp``, a RelP-style relevance propagation (arXiv 2508.21258; the rules below
  are this module's reading of it, not a port of the authors' code): one backward
  in which the model's nonlinearities follow layer-wise relevance rules instead
  of their Jacobians (the forward values are unchanged, bit for bit):

  - RMSNorm: the ``1 / rms(x)`` factor is held constant (LN rule);
  - the MLP's gate nonlinearity ``act(a)`` passes ``act(a) / a`` (identity rule);
  - the gated product ``act(a) * u`` sends half of the gradient through each
    factor (half rule);
  - attention: the attention pattern is held constant (``q`` and ``k`` detached),
    so gradient flows through the values only (AH rule).

  Under these rules every map from ``R`` to the logits is homogeneous of degree 1
  in the sense ``J~(x) x = f(x)``, so relevance is conserved: for the objective
  "logit of token t", ``sum_{n, d} R[n, d] dY~/dR[n, d] = logit_t`` (tested on a tiny
  Llama in float64, whose linear maps have no biases; a model with biases would
  leave their share out). ``a[n, c] = Delta[n, c] W_dec[c] . dY~/dR[n]``; the objective's
  own map from logits to ``Y`` (a softmax probability) keeps its true gradient.

Why RelP and not AtP*'s GradDrop (Kramár et al. 2024): GradDrop repeats the
backward once per later layer with that layer's gradient dropped (``L - l``
backwards: 15 at layer 15 of SmolLM2, more than ``ig`` at 10 steps) and returns
``|.|``-summed scores that no longer estimate a signed effect; RelP costs what the
plain gradient costs (one forward, one backward), and the paper reports it raising
attribution patching's correlation with activation patching on MLP outputs from
about 0.2 to 0.99 (issue 23's summary; not re-checked here). Both are corrections of
the same first-order estimate; RelP is the cheap one.

Every layer in one backward: :mod:`gradsae.multilayer`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from gradsae.errors import GradSAEError
from gradsae.models import LoadedModel, block_output, position_ids, with_block_output
from gradsae.objectives import CustomObjective, Objective
from gradsae.prefix import compute_prefix, replay_prefix
from gradsae.sae import SAE
from gradsae.splice import Mode, SparseActs, splice

BaselineKind = Literal["zero", "mean", "counterfactual"]
BASELINES: tuple[str, ...] = ("zero", "mean", "counterfactual")
ESTIMATORS: tuple[str, ...] = ("ig", "relp")
"""Estimators of this module (beside :mod:`gradsae.scores`' ``gradsae``, ``activation``, ``random``)."""
IG_STEPS = 10


@dataclass(frozen=True)
class Baseline:
    """What a removed latent is set to (module docstring)."""

    kind: BaselineKind = "zero"
    """``zero``, ``mean`` or ``counterfactual``."""
    mean: torch.Tensor | None = None
    """``[d_sae]`` mean activation per latent over a held-out corpus (``mean``)."""
    corrupt_ids: torch.Tensor | None = None
    """``[batch, pos]`` corrupted prompts, each the length of its clean row (``counterfactual``)."""

    def __post_init__(self) -> None:
        if self.kind not in BASELINES:
            raise GradSAEError(f"unknown baseline {self.kind!r}: use {', '.join(BASELINES)}")
        if self.kind == "mean" and self.mean is None:
            raise GradSAEError("a mean baseline needs the latents' mean activations: pass mean=[d_sae] (cards)")
        if self.kind == "counterfactual" and self.corrupt_ids is None:
            raise GradSAEError("a counterfactual baseline needs a corrupted prompt: pass --corrupt TEXT")

    @property
    def is_zero(self) -> bool:
        return self.kind == "zero"


@dataclass(frozen=True)
class Removal:
    """``Delta = H - B`` at the entries that are scored, sparse."""

    index: torch.Tensor
    """``[m, 3]`` (batch, pos, latent), row-major."""
    delta: torch.Tensor
    """``[m]`` ``H - B`` there."""
    candidates: torch.Tensor
    """``[batch, d_sae]`` bool: the latents that are scored (and that the oracle removes)."""


def dense_latents(index: torch.Tensor, values: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """``[batch, pos, d_sae]`` from sparse entries."""
    return SparseActs(index=index, values=values, shape=shape).to_dense()


def removal(
    lm: LoadedModel,
    sae: SAE,
    baseline: Baseline,
    index: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    layer: int,
    mode: Mode,
    skip_first: bool,
) -> Removal:
    """``Delta = H - B`` on the scored latents, from the clean run's sparse latents ``(index, values)``."""
    batch, pos = valid.shape
    d_sae = sae.cfg.d_sae
    candidates = torch.zeros(batch, d_sae, dtype=torch.bool, device=values.device)
    candidates[index[:, 0], index[:, 2]] = True
    if baseline.kind == "zero":
        return Removal(index=index, delta=values, candidates=candidates)
    h = dense_latents(index, values, (batch, pos, d_sae))
    if baseline.kind == "mean":
        assert baseline.mean is not None
        mean = torch.as_tensor(baseline.mean, dtype=h.dtype, device=h.device).reshape(-1)
        if len(mean) != d_sae:
            raise GradSAEError(f"the mean baseline has {len(mean)} latents, the SAE {d_sae}: use this SAE's cards")
        b = valid[:, :, None] * mean[None, None, :]
    else:
        b = corrupted_latents(lm, sae, baseline, attention_mask, valid, layer=layer, mode=mode, skip_first=skip_first)
        candidates = candidates | b.gt(0).any(dim=1)
    delta = (h - b) * candidates[:, None, :]
    found = torch.nonzero(delta)
    return Removal(index=found, delta=delta[found[:, 0], found[:, 1], found[:, 2]], candidates=candidates)


@torch.no_grad()
def corrupted_latents(
    lm: LoadedModel,
    sae: SAE,
    baseline: Baseline,
    attention_mask: torch.Tensor | None,
    valid: torch.Tensor,
    *,
    layer: int,
    mode: Mode,
    skip_first: bool,
) -> torch.Tensor:
    """``[batch, pos, d_sae]`` latents of the corrupted prompts at the clean run's spliced positions."""
    ids = torch.as_tensor(baseline.corrupt_ids, device=valid.device)
    if ids.shape != valid.shape:
        raise GradSAEError(
            f"the corrupted prompt has shape {tuple(ids.shape)}, the clean one {tuple(valid.shape)}: "
            "give a corrupted prompt of the same token length"
        )
    with splice(lm, sae, layer, mode=mode, skip_first=skip_first) as sp:
        lm.model(
            input_ids=ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
            logits_to_keep=1,
        )
    return sp.latents[0].to_dense() * valid[:, :, None]


def logit_diff(clean: int, corrupt: int) -> CustomObjective:
    """``Y = logit(clean) - logit(corrupt)`` at the last position (feature-circuits' metric)."""
    return CustomObjective(fn=partial(_logit_diff, clean=clean, corrupt=corrupt), keep=1)


def _logit_diff(logits: torch.Tensor, clean: int, corrupt: int) -> torch.Tensor:
    step = logits[:, -1].to(torch.promote_types(logits.dtype, torch.float32))
    return step[:, clean] - step[:, corrupt]


@torch.no_grad()
def mean_activations(lm: LoadedModel, sae: SAE, ids: torch.Tensor, *, layer: int, batch: int = 8) -> torch.Tensor:
    """``[d_sae]`` each latent's mean activation over the spliced tokens of ``ids`` ``[n, pos]`` (no padding)."""
    total = torch.zeros(sae.cfg.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    count = 0
    for start in range(0, ids.shape[0], batch):
        chunk = ids[start : start + batch]
        mask = torch.ones_like(chunk)
        with splice(lm, sae, layer) as sp:
            lm.model(input_ids=chunk, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=1)
        found = sp.latents[0]
        total.index_add_(0, found.index[:, 2], found.values.to(total.dtype))
        count += int(sp.valid[0].sum())
    return total / max(count, 1)


# -- residual shifts at the splice (IG path, exact removal to a baseline) ----------------------------
@contextmanager
def shifted_residual(lm: LoadedModel, layer: int, shift: torch.Tensor, *, leaf: bool) -> Iterator[list[torch.Tensor]]:
    """Block ``layer``'s output ``Z`` becomes ``Z + shift`` (``[copies, pos, d_model]``); a leaf if ``leaf``."""
    leaves: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        z = block_output(output)
        wide = torch.promote_types(z.dtype, shift.dtype)
        out = (z.to(wide) + shift.to(z.device, wide)).to(z.dtype)
        if leaf:
            out = out.detach().requires_grad_(True)
            leaves.append(out)
        return with_block_output(output, out)

    handle = lm.layers[layer].register_forward_hook(hook)
    try:
        yield leaves
    finally:
        handle.remove()


def _objective_value(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, objective: Objective) -> torch.Tensor:
    out = lm.model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids(mask),
        use_cache=False,
        logits_to_keep=objective.keep or 0,
    )
    return objective(out.logits, ids)


def _check_hook(sae: SAE) -> None:
    if sae.cfg.hook_point != "resid_post":
        raise GradSAEError(
            "integrated gradients and non-zero baselines need an SAE on a block's output (resid_post): "
            "use such an SAE (every shipped one is) or the first-order methods"
        )


def decoded_rows(index: torch.Tensor, values: torch.Tensor, row: int, pos: int, w_dec: torch.Tensor) -> torch.Tensor:
    """``[pos, d_model]`` ``sum_c v[n, c] W_dec[c]`` over the sparse entries of batch row ``row`` (no bias)."""
    take = index[:, 0] == row
    terms = values[take, None].to(w_dec.dtype) * w_dec[index[take, 2]]
    return torch.zeros(pos, w_dec.shape[1], dtype=w_dec.dtype, device=w_dec.device).index_add_(0, index[take, 1], terms)


def clean_shift(
    sae: SAE, z: torch.Tensor, clean: SparseActs, valid: torch.Tensor, row: int, mode: Mode
) -> torch.Tensor:
    """``R - Z`` of the unedited splice for one row ``[1, pos, d_model]``: 0 in error mode,
    ``decode(H) - Z`` at spliced positions in replace mode."""
    if mode == "error":
        return torch.zeros_like(z, dtype=sae.W_dec.dtype)
    w_dec = sae.W_dec.detach()
    decoded = decoded_rows(clean.index, clean.values, row, z.shape[1], w_dec) + sae.b_dec.detach()
    return torch.where(valid[row, :, None], decoded - z[0].to(decoded.dtype), torch.zeros_like(decoded))[None]


def _row_prefix(
    lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor | None, row: int, layer: int
) -> tuple[Any, torch.Tensor]:
    """One row's prefix (blocks ``0..layer``) and its mask."""
    ids_row = ids[row : row + 1]
    mask_row = torch.ones_like(ids_row) if mask is None else mask[row : row + 1]
    return compute_prefix(lm, ids_row, mask_row, layer), mask_row


def path_gradient(
    lm: LoadedModel,
    sae: SAE,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    objectives: Sequence[Objective],
    removal_: Removal,
    clean: SparseActs,
    valid: torch.Tensor,
    *,
    layer: int,
    mode: Mode,
    steps: int = IG_STEPS,
    batch: int = 16,
) -> torch.Tensor:
    """``G_bar [batch, pos, d_model]``: the mean of ``dY/dR`` at the midpoints of the path from ``B`` to ``H``.

    ``objectives[row]`` is row ``row``'s objective with its token pinned; ``clean`` the clean run's latents.
    """
    if steps < 1:
        raise GradSAEError(f"integrated gradients need at least one step, got --ig-steps {steps}")
    _check_hook(sae)
    w_dec = sae.W_dec.detach()
    pos = valid.shape[1]
    out = []
    for row in range(ids.shape[0]):
        prefix, mask_row = _row_prefix(lm, ids, mask, row, layer)
        base = clean_shift(sae, prefix.residual, clean, valid, row, mode)
        move = decoded_rows(removal_.index, removal_.delta, row, pos, w_dec)[None]  # Delta W_dec
        total = torch.zeros_like(move)
        alphas = (torch.arange(steps, dtype=move.dtype, device=move.device) + 0.5) / steps
        for start in range(0, steps, batch):
            part = alphas[start : start + batch]
            shift = base - (1 - part)[:, None, None] * move
            copies = prefix.expand(len(part))
            with replay_prefix(lm, copies), shifted_residual(lm, layer, shift, leaf=True) as leaves:
                y = _objective_value(lm, copies.input_ids, mask_row.expand(len(part), -1), objectives[row])
                y.sum().backward()
            grad = leaves[0].grad
            if grad is None:
                raise GradSAEError(f"no gradient reached layer {layer}: the objective may not depend on it")
            total += grad.to(total.dtype).sum(dim=0, keepdim=True)
        out.append(total / steps)
    return torch.cat(out)


@torch.no_grad()
def removal_effects(
    lm: LoadedModel,
    sae: SAE,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    objectives: Sequence[Objective],
    removal_: Removal,
    clean: SparseActs,
    valid: torch.Tensor,
    *,
    layer: int,
    mode: Mode,
    batch: int = 32,
) -> torch.Tensor:
    """Exact ``Y(H) - Y(H with latent c set to B[:, c])`` per scored latent, ``[batch, d_sae]``.

    Each forward holds ``batch`` removed latents and one copy with no shift (the clean ``Y`` from the same
    batched, prefix-replayed forward, as :func:`gradsae.scores.ablation_effects` does).
    """
    _check_hook(sae)
    w_dec = sae.W_dec.detach()
    pos, d_sae = valid.shape[1], sae.cfg.d_sae
    effects = torch.zeros(ids.shape[0], d_sae, dtype=w_dec.dtype, device=w_dec.device)
    for row in range(ids.shape[0]):
        latents = torch.nonzero(removal_.candidates[row]).squeeze(-1)
        if not len(latents):
            continue
        prefix, mask_row = _row_prefix(lm, ids, mask, row, layer)
        base = clean_shift(sae, prefix.residual, clean, valid, row, mode)
        take = removal_.index[:, 0] == row
        at, of, delta = removal_.index[take, 1], removal_.index[take, 2], removal_.delta[take]
        for start in range(0, len(latents), batch):
            chunk = latents[start : start + batch]
            slot = torch.full((d_sae,), -1, dtype=torch.long, device=chunk.device)
            slot[chunk] = torch.arange(len(chunk), device=chunk.device)
            sel = slot[of] >= 0
            moves = torch.zeros(len(chunk), pos, w_dec.shape[1], dtype=w_dec.dtype, device=w_dec.device)
            terms = delta[sel, None].to(w_dec.dtype) * w_dec[of[sel]]
            moves.index_put_((slot[of[sel]], at[sel]), terms, accumulate=True)
            shift = base - torch.cat([torch.zeros_like(moves[:1]), moves])
            copies = prefix.expand(len(chunk) + 1)
            with replay_prefix(lm, copies), shifted_residual(lm, layer, shift, leaf=False):
                y = _objective_value(lm, copies.input_ids, mask_row.expand(len(chunk) + 1, -1), objectives[row])
            effects[row, chunk] = (y[0] - y[1:]).to(effects.dtype)
    return effects


# -- RelP ---------------------------------------------------------------------------------------------
def _is_gated_mlp(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _relp_mlp(module: nn.Module) -> Any:
    """``down(act(gate x) * up x)`` with the identity rule on ``act`` and the half rule on the product."""

    gate, up, down, act_fn = (getattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))

    def forward(x: torch.Tensor) -> torch.Tensor:
        a = gate(x)
        u = up(x)
        act = act_fn(a)
        ratio = torch.where(a != 0, act / torch.where(a != 0, a, torch.ones_like(a)), torch.zeros_like(a)).detach()
        g = act.detach() + (a * ratio - (a * ratio).detach())  # value act(a), gradient act(a) / a
        product = 0.5 * (g * u.detach() + g.detach() * u)  # value g u, half the gradient to each factor
        out: torch.Tensor = down(product)
        return out

    return forward


def _relp_norm_hook(_module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """RMSNorm with ``1 / rms`` held: ``y = x * (y / x)`` with the ratio detached (exactly ``gain / rms``)."""
    x = inputs[0]
    ratio = torch.where(x != 0, output / torch.where(x != 0, x, torch.ones_like(x)), torch.zeros_like(x)).detach()
    linear = x * ratio
    return output.detach() + (linear - linear.detach())


def _detach_hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output.detach()


@contextmanager
def relp_rules(lm: LoadedModel) -> Iterator[None]:
    """Within the block, backward passes follow RelP's rules (module docstring); forward values are unchanged."""
    model = lm.model
    norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__]
    others = [m for m in model.modules() if "Norm" in type(m).__name__ and "RMSNorm" not in type(m).__name__]
    if others:
        raise GradSAEError(f"RelP here supports RMSNorm models; {type(model).__name__} has {type(others[0]).__name__}")
    mlps = [m for m in model.modules() if _is_gated_mlp(m)]
    qk = [getattr(m, name) for m in model.modules() for name in ("q_proj", "k_proj") if hasattr(m, name)]
    if not mlps or not qk:
        raise GradSAEError(f"RelP needs gated MLPs and q/k projections; {type(model).__name__} has none")
    with ExitStack() as stack:
        for norm in norms:
            stack.callback(norm.register_forward_hook(_relp_norm_hook).remove)
        for proj in qk:
            stack.callback(proj.register_forward_hook(_detach_hook).remove)
        for mlp in mlps:
            mlp.forward = _relp_mlp(mlp)  # type: ignore[method-assign]
            stack.callback(_restore_forward, mlp)
        yield


def _restore_forward(module: nn.Module) -> None:
    del module.forward
