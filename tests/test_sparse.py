"""Sparse codes equal the dense maths: encode, every edit (inactive latents too), decode, and the splice."""

from __future__ import annotations

import pytest
import torch

from gradsae import sparse
from gradsae.sae import SAE, SAEConfig
from gradsae.splice import Edit, apply_edits, splice
from tests.helpers import tiny_sae


def _dense_codes(h: torch.Tensor) -> sparse.Codes:
    rows, latents = torch.nonzero(h, as_tuple=True)
    return sparse.Codes(rows, latents, h[rows, latents], h.shape[0], h.shape[1])


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("budget", [1 << 23, 200, 7, 4])
def test_encode_equals_dense(activation, budget):
    sae = tiny_sae(activation, d_sae=48, dtype=torch.float64)
    x = torch.randn(13, 16, dtype=torch.float64)
    codes = sparse.encode(sae, x, budget=budget)
    dense = sae.encode(x)
    assert torch.equal(codes.keys, _dense_codes(dense).keys)
    assert torch.allclose(codes.to_dense(), dense, rtol=1e-12, atol=1e-12)


def test_wide_topk_in_blocks_equals_dense():
    cfg = SAEConfig(d_in=16, d_sae=40000, activation="topk", k=9)
    sae = SAE.random(cfg, seed=3).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    codes = sparse.encode(sae, x, budget=5 * 3000)  # 14 latent blocks
    assert torch.allclose(codes.to_dense(), sae.encode(x), rtol=1e-12, atol=1e-12)
    assert (torch.bincount(codes.rows) == 9).all()


@pytest.mark.parametrize("op", ["zero", "set", "add"])
def test_edit_equals_dense(op):
    sae = tiny_sae("relu", dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    h = sae.encode(x)
    active = torch.nonzero(h[0, 0]).flatten()
    inactive = torch.nonzero(h[0, 0] == 0).flatten()
    latents = torch.tensor([[int(active[0]), int(inactive[0]), -1, int(inactive[1])], [3, 3, 0, -1]])
    values = torch.tensor([[2.5, -1.0, 9.0, 4.0], [1.0, 7.0, 0.5, 3.0]], dtype=torch.float64)
    where = torch.rand(2, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    edit = Edit(latents=latents, op=op, values=values, positions=where)
    expected = apply_edits(h, [edit])
    codes = _dense_codes(h.reshape(10, -1))
    plan_tokens = torch.nonzero(where.reshape(-1)).flatten()
    from gradsae.splice import _latent_lists

    table, table_values = _latent_lists(edit, 2, 48, h)
    got = sparse.edit(codes, op, plan_tokens, table[plan_tokens // 5], table_values[plan_tokens // 5])
    assert torch.equal(got.to_dense(), expected.reshape(10, -1))
    assert (got.keys.diff() > 0).all()


def test_decode_and_difference_equal_dense():
    sae = tiny_sae("topk", dtype=torch.float64)
    x = torch.randn(7, 16, dtype=torch.float64)
    h = sae.encode(x)
    before = sparse.encode(sae, x)
    assert torch.allclose(sparse.decode(sae, before), sae.decode(h), rtol=1e-12, atol=1e-12)
    after = sparse.edit(before, "set", torch.tensor([2, 5]), torch.tensor([[1, 4], [0, -1]]), torch.ones(2, 2))
    change = sparse.difference(after, before)
    assert set(change.rows.tolist()) <= {2, 5}
    expected = sae.decode(after.to_dense()) - sae.decode(h)
    assert torch.allclose(sparse.decode(sae, change, bias=False), expected, atol=1e-12)


EDITS = [
    [],
    [Edit(latents=[0, 5, 7])],
    [Edit(latents=torch.tensor([[1, 30, -1], [2, 3, 40]]), op="set", values=torch.tensor([[5.0, 6.0, 0], [1, 2, 3]]))],
    [Edit(latents=[3, 11], op="add", values=1.5, positions="last")],
    [Edit(latents=[0, 1, 2], positions="last"), Edit(latents=[4, 9], op="set", values=2.0, positions="last")],
]


@pytest.mark.parametrize("mode", ["error", "replace"])
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("edits", range(len(EDITS)))
@pytest.mark.parametrize("skip_first", [True, False])
def test_sparse_splice_equals_dense(lm64, batch, mode, activation, edits, skip_first):
    sae = tiny_sae(activation, dtype=torch.float64)
    ids, mask = batch
    runs = []
    for use_sparse in (True, False):
        with (
            splice(lm64, sae, 0, mode=mode, edits=EDITS[edits], skip_first=skip_first, sparse=use_sparse) as sp,
            torch.no_grad(),
        ):
            logits = lm64.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        runs.append((logits, sp.latents[0]))
    (logits, acts), (ref_logits, ref_acts) = runs
    assert torch.allclose(logits, ref_logits, rtol=1e-10, atol=1e-10)
    assert torch.equal(acts.index, ref_acts.index)
    assert torch.allclose(acts.values, ref_acts.values, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("edits", range(len(EDITS)))
def test_unrecorded_error_splice_equals_dense_in_generation(lm64, edits):
    """Error mode without recording encodes only edited rows (none without edits): same logits, cached steps too."""
    sae = tiny_sae("topk", dtype=torch.float64)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(7))
    edit_list = [Edit(latents=e.latents, op=e.op, values=e.values, positions="last") for e in EDITS[edits]]
    outs = []
    for use_sparse in (True, False):
        with splice(lm64, sae, 0, edits=edit_list, record=False, sparse=use_sparse), torch.no_grad():
            out = lm64.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
        outs.append(torch.stack(out.logits))
    assert torch.allclose(outs[0], outs[1], rtol=1e-10, atol=1e-10)


def test_error_splice_without_edits_is_the_identity_bit_for_bit(lm, batch):
    ids, mask = batch
    with torch.no_grad():
        clean = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with splice(lm, tiny_sae("topk"), 0):
            spliced = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(spliced, clean)


def test_grad_through_the_splice_uses_the_dense_path(lm64, batch):
    """No leaf, grad on and a trainable SAE: autograd must see the reconstruction, as before."""
    sae = tiny_sae("relu", dtype=torch.float64)
    ids, mask = batch
    with splice(lm64, sae, 0) as sp:
        assert sp._differentiable(torch.zeros(1, 1, 16, dtype=torch.float64))
        logits = lm64.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logits[:, -1].sum().backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
