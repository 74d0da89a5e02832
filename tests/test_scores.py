"""GradSAE scores against independent computations: dense autograd, finite differences, exact ablation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gradsae.errors import GradSAEError
from gradsae.models import position_ids
from gradsae.objectives import CustomObjective, LabelLogProb, NextTokenProb, TargetLogProb
from gradsae.scores import ScoreOptions, score_latents, score_methods
from tests.helpers import tiny_sae


def dense_reference(lm, sae, ids, mask, objective, *, mode="error"):
    """Per-token H * dY/dH by autograd on a dense latent tensor (no shortcut)."""
    store = {}

    def hook(_m, _i, out):
        valid = torch.ones(out.shape[:2], dtype=torch.bool) if mask is None else mask.bool().clone()
        first = valid.int().argmax(dim=1)
        valid[torch.arange(len(first)), first] = False
        h = (sae.encode(out) * valid[..., None]).detach().requires_grad_(True)
        rec = sae.decode(h)
        if mode == "error":
            rec = rec + (out - sae.decode(sae.encode(out) * valid[..., None])).detach()
        store["h"], store["valid"] = h, valid
        return torch.where(valid[..., None], rec, out)

    handle = lm.layers[0].register_forward_hook(hook)
    try:
        logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
        objective(logits, ids).sum().backward()
    finally:
        handle.remove()
    return store["h"].detach() * store["h"].grad, store["h"].detach(), store["valid"]


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("mode", ["error", "replace"])
def test_gradsae_matches_dense_autograd(lm, batch, activation, mode):
    ids, mask = batch
    sae = tiny_sae(activation)
    objective = NextTokenProb()
    ref, h, valid = dense_reference(lm, sae, ids, mask, objective, mode=mode)
    scores = score_latents(
        lm,
        sae,
        {"input_ids": ids, "attention_mask": mask},
        objective,
        options=ScoreOptions(mode=mode, aggregation="signed"),
    )
    got = scores.per_token().to_dense()
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.equal(h != 0, got.abs() > 0) or (got.abs() > 0).sum() <= (h != 0).sum()
    n = valid.sum(1, keepdim=True)
    assert torch.allclose(scores.per_latent, ref.sum(1) / n, atol=1e-5)
    paper = score_latents(
        lm, sae, {"input_ids": ids, "attention_mask": mask}, objective, options=ScoreOptions(mode=mode)
    )
    assert torch.allclose(paper.per_latent, ref.clamp(min=0).sum(1) / n, atol=1e-5)


def test_aggregations(lm, batch):
    ids, mask = batch
    sae = tiny_sae("relu")
    ref, _, valid = dense_reference(lm, sae, ids, mask, NextTokenProb())
    n = valid.sum(1, keepdim=True)
    expect = {"abs": ref.abs().sum(1) / n, "sum": ref.sum(1), "last": ref[:, -1]}
    for name, value in expect.items():
        got = score_latents(
            lm, sae, {"input_ids": ids, "attention_mask": mask}, NextTokenProb(), options=ScoreOptions(aggregation=name)
        ).per_latent
        assert torch.allclose(got, value, atol=1e-5), name


def test_first_order_estimate_matches_finite_differences(lm64):
    """Scaling one latent at one token by (1 +- t): central difference = 2 t g[n, c]."""
    from gradsae.splice import Edit, splice

    sae = tiny_sae("relu", dtype=torch.float64)
    ids = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(7))
    objective = NextTokenProb()
    scores = score_latents(lm64, sae, ids, objective, options=ScoreOptions(aggregation="signed"))
    with splice(lm64, sae, 0) as sp, torch.no_grad():
        lm64.model(input_ids=ids, use_cache=False)
    acts = sp.acts[0]
    t = 1e-4
    for i in scores.token_score.abs().argsort(descending=True)[:12].tolist():
        b, n, c = scores.token_index[i].tolist()
        where = torch.zeros(1, 8, dtype=torch.bool)
        where[b, n] = True
        ys = []
        for sign in (1, -1):
            value = float(acts[b, n, c] * (1 + sign * t))
            edit = Edit(latents=[c], op="set", values=value, positions=where, extend=False)
            with splice(lm64, sae, 0, edits=[edit], record=False), torch.no_grad():
                ys.append(objective(lm64.model(input_ids=ids, use_cache=False).logits, ids).item())
        g = scores.token_score[i].item()
        assert abs((ys[0] - ys[1]) / (2 * t) - g) <= 1e-6 * abs(g)


def test_small_activations_gradient_equals_exact_ablation(lm64):
    """With tiny activations (error mode, so the output is unchanged), zeroing a latent is a first-order change."""
    sae = tiny_sae("relu", dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.mul_(1e-4)
        sae.b_enc.mul_(1e-4)
    ids = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(8))
    estimate = score_latents(lm64, sae, ids, NextTokenProb(), options=ScoreOptions(aggregation="sum")).per_latent
    exact = score_latents(lm64, sae, ids, NextTokenProb(), method="ablation").per_latent
    active = exact != 0
    assert active.sum() > 10
    scale = exact.abs().max().item()
    assert torch.allclose(estimate[active], exact[active], rtol=1e-3, atol=1e-3 * scale)


def _spliced_logits(lm, sae, ids, mask, mode, zero=None):
    """Last-position logits with ``sae`` spliced at layer 0 by a plain hook, latent ``zero`` zeroed."""

    def hook(_m, _i, out):
        valid = mask.bool().clone()
        valid[torch.arange(len(valid)), valid.int().argmax(dim=1)] = False
        h = sae.encode(out) * valid[..., None]
        edited = h.clone()
        if zero is not None:
            edited[..., zero] = 0
        new = sae.decode(edited) + (out - sae.decode(h) if mode == "error" else 0)
        return torch.where(valid[..., None], new, out)

    handle = lm.layers[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
    finally:
        handle.remove()


@pytest.mark.parametrize("mode", ["error", "replace"])
def test_ablation_holds_the_clean_greedy_token(lm, batch, mode):
    """``p_clean(y*) - p_edit(y*)`` with ``y*`` the clean argmax, also where zeroing flips the argmax."""
    ids, mask = batch
    sae = tiny_sae("relu")
    scores = score_latents(
        lm,
        sae,
        {"input_ids": ids, "attention_mask": mask},
        NextTokenProb(),
        method="ablation",
        options=ScoreOptions(mode=mode),
    )
    clean = _spliced_logits(lm, sae, ids, mask, mode)
    y_star = clean.argmax(-1)
    p_clean = clean.softmax(-1).gather(-1, y_star[:, None]).squeeze(-1)
    flipped = 0
    for row in range(2):
        for c in torch.nonzero(scores.mean_act[row] > 0).squeeze(-1).tolist():
            edited = _spliced_logits(lm, sae, ids, mask, mode, zero=c)
            expect = p_clean[row] - edited[row].softmax(-1)[y_star[row]]
            assert torch.allclose(scores.per_latent[row, c], expect, atol=1e-6), (row, c)
            flipped += int(edited[row].argmax() != y_star[row])
    if mode == "error":
        assert flipped > 0  # zeroing flips the argmax for some latents: the old code read the new argmax there
    assert torch.equal(scores.token, y_star)


def test_activation_and_random_baselines(lm, batch):
    ids, mask = batch
    sae = tiny_sae("relu")
    _, h, valid = dense_reference(lm, sae, ids, mask, NextTokenProb())
    act = score_latents(lm, sae, {"input_ids": ids, "attention_mask": mask}, NextTokenProb(), method="activation")
    assert torch.allclose(act.per_latent, h.sum(1) / valid.sum(1, keepdim=True), atol=1e-6)
    r1 = score_latents(
        lm,
        sae,
        {"input_ids": ids, "attention_mask": mask},
        NextTokenProb(),
        method="random",
        options=ScoreOptions(seed=3),
    )
    r2 = score_latents(
        lm,
        sae,
        {"input_ids": ids, "attention_mask": mask},
        NextTokenProb(),
        method="random",
        options=ScoreOptions(seed=3),
    )
    r3 = score_latents(
        lm,
        sae,
        {"input_ids": ids, "attention_mask": mask},
        NextTokenProb(),
        method="random",
        options=ScoreOptions(seed=4),
    )
    assert torch.equal(r1.per_latent, r2.per_latent) and not torch.equal(r1.per_latent, r3.per_latent)
    assert torch.equal(r1.per_latent > 0, act.per_latent > 0)


def test_scores_save_load(tmp_path, lm, batch):
    ids, mask = batch
    scores = score_latents(lm, tiny_sae(), {"input_ids": ids, "attention_mask": mask}, NextTokenProb())
    loaded = type(scores).load(scores.save(tmp_path / "s"))
    assert loaded.method == "gradsae" and torch.equal(loaded.per_latent, scores.per_latent)


def test_scores_save_is_atomic_for_both_files(tmp_path, lm, batch, monkeypatch):
    """A write that fails leaves the earlier ``.json`` and ``.safetensors`` whole and says so in one line."""
    import os

    from gradsae import _files
    from gradsae.errors import GradSAEError

    ids, mask = batch
    scores = score_latents(lm, tiny_sae(), {"input_ids": ids, "attention_mask": mask}, NextTokenProb())
    path = scores.save(tmp_path / "s")
    before = {suffix: path.with_suffix(suffix).read_bytes() for suffix in (".json", ".safetensors")}
    real = os.replace

    def full_disk(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(_files.os, "replace", full_disk)
    again = dataclasses.replace(scores, method="activation")
    with pytest.raises(GradSAEError, match=r"s\.json"):
        again.save(path)
    assert path.with_suffix(".json").read_bytes() == before[".json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_target_and_label_objectives_by_hand(lm, batch):
    ids, mask = batch
    with torch.no_grad():
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
    logp = logits.log_softmax(-1)
    by_hand = logp[0, -4, ids[0, -3]] + logp[0, -3, ids[0, -2]] + logp[0, -2, ids[0, -1]]
    assert torch.allclose(TargetLogProb(3)(logits, ids)[0], by_hand, atol=1e-5)
    kept = logits[:, -4:]
    assert torch.allclose(TargetLogProb(3)(kept, ids), TargetLogProb(3)(logits, ids), atol=1e-5)
    sub = logits[:, -1, [5, 9]].log_softmax(-1)
    assert torch.allclose(LabelLogProb((5, 9), target=(1, 0))(logits, ids), torch.stack([sub[0, 1], sub[1, 0]]))
    assert torch.allclose(CustomObjective(lambda x: x[:, -1, 3])(logits, ids), logits[:, -1, 3])
    scores = score_latents(lm, tiny_sae(), {"input_ids": ids, "attention_mask": mask}, TargetLogProb(3))
    assert scores.per_latent.abs().sum() > 0


def test_left_padding_gives_the_same_scores_as_one_row(lm, batch):
    ids, mask = batch
    sae = tiny_sae("topk")
    both = score_latents(lm, sae, {"input_ids": ids, "attention_mask": mask}, NextTokenProb())
    alone = score_latents(lm, sae, ids[1:, 3:], NextTokenProb())
    assert torch.allclose(both.per_latent[1], alone.per_latent[0], atol=1e-6)
    assert torch.allclose(both.objective[1], alone.objective[0], atol=1e-6)


def test_score_latents_takes_the_tokenizers_output(lm, batch):
    """``score_latents(lm, sae, enc, objective)`` equals ``score_methods`` on the tensors; bare ids mean no padding."""
    ids, mask = batch
    sae = tiny_sae("relu")
    options = ScoreOptions(layer=0)
    one = score_latents(lm, sae, {"input_ids": ids, "attention_mask": mask}, NextTokenProb(), options=options)
    two = score_methods(lm, sae, ids, mask, NextTokenProb(), methods=("gradsae",), options=options)["gradsae"]
    assert torch.equal(one.per_latent, two.per_latent)
    full = torch.ones_like(ids)
    bare = score_latents(lm, sae, ids, NextTokenProb(), options=options)
    unpadded = score_methods(lm, sae, ids, full, NextTokenProb(), methods=("gradsae",), options=options)["gradsae"]
    assert torch.equal(bare.per_latent, unpadded.per_latent)


def test_score_latents_refuses_the_old_calling_conventions(lm, batch):
    """One signature: ids + mask + objective as positionals, a mask in the objective's place, or the options as
    keywords fail at the call with a ``TypeError`` (the objective is no longer hidden in ``*args``)."""
    ids, mask = batch
    sae = tiny_sae("relu")
    with pytest.raises(TypeError, match="positional argument"):
        score_latents(lm, sae, ids, mask, NextTokenProb())  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="objective must be"):
        score_latents(lm, sae, ids, mask)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword argument 'layer'"):
        score_latents(lm, sae, {"input_ids": ids}, NextTokenProb(), layer=0)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="options must be a ScoreOptions"):
        score_methods(lm, sae, ids, mask, NextTokenProb(), methods=("gradsae",), options={"layer": 0})  # type: ignore[arg-type]


def test_score_options_are_frozen_and_checked():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ScoreOptions().layer = 1  # type: ignore[misc]
    with pytest.raises(GradSAEError, match="unknown aggregation"):
        ScoreOptions(aggregation="max")  # type: ignore[arg-type]
