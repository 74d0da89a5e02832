"""Scores that can be trusted: the clean greedy token, latent 0 in padded edits, float32 SAE maths, position 0."""

from __future__ import annotations

import pytest
import torch

from gradsae.errors import GradSAEError
from gradsae.models import block_output, position_ids
from gradsae.objectives import NextTokenProb, TargetLogProb
from gradsae.pretrained import resolve_sae
from gradsae.sae_formats import save_sae
from gradsae.scores import ScoreOptions, Scores, score_latents, score_methods
from gradsae.splice import Edit, apply_edits, splice
from tests.helpers import tiny_lm, tiny_sae


def _first_real(mask: torch.Tensor) -> torch.Tensor:
    return mask.int().argmax(dim=1)


def _valid(out: torch.Tensor, mask: torch.Tensor | None, skip_first: bool) -> torch.Tensor:
    valid = torch.ones(out.shape[:2], dtype=torch.bool) if mask is None else mask.bool().clone()
    if skip_first:
        valid[torch.arange(len(valid)), _first_real(valid)] = False
    return valid


def dense_reference(lm, sae, ids, mask, objective, *, skip_first=True, mode="error"):
    """Per-token ``H * dY/dH`` by autograd on a dense float32 latent tensor; also ``H`` and the spliced positions."""
    store = {}

    def hook(_m, _i, out):
        valid = _valid(out, mask, skip_first)
        h0 = sae.encode(out.float()) * valid[..., None]
        h = h0.detach().requires_grad_(True)
        rec = sae.decode(h)
        if mode == "error":
            rec = rec + (out.float() - sae.decode(h0)).detach()
        store["h"], store["valid"] = h, valid
        return torch.where(valid[..., None], rec.to(out.dtype), out)

    handle = lm.layers[0].register_forward_hook(hook)
    try:
        logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
        objective(logits, ids).sum().backward()
    finally:
        handle.remove()
    return store["h"].detach() * store["h"].grad, store["h"].detach(), store["valid"]


def _last_logits(lm, ids, mask, hook=None):
    handle = lm.layers[0].register_forward_hook(hook) if hook else None
    try:
        with torch.no_grad():
            return lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
    finally:
        if handle:
            handle.remove()


# -- 1. the objective reads the clean run's greedy token ----------------------------------
def test_pinned_next_token_prob_reads_the_given_token(lm, batch):
    ids, mask = batch
    with torch.no_grad():
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
    probs = logits[:, -2].softmax(-1)
    plain = NextTokenProb(position=-2)
    assert torch.equal(plain.token(logits), probs.argmax(-1))
    pinned = plain.pinned(torch.tensor([5, 9]))
    assert pinned.tokens == (5, 9) and pinned.position == -2
    assert torch.allclose(pinned(logits, ids), probs[[0, 1], [5, 9]])
    shared = NextTokenProb(log=True).pinned(7)
    assert torch.allclose(shared(logits, ids), logits[:, -1].log_softmax(-1)[:, 7])
    with pytest.raises(GradSAEError, match="one per row"):
        NextTokenProb(tokens=(1, 2, 3))(logits, ids)


def test_scores_record_the_greedy_token(tmp_path, lm, batch):
    ids, mask = batch
    sae = tiny_sae("relu")
    with splice(lm, sae, 0):
        greedy = _last_logits(lm, ids, mask).argmax(-1)
    by_method = score_methods(lm, sae, ids, mask, NextTokenProb(), methods=("gradsae", "ablation"))
    for scores in by_method.values():
        assert torch.equal(scores.token, greedy)
    loaded = Scores.load(by_method["gradsae"].save(tmp_path / "s"))
    assert torch.equal(loaded.token, greedy)
    target = score_latents(lm, sae, {"input_ids": ids, "attention_mask": mask}, TargetLogProb(2))
    assert target.token is None and Scores.load(target.save(tmp_path / "t")).token is None


