"""Integrated gradients, RelP and removal baselines (gradsae.estimators) against independent computations.

Every reference here is computed a second way on the tiny float64 Llama: a dense
latent tensor with autograd and a Riemann sum by hand (IG), the relevance
conservation that RelP's rules must satisfy, and exact edits through the splice's
own sparse ``set``/``zero`` path (the oracle to a baseline).
"""

from __future__ import annotations

import pytest
import torch

from gradsae.errors import GradSAEError
from gradsae.estimators import Baseline, relp_rules
from gradsae.models import position_ids
from gradsae.objectives import CustomObjective, NextTokenProb
from gradsae.scores import ScoreOptions, score_methods
from gradsae.splice import Edit, splice
from tests.helpers import padded_batch, tiny_lm, tiny_sae

D_SAE = 48


@pytest.fixture(scope="module")
def model() -> tuple:
    return tiny_lm(dtype=torch.float64, layers=3), tiny_sae(dtype=torch.float64, layer=1)


def _y(lm, sae, ids, mask, objective, edits=(), layer=1, mode="error"):
    """``Y`` with ``edits`` applied through the splice, no grad."""
    with splice(lm, sae, layer, mode=mode, edits=list(edits), record=False), torch.no_grad():
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    return objective(out.logits, ids)


def _pinned(lm, sae, ids, mask, mode="error"):
    """``p(t*)`` at the last position with ``t*`` the spliced model's greedy token, per row."""
    logits_free = NextTokenProb()
    with splice(lm, sae, 1, mode=mode, record=False), torch.no_grad():
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    return logits_free.pinned(logits_free.token(out.logits))


def _all_latents(rows: int) -> Edit:
    return Edit(latents=torch.arange(D_SAE).expand(rows, -1), op="zero")


# -- integrated gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["error", "replace"])
def test_ig_completeness_shrinks_with_steps(model, mode) -> None:
    """``sum a = Y(H) - Y(B)`` up to the midpoint error, which falls about as 1/N^2."""
    lm, sae = model
    ids, mask = padded_batch()
    objective = _pinned(lm, sae, ids, mask, mode)
    clean = _y(lm, sae, ids, mask, objective, mode=mode)
    target = clean - _y(lm, sae, ids, mask, objective, [_all_latents(2)], mode=mode)
    gaps = []
    for steps in (2, 8, 32):
        options = {"aggregation": "sum", "ig_steps": steps, "mode": mode}
        ig = score_methods(lm, sae, ids, mask, objective, methods=("ig",), options=ScoreOptions(**options))["ig"]
        total = ig.per_latent.sum(dim=1)
        gaps.append((total - target).abs().max().item())
    scale = target.abs().max().item()
    assert scale > 1e-4
    assert gaps[2] < 1e-3 * scale  # the tolerance the docs state: 0.1% of |Y(H) - Y(B)| at 32 steps
    assert gaps[1] < gaps[0] / 8 and gaps[2] < gaps[1] / 8  # ~1/N^2 (16x per 4x steps)


def test_ig_equals_a_riemann_sum_by_hand(model) -> None:
    """Dense latents with autograd, one forward per step: ``H * mean_k dY/dH(alpha_k)`` equals the batched IG."""
    lm, sae = model
    ids, mask = padded_batch()
    objective = _pinned(lm, sae, ids, mask)
    steps = 5
    ig = score_methods(
        lm, sae, ids, mask, objective, methods=("ig",), options=ScoreOptions(aggregation="sum", ig_steps=steps)
    )["ig"]
    with splice(lm, sae, 1) as sp, torch.no_grad():
        lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    h = sp.acts[0]
    total = torch.zeros_like(h)
    for k in range(steps):
        alpha = (k + 0.5) / steps
        latent = (alpha * h).requires_grad_(True)

        def hook(_module, _inputs, output, latent=latent):
            z = output[0] if isinstance(output, tuple) else output
            moved = z + (latent - h) @ sae.W_dec
            return (moved, *output[1:]) if isinstance(output, tuple) else moved

        handle = lm.layers[1].register_forward_hook(hook)
        try:
            out = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
            objective(out.logits, ids).sum().backward()
        finally:
            handle.remove()
        total += latent.grad
    by_hand = (h * total / steps).sum(dim=1)
    torch.testing.assert_close(ig.per_latent, by_hand, atol=1e-12, rtol=1e-9)


