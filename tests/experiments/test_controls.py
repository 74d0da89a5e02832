"""The activation controls (answer position only; sink-excluded) and the removed residual norm, by hand."""

from __future__ import annotations

import pytest
import torch

from gradsae.experiments.controls import ANSWER, CONTROLS, NOSINK, control_scores, mean_over, spliced_positions
from gradsae.experiments.run import run_layer
from gradsae.models import position_ids
from gradsae.objectives import NextTokenProb
from gradsae.scores import ScoreOptions, score_methods
from gradsae.splice import splice
from tests.experiments.test_run import _cfg, _half_right_task
from tests.helpers import char_lm, padded_batch, tiny_lm, tiny_sae


@pytest.fixture(scope="module")
def setup():
    lm = tiny_lm(torch.float64, seed=1)
    sae = tiny_sae("relu", d_sae=8, seed=3, dtype=torch.float64, layer=0)
    ids, mask = padded_batch()
    by = score_methods(lm, sae, ids, mask, NextTokenProb(), methods=["activation"], options=ScoreOptions(layer=0))
    seen = []
    block = lm.model.model.layers[0]
    hook = block.register_forward_hook(lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with splice(lm, sae, 0, mode="error", record=True) as sp, torch.no_grad():
            lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    finally:
        hook.remove()
    dense = sp.latents[0].to_dense()  # [batch, pos, d_sae]
    return by["activation"], dense, sp.valid[0], seen[0].detach(), mask  # block 0's output, before the splice


def test_mean_over_every_spliced_position_is_the_activation_score(setup):
    activation, _, valid, _, mask = setup
    assert torch.equal(spliced_positions(mask, skip_first=True), valid)
    assert torch.allclose(mean_over(activation, valid), activation.mean_act, atol=1e-12)


def test_answer_position_control_is_the_last_activation(setup):
    activation, dense, *_ = setup
    out = control_scores(activation, ANSWER)
    assert out.method == ANSWER
    assert torch.allclose(out.per_latent, dense[:, -1], atol=1e-12)
    assert torch.equal(out.mean_act, activation.mean_act)  # donor values and the rest unchanged


@pytest.mark.parametrize("factor", [1.0, 1.5, 10.0])
def test_sink_excluded_control_by_hand(setup, factor):
    activation, dense, valid, residual, mask = setup
    out = control_scores(activation, NOSINK, residual=residual, mask=mask, factor=factor)
    for row in range(dense.shape[0]):
        norms = [float(residual[row, n].norm()) for n in range(dense.shape[1])]
        spliced = [n for n in range(dense.shape[1]) if valid[row, n]]
        median = torch.tensor([norms[n] for n in spliced], dtype=torch.float64).median().item()
        kept = [n for n in spliced if norms[n] < factor * median]
        if factor == 1.0:
            assert 0 < len(kept) < len(spliced)  # the hand check excludes something
        hand = sum(dense[row, n] for n in kept) / max(1, len(kept))
        assert torch.allclose(out.per_latent[row], hand, atol=1e-12)


def test_run_with_controls_ranks_masks_and_records_the_removed_norm():
    lm, sae = char_lm(seed=4), tiny_sae("topk", d_sae=48, seed=2)
    cfg = _cfg(methods=("gradsae", "activation", "random", *CONTROLS), ks=(1, 3), steer_positions=("last",))
    task, _ = _half_right_task(lm, sae, cfg)
    result = run_layer(lm, sae, task, cfg)
    top = {(c.method, c.k): c for c in result.perturbation if c.set == "top"}
    assert {m for m, _ in top} == {"gradsae", "activation", "random", *CONTROLS}
    for c in result.perturbation:
        if c.edit == "none":
            continue
        assert c.removed_norm is not None and c.removed_norm > 0
        assert c.k_min is not None and c.k_min <= c.mean_k <= c.k_max
    assert top["activation", "3"].removed_norm >= top["activation", "1"].removed_norm


def test_removed_norm_by_hand():
    from gradsae.experiments.rank import KeptExample
    from gradsae.tasks import Example

    ex = KeptExample(
        example=Example(id="0", prompt="p", answers=("a",)),
        generation=None,  # type: ignore[arg-type]
        step=0,
        rankings={},
        active_last=2,
        decoded_norm={3: 0.5, 7: 2.0},
    )
    assert ex.removed_norm([3, 7, 9]) == 2.5