# -- 2. padding never hides latent 0 --------------------------------------------------------
@pytest.mark.parametrize("latents", [[[0, -1], [-1, 0]], [[-1, 0], [0, -1]]])
def test_padded_edit_rows_reach_latent_zero(latents):
    h = torch.rand(2, 3, 8) + 0.5
    zeroed = apply_edits(h, [Edit(latents=torch.tensor(latents))])
    assert (zeroed[..., 0] == 0).all() and torch.equal(zeroed[..., 1:], h[..., 1:])
    values = torch.where(torch.tensor(latents) == 0, 4.0, 99.0)
    set_ = apply_edits(h, [Edit(latents=torch.tensor(latents), op="set", values=values)])
    assert (set_[..., 0] == 4.0).all() and torch.equal(set_[..., 1:], h[..., 1:])
    added = apply_edits(h, [Edit(latents=torch.tensor(latents), op="add", values=values)])
    assert torch.allclose(added[..., 0], h[..., 0] + 4.0) and torch.equal(added[..., 1:], h[..., 1:])


def test_padded_edit_rows_zero_latent_zero_in_the_splice(lm, batch):
    ids, mask = batch
    sae = tiny_sae("relu")
    with torch.no_grad():
        sae.b_enc[0] = 5.0  # latent 0 fires everywhere
    with splice(lm, sae, 0, edits=[Edit(latents=torch.tensor([[0, -1], [-1, 0]]))]) as sp:
        _last_logits(lm, ids, mask)
    acts = sp.acts[0]
    assert (acts[..., 0] == 0).all() and (acts[..., 1:] != 0).any()


# -- 3. float32 SAE maths on a half-precision model -------------------------------------------
@pytest.fixture
def lm16():
    return tiny_lm(torch.bfloat16)


def _resolved(lm, sae, tmp_path):
    """``sae`` saved and loaded back through the CLI's path (:func:`resolve_sae`)."""
    resolved, layer, _ = resolve_sae(lm, str(save_sae(sae, tmp_path / "sae")), 0, default_model=False)
    assert layer == 0
    return resolved


def test_resolve_sae_keeps_float32(lm16, tmp_path):
    stored = _resolved(lm16, tiny_sae().to(torch.bfloat16), tmp_path)
    assert stored.W_enc.dtype == torch.float32
    random, _, _ = resolve_sae(lm16, None, 1, default_model=False)
    assert random.W_dec.dtype == torch.float32


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_error_mode_without_edits_is_bit_exact(batch, tmp_path, activation, dtype):
    ids, mask = batch
    lm = tiny_lm(dtype)
    sae = _resolved(lm, tiny_sae(activation), tmp_path)
    with torch.no_grad():
        clean = lm.model(input_ids=ids, attention_mask=mask).logits
        with splice(lm, sae, 0, skip_first=False) as sp:
            spliced = lm.model(input_ids=ids, attention_mask=mask).logits
        with splice(lm, sae, 0, edits=[Edit(latents=torch.tensor([[-1], [-1]]))]):
            padded_only = lm.model(input_ids=ids, attention_mask=mask).logits
    assert spliced.dtype == dtype and torch.equal(spliced, clean) and torch.equal(padded_only, clean)
    assert (sp.acts[0] > 0).any()


def test_topk_selects_in_float32_on_a_bf16_model(lm16, batch, tmp_path):
    ids, mask = batch
    sae32 = tiny_sae("topk", d_sae=512)
    sae = _resolved(lm16, sae32, tmp_path)
    residual = {}

    def keep(_m, _i, out):
        residual["z"] = block_output(out)

    handle = lm16.layers[0].register_forward_hook(keep)
    try:
        with splice(lm16, sae, 0, skip_first=False) as sp, torch.no_grad():
            lm16.model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    assert residual["z"].dtype == torch.bfloat16
    with torch.no_grad():
        expect = sae32.encode(residual["z"].float()) * mask.bool()[..., None]
    got = sp.acts[0]
    assert torch.equal(got != 0, expect != 0)
    assert torch.allclose(got.float(), expect, rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.float32


def test_gradsae_on_a_bf16_model_is_float32(lm16, batch, tmp_path):
    ids, mask = batch
    sae32 = tiny_sae("jumprelu")
    sae = _resolved(lm16, sae32, tmp_path)
    ref, h, valid = dense_reference(lm16, sae32, ids, mask, NextTokenProb())
    scores = score_latents(
        lm16,
        sae,
        {"input_ids": ids, "attention_mask": mask},
        NextTokenProb(),
        options=ScoreOptions(aggregation="signed"),
    )
    got = scores.per_token().to_dense().float()
    scale = ref.abs().max()
    assert scale > 0 and torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * scale)  # bf16 dot products: ~1e-2
    assert torch.allclose(scores.mean_act.float(), h.sum(1) / valid.sum(1, keepdim=True), rtol=1e-6, atol=1e-6)
    assert scores.per_latent.dtype == torch.float32 and scores.token_score.dtype == torch.float32
    assert scores.mean_act.dtype == torch.float32 and scores.objective.dtype == torch.float32