def test_ig_steps_must_be_positive(model) -> None:
    lm, sae = model
    ids, mask = padded_batch()
    with pytest.raises(GradSAEError, match="at least one step"):
        score_methods(lm, sae, ids, mask, NextTokenProb(), methods=("ig",), options=ScoreOptions(ig_steps=0))


# -- RelP -----------------------------------------------------------------------------------------------
def _leaf_relevance(lm, sae, ids, mask, objective):
    """``(sum R * dY/dR, Y)`` at the splice's leaf, one row."""
    with splice(lm, sae, 1, grad=True) as sp:
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        y = objective(out.logits, ids)
        y.sum().backward()
    leaf = sp.leaves[0]
    return (leaf.detach() * leaf.grad).sum().item(), y.item(), out.logits.detach()


def test_relp_conserves_relevance_and_leaves_the_forward_alone(model) -> None:
    """Under RelP's rules ``sum_{n,d} R dY~/dR = logit_t`` exactly; the plain gradient does not conserve it."""
    lm, sae = model
    ids, mask = padded_batch()
    ids, mask = ids[:1], mask[:1]
    logit = CustomObjective(fn=lambda logits: logits[:, -1, 7], keep=1)
    with relp_rules(lm):
        relevance, y, logits_relp = _leaf_relevance(lm, sae, ids, mask, logit)
    plain, y_plain, logits_plain = _leaf_relevance(lm, sae, ids, mask, logit)
    assert torch.equal(logits_relp, logits_plain)  # forward values bit for bit
    assert relevance == pytest.approx(y, rel=1e-9, abs=1e-12)
    assert abs(plain - y_plain) > 1e-3 * abs(y_plain)  # the control: gradient x input alone does not conserve
    assert not hasattr(lm.layers[0].mlp, "forward") or "relp" not in lm.layers[0].mlp.forward.__qualname__


def test_relp_scores_are_delta_times_the_relp_gradient(model) -> None:
    """``relp`` per token = ``H W_dec . dY~/dR``, and it differs from the plain gradient's ``gradsae``."""
    lm, sae = model
    ids, mask = padded_batch()
    objective = _pinned(lm, sae, ids, mask)
    by = score_methods(
        lm, sae, ids, mask, objective, methods=("gradsae", "relp"), options=ScoreOptions(aggregation="sum")
    )
    with relp_rules(lm), splice(lm, sae, 1, grad=True) as sp:
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        objective(out.logits, ids).sum().backward()
    h = sp.acts[0]
    grad = sp.leaves[0].grad @ sae.W_dec.T  # dense dY~/dH
    torch.testing.assert_close(by["relp"].per_latent, (h * grad).sum(dim=1), atol=1e-12, rtol=1e-9)
    assert not torch.allclose(by["relp"].per_latent, by["gradsae"].per_latent)
    alone = score_methods(
        lm, sae, ids, mask, objective, methods=("relp", "activation"), options=ScoreOptions(aggregation="sum")
    )
    torch.testing.assert_close(alone["relp"].per_latent, by["relp"].per_latent, atol=1e-12, rtol=1e-9)  # one pass
    torch.testing.assert_close(alone["activation"].per_latent, by["gradsae"].mean_act, atol=0, rtol=0)


# -- baselines and the oracle ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["error", "replace"])
def test_zero_baseline_oracle_equals_the_sparse_ablation(model, mode) -> None:
    """The residual-shift oracle (a mean baseline of zeros goes through it) equals :func:`ablation_effects`."""
    lm, sae = model
    ids, mask = padded_batch()
    objective = _pinned(lm, sae, ids, mask, mode)
    old = score_methods(lm, sae, ids, mask, objective, methods=("ablation",), options=ScoreOptions(mode=mode))[
        "ablation"
    ]
    zeros = Baseline("mean", mean=torch.zeros(D_SAE))
    new = score_methods(
        lm, sae, ids, mask, objective, methods=("ablation",), options=ScoreOptions(baseline=zeros, mode=mode)
    )["ablation"]
    torch.testing.assert_close(new.per_latent, old.per_latent, atol=1e-12, rtol=1e-9)


