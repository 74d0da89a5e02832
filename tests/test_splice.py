"""The splice: error mode is exact, replace mode runs on the reconstruction, edits do what they say."""

from __future__ import annotations

import pytest
import torch

from gradsae.errors import GradSAEError
from gradsae.splice import Edit, splice
from tests.helpers import tiny_sae


def _logits(lm, ids, mask=None):
    with torch.no_grad():
        return lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _hook_count(lm) -> int:
    return sum(len(layer._forward_hooks) for layer in lm.layers) + len(lm.model._forward_pre_hooks)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_error_mode_leaves_logits_unchanged(lm, batch, activation):
    ids, mask = batch
    clean = _logits(lm, ids, mask)
    with splice(lm, tiny_sae(activation), 0, mode="error", skip_first=False) as sp:
        spliced = _logits(lm, ids, mask)
    assert torch.allclose(spliced, clean, atol=1e-5)
    assert (sp.acts[0] > 0).any()


@pytest.mark.parametrize("skip_first", [False, True])
def test_replace_mode_runs_on_reconstruction(lm, skip_first):
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    sae = tiny_sae("relu")

    def by_hand(_m, _i, out):
        new = sae(out)
        if skip_first:
            new[:, 0] = out[:, 0]
        return new

    handle = lm.layers[0].register_forward_hook(by_hand)
    try:
        reference = _logits(lm, ids)
    finally:
        handle.remove()
    with splice(lm, sae, 0, mode="replace", skip_first=skip_first):
        spliced = _logits(lm, ids)
    assert torch.allclose(spliced, reference, atol=1e-5)
    assert not torch.allclose(spliced, _logits(lm, ids), atol=1e-3)


def test_padding_and_first_token_are_not_spliced(lm, batch):
    ids, mask = batch
    with splice(lm, tiny_sae(), 0, mode="replace") as sp:
        _logits(lm, ids, mask)
    valid = sp.valid[0]
    assert valid[0].tolist() == [False] + [True] * 9
    assert valid[1].tolist() == [False] * 4 + [True] * 6
    assert (sp.acts[0][~valid] == 0).all()


def test_hooks_are_removed_also_on_error(lm, batch):
    before = _hook_count(lm)
    with splice(lm, tiny_sae(), 1):
        assert _hook_count(lm) == before + 2
    assert _hook_count(lm) == before
    with pytest.raises(RuntimeError, match="boom"), splice(lm, tiny_sae(), 1):
        raise RuntimeError("boom")
    assert _hook_count(lm) == before


def _acts_with(lm, ids, edit, mask=None):
    sae = tiny_sae("relu")
    with splice(lm, sae, 0, skip_first=False) as plain:
        _logits(lm, ids, mask)
    with splice(lm, sae, 0, edits=[edit], skip_first=False) as edited:
        _logits(lm, ids, mask)
    return plain.acts[0], edited.acts[0]


def test_zero_edit_at_all_positions(lm):
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    before, after = _acts_with(lm, ids, Edit(latents=[0, 5, 7]))
    assert (after[..., [0, 5, 7]] == 0).all()
    keep = [c for c in range(before.shape[-1]) if c not in (0, 5, 7)]
    assert torch.equal(after[..., keep], before[..., keep])


def test_set_and_add_at_last_position(lm):
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    before, after = _acts_with(
        lm, ids, Edit(latents=[3, 4], op="set", values=torch.tensor([2.0, 9.0]), positions="last")
    )
    assert after[:, -1, 3].eq(2.0).all() and after[:, -1, 4].eq(9.0).all()
    assert torch.equal(after[:, :-1], before[:, :-1])
    before, after = _acts_with(lm, ids, Edit(latents=[3], op="add", values=1.5, positions="last"))
    assert torch.allclose(after[:, -1, 3], before[:, -1, 3] + 1.5)


def test_per_row_latents_and_mask(lm):
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    where = torch.zeros(2, 6, dtype=torch.bool)
    where[0, 2] = True
    where[1, 4] = True
    edit = Edit(
        latents=torch.tensor([[1, -1], [2, 3]]), op="set", values=torch.tensor([[5.0, 0], [6.0, 7.0]]), positions=where
    )
    before, after = _acts_with(lm, ids, edit)
    assert after[0, 2, 1] == 5.0 and after[1, 4, 2] == 6.0 and after[1, 4, 3] == 7.0
    changed = (after != before).nonzero().tolist()
    assert {tuple(x) for x in changed} <= {(0, 2, 1), (1, 4, 2), (1, 4, 3)}


def test_padding_never_unsets_latent_zero(lm):
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    edit = Edit(latents=torch.tensor([[0] + [-1] * 20, [-1, 0, -1, 5] + [-1] * 17]), op="set", values=9.0)
    _, after = _acts_with(lm, ids, edit)
    assert (after[:, 1:, 0] == 9.0).all()
    assert (after[1, 1:, 5] == 9.0).all()


def test_edits_apply_at_every_cached_generation_step(lm):
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(5))
    sae = tiny_sae("relu")
    with splice(lm, sae, 0, edits=[Edit(latents=[0, 1, 2, 3], op="set", values=3.0, positions="last")]) as sp:
        out = lm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            do_sample=False,
            min_new_tokens=4,
            pad_token_id=0,
        )
    assert out.shape[1] == 9
    assert len(sp.acts) == 4  # prompt pass + 3 cached steps that feed a new token
    assert [a.shape[1] for a in sp.acts] == [5, 1, 1, 1]
    for acts in sp.acts:
        assert acts[:, -1, :4].eq(3.0).all()


def test_bad_edits_are_refused(lm):
    with pytest.raises(GradSAEError, match="unknown edit"):
        Edit(latents=[1], op="scale")  # type: ignore[arg-type]
    ids = torch.randint(3, 64, (1, 4))
    with pytest.raises(GradSAEError, match="out of range"), splice(lm, tiny_sae(), 0, edits=[Edit(latents=[999])]):
        _logits(lm, ids)
    with pytest.raises(GradSAEError, match="layer 5 is out of range"), splice(lm, tiny_sae(), 5):
        pass


@pytest.mark.parametrize("mode", ["error", "replace"])
def test_chunked_encoding_equals_one_chunk(lm, batch, mode):
    ids, mask = batch
    sae = tiny_sae("jumprelu")
    edit = Edit(latents=torch.tensor([[1, 2], [3, -1]]), op="set", values=4.0, positions="last")
    runs = []
    for chunk in (1 << 23, 3 * sae.cfg.d_sae, 1):
        with splice(lm, sae, 0, mode=mode, edits=[edit], chunk_elements=chunk) as sp:
            logits = _logits(lm, ids, mask)
        runs.append((logits, sp.acts[0], sp.latents[0].index))
    for logits, acts, index in runs[1:]:
        assert torch.allclose(logits, runs[0][0], atol=1e-6)
        assert torch.allclose(acts, runs[0][1], atol=1e-6)  # matmul blocking differs by rounding only
        assert len(index) == len(runs[0][2])