def test_set_values_stay_float32_on_a_bf16_model(lm16, batch):
    ids, mask = batch
    sae = tiny_sae("relu")
    with splice(lm16, sae, 0, edits=[Edit(latents=[3], op="set", values=1.001, positions="last")]) as sp:
        _last_logits(lm16, ids, mask)
    assert (sp.acts[0][:, -1, 3] == torch.tensor(1.001)).all()


# -- 4. position 0 can be spliced and scored ------------------------------------------------------
@pytest.mark.parametrize("skip_first", [True, False])
@pytest.mark.parametrize("mode", ["error", "replace"])
def test_skip_first_switches_position_zero(lm, batch, skip_first, mode):
    ids, mask = batch
    sae = tiny_sae("relu")
    ref, h, valid = dense_reference(lm, sae, ids, mask, NextTokenProb(), skip_first=skip_first, mode=mode)
    signed = score_latents(
        lm,
        sae,
        {"input_ids": ids, "attention_mask": mask},
        NextTokenProb(),
        options=ScoreOptions(mode=mode, aggregation="signed", skip_first=skip_first),
    )
    assert torch.allclose(signed.per_token().to_dense(), ref, atol=1e-5)
    n = valid.sum(1, keepdim=True)
    assert n.squeeze(1).tolist() == ([9, 6] if skip_first else [10, 7])
    assert torch.allclose(signed.per_latent, ref.sum(1) / n, atol=1e-5)
    activation = score_latents(
        lm,
        sae,
        {"input_ids": ids, "attention_mask": mask},
        NextTokenProb(),
        method="activation",
        options=ScoreOptions(skip_first=skip_first),
    )
    assert torch.allclose(activation.mean_act, h.sum(1) / n, atol=1e-6)
    first = _first_real(mask)
    at_first = (signed.token_index[:, 1] == first[signed.token_index[:, 0]]).any()
    assert bool(at_first) is not skip_first


@pytest.mark.parametrize("skip_first", [True, False])
def test_ablation_with_skip_first(lm, batch, skip_first):
    ids, mask = batch
    sae = tiny_sae("topk")
    scores = score_latents(
        lm,
        sae,
        {"input_ids": ids, "attention_mask": mask},
        NextTokenProb(),
        method="ablation",
        options=ScoreOptions(skip_first=skip_first),
    )

    def zeroing(c):
        def hook(_m, _i, out):
            valid = _valid(out, mask, skip_first)
            h = sae.encode(out) * valid[..., None]
            edited = h.clone()
            if c is not None:
                edited[..., c] = 0
            return torch.where(valid[..., None], sae.decode(edited) + (out - sae.decode(h)), out)

        return hook

    clean = _last_logits(lm, ids, mask, zeroing(None)).softmax(-1)
    y_star = clean.argmax(-1)
    for row in range(2):
        active = torch.nonzero(scores.mean_act[row] > 0).squeeze(-1).tolist()
        assert active
        for c in active[:4]:
            edited = _last_logits(lm, ids, mask, zeroing(c)).softmax(-1)
            expect = clean[row, y_star[row]] - edited[row, y_star[row]]
            assert torch.allclose(scores.per_latent[row, c], expect, atol=1e-6), (row, c)