def test_mean_baseline_oracle_equals_a_set_edit(model) -> None:
    """Removing ``c`` to its mean = the splice's ``set`` edit of ``c`` to ``m_c`` at every position."""
    lm, sae = model
    ids, mask = padded_batch()
    objective = _pinned(lm, sae, ids, mask)
    mean = torch.rand(D_SAE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    by = score_methods(
        lm, sae, ids, mask, objective, methods=("ablation",), options=ScoreOptions(baseline=Baseline("mean", mean=mean))
    )
    clean = _y(lm, sae, ids, mask, objective)
    for row in range(2):
        latents = torch.nonzero(by["ablation"].mean_act[row] > 0).squeeze(-1)[:6]
        for c in latents.tolist():
            edit = Edit(latents=[c], op="set", values=float(mean[c]))
            expected = clean[row] - _y(lm, sae, ids, mask, objective, [edit])[row]
            assert by["ablation"].per_latent[row, c].item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-14)


def test_counterfactual_baseline_oracle_equals_per_position_set_edits(model) -> None:
    """Removing ``c`` to the corrupted prompt's value = one ``set`` edit per position; corrupt-only latents count."""
    lm, sae = model
    ids, mask = padded_batch()
    corrupt = ids.clone()
    corrupt[:, 4:7] = torch.randint(3, 64, (2, 3), generator=torch.Generator().manual_seed(5))
    objective = _pinned(lm, sae, ids, mask)
    baseline = Baseline("counterfactual", corrupt_ids=corrupt)
    by = score_methods(
        lm, sae, ids, mask, objective, methods=("ablation", "gradsae"), options=ScoreOptions(baseline=baseline)
    )
    with splice(lm, sae, 1) as sp, torch.no_grad():
        lm.model(input_ids=corrupt, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    b = sp.acts[0]
    clean = _y(lm, sae, ids, mask, objective)
    only_corrupt = (b.gt(0).any(dim=1) & (by["ablation"].mean_act == 0)).nonzero()
    assert len(only_corrupt), "the corrupted prompt should use some latent the clean one does not"
    row = 0
    checked = torch.cat([torch.nonzero(by["ablation"].mean_act[row] > 0).squeeze(-1)[:4], only_corrupt[:2, 1]])
    for c in checked.tolist():
        edits = []
        for n in range(ids.shape[1]):
            where = torch.zeros_like(mask, dtype=torch.bool)
            where[:, n] = True
            edits.append(Edit(latents=[c], op="set", values=b[:, n, c][:, None], positions=where, extend=False))
        expected = clean[row] - _y(lm, sae, ids, mask, objective, edits)[row]
        assert by["ablation"].per_latent[row, c].item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-14)


def test_first_order_to_a_baseline_is_exact_in_the_linear_limit(model) -> None:
    """Shrinking ``W_dec`` by ``eps`` makes the removal small: first order / exact -> 1 with error ~ eps."""
    lm, _sae = model
    ids, mask = padded_batch()
    mean = torch.rand(D_SAE, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    errors = []
    for eps in (1e-1, 1e-2, 1e-3):
        small = tiny_sae(dtype=torch.float64, layer=1)
        with torch.no_grad():
            small.W_dec.mul_(eps)
        objective = _pinned(lm, small, ids, mask)
        by = score_methods(
            lm,
            small,
            ids,
            mask,
            objective,
            methods=("gradsae", "ig", "ablation"),
            options=ScoreOptions(aggregation="sum", baseline=Baseline("mean", mean=mean)),
        )
        exact = by["ablation"].per_latent
        errors.append([((by[m].per_latent - exact).norm() / exact.norm()).item() for m in ("gradsae", "ig")])
    assert errors[1][0] < errors[0][0] / 5  # first order: relative error ~ eps
    assert errors[1][1] < errors[0][1] / 5
    assert errors[2][0] < errors[1][0] / 5 and errors[2][0] < 0.05


def test_counterfactual_needs_the_same_length(model) -> None:
    lm, sae = model
    ids, mask = padded_batch()
    baseline = Baseline("counterfactual", corrupt_ids=ids[:, :-1])
    with pytest.raises(GradSAEError, match="same token length"):
        score_methods(
            lm, sae, ids, mask, NextTokenProb(), methods=("gradsae",), options=ScoreOptions(baseline=baseline)
        )


def test_baseline_refuses_unknown_kinds_and_missing_data() -> None:
    with pytest.raises(GradSAEError, match="unknown baseline"):
        Baseline("median")  # type: ignore[arg-type]
    with pytest.raises(GradSAEError, match="mean activations"):
        Baseline("mean")
    with pytest.raises(GradSAEError, match="corrupted prompt"):
        Baseline("counterfactual")
