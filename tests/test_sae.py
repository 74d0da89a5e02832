"""SAE maths and files: formats round-trip bit for bit; bad files are refused clearly."""

from __future__ import annotations

import json

import pytest
import torch

from gradsae import sparse
from gradsae.errors import GradSAEError
from gradsae.sae import SAE, SAEConfig, check_compatible
from gradsae.sae_formats import load_sae, save_gemmascope, save_sae, save_sparsify
from tests.helpers import D_MODEL, tiny_sae


def _same(a: SAE, b: SAE) -> None:
    assert a.cfg.activation == b.cfg.activation and a.cfg.k == b.cfg.k
    assert a.cfg.apply_b_dec_to_input == b.cfg.apply_b_dec_to_input
    for key, value in a.state().items():
        assert torch.equal(value, b.state()[key]), key


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_saelens_round_trip(tmp_path, activation):
    sae = tiny_sae(activation, layer=1)
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    _same(sae, loaded)
    assert loaded.cfg.hook_layer == 1
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == D_MODEL and cfg["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["architecture"] == {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[activation]


def test_fp16_round_trip(tmp_path):
    sae = tiny_sae("topk").half()
    loaded = load_sae(save_sae(sae, tmp_path / "sae", dtype=torch.float16))
    assert loaded.W_enc.dtype == torch.float32  # cfg.json's compute dtype; the file holds the fp16 values
    _same(sae.float(), loaded)


def test_sparsify_round_trip(tmp_path):
    sae = SAE.random(SAEConfig(d_in=D_MODEL, d_sae=32, activation="topk", k=4, apply_b_dec_to_input=True))
    _same(sae, load_sae(save_sparsify(sae, tmp_path / "sp")))


def test_gemmascope_round_trip(tmp_path):
    sae = tiny_sae("jumprelu")
    folder = save_gemmascope(sae, tmp_path / "layer_3" / "width_16k")
    loaded = load_sae(folder / "params.npz")
    _same(sae, loaded)
    assert loaded.cfg.hook_layer == 3


def test_saelens_legacy_log_threshold(tmp_path):
    from safetensors.torch import save_file

    sae = tiny_sae("jumprelu")
    save_sae(sae, tmp_path)
    state = sae.state()
    state["log_threshold"] = state.pop("threshold").clamp(min=1e-3).log()
    save_file(state, str(tmp_path / "sae_weights.safetensors"))
    assert torch.allclose(load_sae(tmp_path).threshold, sae.threshold.clamp(min=1e-3), atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_encode_decode_by_hand(activation):
    sae = tiny_sae(activation)
    x = torch.randn(5, D_MODEL)
    pre = x @ sae.W_enc + sae.b_enc
    if activation == "relu":
        h = pre.clamp(min=0)
    elif activation == "jumprelu":
        h = torch.where(pre > sae.threshold, pre, torch.zeros_like(pre))
    else:
        h = torch.zeros_like(pre)
        for i in range(5):
            top = pre[i].topk(6).indices
            h[i, top] = pre[i, top].clamp(min=0)
    assert torch.allclose(sae.encode(x), h, atol=1e-6)
    assert torch.allclose(sae(x), h @ sae.W_dec + sae.b_dec, atol=1e-5)


def test_jumprelu_with_negative_thresholds_matches_saelens():
    """SAELens: ``relu(pre) * (pre > threshold)``; a negative threshold must not let a negative ``pre`` through."""
    sae = tiny_sae("jumprelu")
    with torch.no_grad():
        sae.threshold.copy_(-torch.rand(sae.cfg.d_sae) - 0.1)
    x = torch.randn(7, D_MODEL)
    pre = x @ sae.W_enc + sae.b_enc
    thresholds = sae.threshold.tolist()
    rows = pre.tolist()
    h = torch.tensor([[p if p > max(t, 0.0) else 0.0 for p, t in zip(row, thresholds, strict=True)] for row in rows])
    assert bool((pre < 0).any()) and bool(((pre < 0) & (pre > sae.threshold)).any())  # the case that differs
    assert torch.allclose(sae.encode(x), h, atol=1e-6)
    codes = sparse.encode(sae, x)
    dense = torch.zeros_like(h)
    dense[codes.rows, codes.latents] = codes.values
    assert torch.allclose(dense, h, atol=1e-6)


def test_corrupt_and_missing_files_are_refused(tmp_path):
    sae = tiny_sae()
    folder = save_sae(sae, tmp_path / "sae")
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(GradSAEError, match="corrupt"):
        load_sae(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(GradSAEError, match="not valid JSON"):
        load_sae(folder)
    with pytest.raises(GradSAEError, match="does not exist"):
        load_sae(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GradSAEError, match="holds no SAE weights"):
        load_sae(tmp_path / "empty")


def test_mismatched_cfg_and_weights_are_refused(tmp_path):
    folder = save_sae(tiny_sae(), tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_sae"] = 99
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(GradSAEError, match="do not belong together"):
        load_sae(folder)


def test_incompatible_model_is_refused():
    sae = tiny_sae()
    with pytest.raises(GradSAEError, match="hidden size"):
        check_compatible(sae, d_model=D_MODEL + 1, n_layers=2, layer=0)
    with pytest.raises(GradSAEError, match="out of range"):
        check_compatible(sae, d_model=D_MODEL, n_layers=2, layer=2)


def test_bad_config_is_refused():
    with pytest.raises(GradSAEError, match="k"):
        SAEConfig(d_in=4, d_sae=8, activation="topk")
    with pytest.raises(GradSAEError, match="activation"):
        SAEConfig(d_in=4, d_sae=8, activation="gelu")  # type: ignore[arg-type]


def test_saelens_release_without_the_package_says_how(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sae_lens", None)
    with pytest.raises(GradSAEError, match="pip install sae-lens"):
        load_sae("saelens:gpt2-small-res-jb:blocks.8.hook_resid_pre")
    with pytest.raises(GradSAEError, match="RELEASE:SAE_ID"):
        load_sae("saelens:only-release")
