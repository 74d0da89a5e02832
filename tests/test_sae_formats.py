"""SAE files from other tools: hook points, inference settings and refusals.

Each test writes a small synthetic file in the layout SAELens, sparsify or
Gemma Scope (1 or 2) use, and checks the loaded SAE computes what that tool
computes at inference, or is refused with one line.
"""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gradsae
from gradsae.errors import GradSAEError
from gradsae.models import block_output
from gradsae.objectives import NextTokenProb
from gradsae.sae import SAE, SAEConfig
from gradsae.sae_formats import load_sae, save_gemmascope, save_sae, save_sparsify
from gradsae.scores import score_latents
from gradsae.splice import splice
from tests.helpers import D_MODEL, tiny_sae

D_SAE = 48
SHIPPED = Path(gradsae.__file__).parent / "saes" / "smollm2-135m-instruct"


# -- helpers ---------------------------------------------------------------------
def _saelens_folder(
    folder: Path, activation: str = "relu", *, cfg: dict[str, Any] | None = None, **weights: Any
) -> Path:
    """A SAELens folder of ``tiny_sae(activation, layer=1)``; cfg.json keys and weights changed (``None``: removed)."""
    save_sae(tiny_sae(activation, layer=1), folder)
    raw = json.loads((folder / "cfg.json").read_text())
    raw.update(cfg or {})
    for key, value in list(raw.items()):
        if value is None and key in (cfg or {}):
            del raw[key]
    (folder / "cfg.json").write_text(json.dumps(raw))
    if weights:
        state = load_file(str(folder / "sae_weights.safetensors"))
        state.update({key: value for key, value in weights.items() if value is not None})
        for key in [key for key, value in weights.items() if value is None]:
            state.pop(key, None)
        save_file(state, str(folder / "sae_weights.safetensors"))
    return folder


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae_weights.safetensors"))


def _sigma(pre: torch.Tensor, activation: str, *, threshold: Any = None, k: int = 6) -> torch.Tensor:
    if activation == "relu":
        return pre.clamp(min=0)
    if activation == "jumprelu":
        return pre.clamp(min=0) * (pre > threshold)
    top = pre.topk(k, dim=-1).indices
    return torch.zeros_like(pre).scatter(-1, top, pre.gather(-1, top).clamp(min=0))


def _refused(match: str, load: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(GradSAEError, match=match) as info:
        load(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def _x(n: int = 7) -> torch.Tensor:
    return torch.randn(n, D_MODEL, generator=torch.Generator().manual_seed(3))


def _logits(lm: Any, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _resid_pre_sae(tmp_path: Path, layer: int) -> SAE:
    hook = f"blocks.{layer}.hook_resid_pre"
    return load_sae(_saelens_folder(tmp_path / f"pre{layer}", cfg={"hook_name": hook, "hook_layer": layer}))


def _input_hook(fn: Any) -> Any:
    """A forward pre-hook on a decoder block applying ``fn`` to its hidden_states (positional or keyword)."""

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return hook


# -- 1. hook points --------------------------------------------------------------
def test_resid_pre_hook_name_is_read_and_written_back(tmp_path):
    sae = _resid_pre_sae(tmp_path, 1)
    assert (sae.cfg.hook_point, sae.cfg.hook_layer) == ("resid_pre", 1)
    again = load_sae(save_sae(sae, tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "cfg.json").read_text())["hook_name"] == "blocks.1.hook_resid_pre"
    assert (again.cfg.hook_point, again.cfg.hook_layer) == ("resid_pre", 1)
    for key, value in sae.state().items():
        assert torch.equal(value, again.state()[key]), key


@pytest.mark.parametrize("layer", [0, 1])
def test_resid_pre_sae_is_spliced_at_the_input_of_its_block(lm, tmp_path, layer):
    sae = _resid_pre_sae(tmp_path, layer)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    block = lm.layers[layer]
    handle = block.register_forward_pre_hook(_input_hook(sae), with_kwargs=True)
    try:
        by_hand = _logits(lm, ids)
    finally:
        handle.remove()
    handle = block.register_forward_hook(lambda _m, _i, out: sae(block_output(out)))
    try:
        after_block = _logits(lm, ids)
    finally:
        handle.remove()
    with splice(lm, sae, mode="replace", skip_first=False):
        spliced = _logits(lm, ids)
    assert torch.allclose(spliced, by_hand, atol=1e-5)
    assert not torch.allclose(spliced, after_block, atol=1e-3)
    assert sum(len(b._forward_pre_hooks) + len(b._forward_hooks) for b in lm.layers) == 0


def test_resid_pre_of_block_1_is_resid_post_of_block_0(lm, tmp_path):
    pre = _resid_pre_sae(tmp_path, 1)
    post = copy.deepcopy(pre)
    post.cfg = replace(pre.cfg, hook_point="resid_post", hook_layer=0)
    ids, mask = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(2)), None
    with splice(lm, pre, mode="replace"):
        a = _logits(lm, ids, mask)
    with splice(lm, post, mode="replace"):
        b = _logits(lm, ids, mask)
    assert torch.equal(a, b)


def test_resid_pre_error_mode_is_exact_and_its_gradient_is_at_the_block_input(lm, batch, tmp_path):
    ids, mask = batch
    sae = _resid_pre_sae(tmp_path, 1)
    clean = _logits(lm, ids, mask)
    with splice(lm, sae, mode="error") as sp:
        assert torch.allclose(_logits(lm, ids, mask), clean, atol=1e-5)
    assert (sp.acts[0] > 0).any()

    leaves: list[torch.Tensor] = []

    def leaf(z: torch.Tensor) -> torch.Tensor:
        leaves.append(z.detach().requires_grad_(True))
        return leaves[-1]

    handle = lm.layers[1].register_forward_pre_hook(_input_hook(leaf), with_kwargs=True)
    try:
        lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1, 5].sum().backward()
    finally:
        handle.remove()
    with splice(lm, sae, mode="error", grad=True, skip_first=False) as sp:
        lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1, 5].sum().backward()
    assert torch.allclose(sp.leaves[0].grad, leaves[0].grad, atol=1e-6)


def test_resid_pre_scores_run_and_a_prefix_replay_through_its_block_is_refused(lm, tmp_path):
    sae = _resid_pre_sae(tmp_path, 1)
    ids = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(4))
    scores = score_latents(lm, sae, ids, NextTokenProb(), method="gradsae")
    assert (scores.per_latent != 0).any()
    # The ablation baseline replays blocks 0..1 from a cache, which would skip the splice at block 1's input.
    _refused("prefix", score_latents, lm, sae, ids, NextTokenProb(), method="ablation")


@pytest.mark.parametrize(
    "hook",
    [
        "blocks.1.hook_attn_out",
        "blocks.1.hook_mlp_out",
        "blocks.1.attn.hook_z",
        "blocks.1.hook_resid_mid",
        "blocks.1.ln2.hook_normalized",
        "hook_embed",
    ],
)
def test_non_residual_hooks_are_refused(tmp_path, hook):
    folder = _saelens_folder(tmp_path, cfg={"hook_name": hook, "hook_layer": None})
    message = _refused("not supported", load_sae, folder)
    assert hook in message and "residual" in message


def test_head_and_inconsistent_hooks_are_refused(tmp_path):
    _refused("attention head", load_sae, _saelens_folder(tmp_path / "a", cfg={"hook_head_index": 3}))
    folder = _saelens_folder(tmp_path / "b", cfg={"hook_name": "blocks.1.hook_resid_pre", "hook_layer": 0})
    _refused("agree", load_sae, folder)


def test_missing_apply_b_dec_to_input_means_true_as_in_saelens(tmp_path):
    assert load_sae(_saelens_folder(tmp_path, cfg={"apply_b_dec_to_input": None})).cfg.apply_b_dec_to_input


# -- 2. normalize_activations and finetuning_scaling_factor ------------------------
def _scaled_reference(folder: Path, activation: str, s: float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens on un-folded weights: the SAE sees ``x * s``, its output is divided by ``s``."""
    w = _weights(folder)
    pre = (x * s - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    h = _sigma(pre, activation, threshold=w.get("threshold"))
    return h, (h @ w["W_dec"] + w["b_dec"]) / s


@pytest.mark.parametrize("source", ["activation_scaler.json", "v5 store", "cfg"])
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_expected_average_only_in_is_folded_with_its_stored_factor(tmp_path, source, activation):
    s = 2.5
    cfg = {"normalize_activations": "expected_average_only_in", "apply_b_dec_to_input": True}
    if source == "cfg":
        cfg["norm_scaling_factor"] = s
    folder = _saelens_folder(tmp_path, activation, cfg=cfg)
    if source == "activation_scaler.json":
        (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s, "has_whitening": False}))
    elif source == "v5 store":
        store = {"n_dataset_processed": torch.tensor(10), "estimated_norm_scaling_factor": torch.tensor(s)}
        save_file(store, str(folder / "activations_store_state.safetensors"))
    sae, x = load_sae(folder), _x()
    h, out = _scaled_reference(folder, activation, s, x)
    assert torch.allclose(sae.encode(x), h, atol=1e-5)
    assert torch.allclose(sae(x), out, atol=1e-5)


def test_expected_average_only_in_without_its_factor_is_refused(tmp_path):
    folder = _saelens_folder(tmp_path, cfg={"normalize_activations": "expected_average_only_in"})
    _refused("scaling factor", load_sae, folder)


@pytest.mark.parametrize("mode", ["constant_norm_rescale", "layer_norm", "covariance_whitening"])
def test_per_token_normalisations_are_refused(tmp_path, mode):
    _refused(mode, load_sae, _saelens_folder(tmp_path, cfg={"normalize_activations": mode}))


@pytest.mark.parametrize("key", ["finetuning_scaling_factor", "scaling_factor"])
def test_finetuning_scaling_factor_is_folded_into_the_decoder(tmp_path, key):
    f = 0.5 + torch.rand(D_SAE, generator=torch.Generator().manual_seed(5))
    folder = _saelens_folder(tmp_path, cfg={"finetuning_scaling_factor": True}, **{key: f})
    sae, x, w = load_sae(folder), _x(), _weights(folder)
    h = _sigma(x @ w["W_enc"] + w["b_enc"], "relu")
    assert torch.allclose(sae.encode(x), h, atol=1e-6)
    assert torch.allclose(sae(x), (h * f) @ w["W_dec"] + w["b_dec"], atol=1e-5)


def test_finetuning_scaling_factor_settings_that_disagree_are_refused(tmp_path):
    f = torch.full((D_SAE,), 2.0)
    _refused("is false", load_sae, _saelens_folder(tmp_path / "a", finetuning_scaling_factor=f))
    _refused("no scaling tensor", load_sae, _saelens_folder(tmp_path / "b", cfg={"finetuning_scaling_factor": True}))
    ones = _saelens_folder(tmp_path / "c", scaling_factor=torch.ones(D_SAE))  # SAELens drops an all-ones tensor
    assert torch.equal(load_sae(ones).W_dec, tiny_sae("relu").W_dec)


# -- 3. sparsify -------------------------------------------------------------------
def _sparsify_folder(folder: Path, **cfg: Any) -> Path:
    sae = SAE.random(SAEConfig(d_in=D_MODEL, d_sae=32, activation="topk", k=4, apply_b_dec_to_input=True))
    save_sparsify(sae, folder)
    raw = json.loads((folder / "cfg.json").read_text()) | {"multi_topk": False, "skip_connection": False}
    (folder / "cfg.json").write_text(json.dumps(raw | {"transcode": False} | cfg))
    return folder


def test_sparsify_transcoders_and_skip_connections_are_refused(tmp_path):
    _refused("transcoder", load_sae, _sparsify_folder(tmp_path / "t", transcode=True))
    folder = _sparsify_folder(tmp_path / "s", skip_connection=True)
    state = load_file(str(folder / "sae.safetensors")) | {"W_skip": torch.zeros(D_MODEL, D_MODEL)}
    save_file(state, str(folder / "sae.safetensors"))
    _refused("skip connection", load_sae, folder)
    (folder / "cfg.json").write_text(
        json.dumps(json.loads((folder / "cfg.json").read_text()) | {"skip_connection": False})
    )
    _refused("W_skip", load_sae, folder)
    _refused("groupmax", load_sae, _sparsify_folder(tmp_path / "g", activation="groupmax"))


def test_sparsify_multi_topk_runs_as_sparsify_does_at_inference(tmp_path):
    """multi_topk only adds a 4k-latent loss term in training; sparsify's encode keeps k latents."""
    folder = _sparsify_folder(tmp_path, multi_topk=True)
    sae, x, w = load_sae(folder), _x(), load_file(str(folder / "sae.safetensors"))
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    values, indices = pre.topk(4, dim=-1)
    h = torch.zeros_like(pre).scatter(-1, indices, values)
    assert torch.allclose(sae.encode(x), h, atol=1e-6)
    assert torch.allclose(sae(x), h @ w["W_dec"] + w["b_dec"], atol=1e-5)


def test_sparsify_hookpoint_folders_name_the_layer(tmp_path):
    sae = load_sae(_sparsify_folder(tmp_path / "layers.1"))
    assert (sae.cfg.hook_point, sae.cfg.hook_layer) == ("resid_post", 1)
    sae = load_sae(_sparsify_folder(tmp_path / "embed_tokens"))
    assert (sae.cfg.hook_point, sae.cfg.hook_layer) == ("resid_pre", 0)
    _refused("layers.1.mlp", load_sae, _sparsify_folder(tmp_path / "layers.1.mlp"))


# -- 4. BatchTopK --------------------------------------------------------------------
def _batchtopk_folder(folder: Path, threshold: float | None = 0.05) -> Path:
    """A SAELens BatchTopK training checkpoint: decoder rows not unit norm, scalar float64 ``topk_threshold``."""
    norms = 0.5 + torch.rand(D_SAE, generator=torch.Generator().manual_seed(6))
    w_dec = tiny_sae("relu").W_dec.detach() * norms[:, None]
    cfg = {"architecture": "batchtopk", "k": 5.5, "rescale_acts_by_decoder_norm": True, "activation_fn_str": None}
    scalar = None if threshold is None else torch.tensor(threshold, dtype=torch.float64)
    return _saelens_folder(folder, cfg=cfg, W_dec=w_dec, topk_threshold=scalar)


def test_batchtopk_runs_as_jumprelu_with_its_learned_threshold(tmp_path):
    folder = _batchtopk_folder(tmp_path / "ckpt")
    sae, x, w = load_sae(folder), _x(), _weights(folder)
    assert sae.cfg.activation == "jumprelu" and torch.equal(sae.threshold, torch.full((D_SAE,), 0.05))
    norm = w["W_dec"].norm(dim=-1)
    hidden = (x @ w["W_enc"] + w["b_enc"]) * norm  # SAELens: rescale_acts_by_decoder_norm
    h = hidden.clamp(min=0) * (hidden > 0.05)
    assert torch.allclose(sae.encode(x), h, atol=1e-5)
    assert torch.allclose(sae(x), (h / norm) @ w["W_dec"] + w["b_dec"], atol=1e-5)
    # the same file as SAELens saves it for inference: norms folded, a jumprelu threshold per latent
    inference = {"W_enc": w["W_enc"] * norm, "b_enc": w["b_enc"] * norm, "W_dec": w["W_dec"] / norm[:, None]}
    inference |= {"b_dec": w["b_dec"], "threshold": torch.full((D_SAE,), 0.05)}
    saved = _saelens_folder(tmp_path / "inference", "jumprelu", **inference)
    assert torch.allclose(load_sae(saved).encode(x), sae.encode(x), atol=1e-6)


def test_batchtopk_without_its_threshold_is_refused(tmp_path):
    _refused("topk_threshold", load_sae, _batchtopk_folder(tmp_path, threshold=None))


def test_topk_rescale_acts_by_decoder_norm_is_folded(tmp_path):
    norms = 0.5 + torch.rand(D_SAE, generator=torch.Generator().manual_seed(7))
    w_dec = tiny_sae("topk").W_dec.detach() * norms[:, None]
    folder = _saelens_folder(tmp_path, "topk", cfg={"rescale_acts_by_decoder_norm": True}, W_dec=w_dec)
    sae, x, w = load_sae(folder), _x(), _weights(folder)
    h = _sigma((x @ w["W_enc"] + w["b_enc"]) * norms, "topk")
    assert torch.allclose(sae.encode(x), h, atol=1e-5)
    assert torch.allclose(sae(x), (h / norms) @ w["W_dec"] + w["b_dec"], atol=1e-5)


# -- 5. Gemma Scope 2 ----------------------------------------------------------------
def _gemmascope2(folder: Path, config: dict[str, Any] | None = None, **extra: torch.Tensor) -> tuple[Path, SAE]:
    sae = tiny_sae("jumprelu")
    folder.mkdir(parents=True)
    weights = {key.lower(): value for key, value in sae.state().items()} | extra
    save_file(weights, str(folder / "params.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder, sae


def test_gemmascope2_params_safetensors_load(tmp_path):
    config = {"hf_hook_point_in": "model.layers.1.output", "model_name": "google/x", "l0": 20, "width": D_SAE}
    folder, sae = _gemmascope2(tmp_path / "resid_post" / "layer_1_width_16k_l0_small", config)
    loaded = load_sae(folder / "params.safetensors")
    assert (loaded.cfg.activation, loaded.cfg.hook_point, loaded.cfg.hook_layer) == ("jumprelu", "resid_post", 1)
    for key, value in sae.state().items():
        assert torch.equal(value, loaded.state()[key]), key
    bare, _ = _gemmascope2(tmp_path / "resid_post_all" / "layer_3_width_16k_l0_big")
    assert load_sae(bare).cfg.hook_layer == 3


def test_gemmascope2_transcoders_crosscoders_and_other_sites_are_refused(tmp_path):
    hooks = {
        "hf_hook_point_in": "model.layers.1.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.1.post_feedforward_layernorm.output",
    }
    folder, _ = _gemmascope2(tmp_path / "transcoder_all" / "layer_1_width_16k_l0_big", hooks)
    _refused("transcoder or crosscoder", load_sae, folder)
    affine = {"affine_skip_connection": torch.zeros(D_MODEL, D_MODEL)}
    folder, _ = _gemmascope2(tmp_path / "a" / "layer_1", {"hf_hook_point_in": "model.layers.1.output"}, **affine)
    _refused("transcoder or crosscoder", load_sae, folder)
    folder, _ = _gemmascope2(tmp_path / "crosscoder" / "layer_1", None, w_enc=torch.zeros(3, D_MODEL, D_SAE))
    _refused("transcoder or crosscoder", load_sae, folder)
    folder, _ = _gemmascope2(tmp_path / "mlp_out_all" / "layer_1_width_16k_l0_big")
    _refused("mlp_out_all", load_sae, folder)
    attn = {"hf_hook_point_in": "model.layers.1.self_attn.o_proj.input"}
    folder, _ = _gemmascope2(tmp_path / "b" / "layer_1", attn)
    _refused("o_proj", load_sae, folder)
    folder, _ = _gemmascope2(tmp_path / "c" / "layer_1", {"hf_hook_point_in": "model.layers.1.output", "width": 99})
    _refused("do not belong together", load_sae, folder)


def test_gemmascope_mlp_release_is_refused(tmp_path):
    folder = save_gemmascope(tiny_sae("jumprelu"), tmp_path / "gemma-scope-2b-pt-mlp-canonical" / "layer_1" / "w")
    _refused("gemma-scope-2b-pt-mlp-canonical", load_sae, folder)


# -- 6. dtype in cfg.json ----------------------------------------------------------------
def test_fp16_weights_are_saved_with_a_float32_compute_dtype(tmp_path):
    sae = tiny_sae("topk")
    folder = save_sae(sae, tmp_path / "sae", dtype=torch.float16)
    assert json.loads((folder / "cfg.json").read_text())["dtype"] == "float32"
    with safe_open(str(folder / "sae_weights.safetensors"), framework="pt") as f:
        assert {f.get_tensor(key).dtype for key in f.keys()} == {torch.float16}  # noqa: SIM118
    loaded = load_sae(folder)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for key, value in sae.state().items():
        assert torch.equal(value.half().float(), loaded.state()[key]), key


@pytest.mark.parametrize("layer", [6, 15, 24])
def test_shipped_cfg_json_says_float32_over_fp16_weights(layer):
    folder = SHIPPED / f"layer_{layer}"
    if not (folder / "sae_weights.safetensors").exists():
        pytest.skip(f"{folder} not shipped")
    assert json.loads((folder / "cfg.json").read_text())["dtype"] == "float32"
    with safe_open(str(folder / "sae_weights.safetensors"), framework="pt") as f:
        assert f.get_slice("W_dec").get_dtype() == "F16"


# -- 7. bad files ------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    w_dec = tiny_sae("relu").W_dec.detach().clone()
    w_dec[3, 2] = bad
    _refused("NaN or inf", load_sae, _saelens_folder(tmp_path, W_dec=w_dec))


def test_sparsify_width_that_disagrees_with_the_weights_is_refused(tmp_path):
    _refused("do not belong together", load_sae, _sparsify_folder(tmp_path, num_latents=99))


def test_weights_of_another_architecture_are_refused(tmp_path):
    _refused("b_gate", load_sae, _saelens_folder(tmp_path, b_gate=torch.zeros(D_SAE)))


class _Boom:
    """Unpickling this records that it happened."""

    fired = False

    def __reduce__(self) -> Any:
        return (_boom, ())


def _boom() -> None:
    _Boom.fired = True


def test_pickles_are_refused_and_never_unpickled(tmp_path):
    folder = _saelens_folder(tmp_path / "pkl")
    (folder / "sae_weights.safetensors").write_bytes(pickle.dumps({"W_enc": _Boom()}))
    _refused("not a safetensors file", load_sae, folder)
    torch.save({"W_enc": torch.zeros(2)}, folder / "sae_weights.safetensors")
    _refused("not a safetensors file", load_sae, folder)
    npz = tmp_path / "npz" / "layer_1"
    npz.mkdir(parents=True)
    np.savez(npz / "params.npz", W_enc=np.array([_Boom()], dtype=object))
    _refused("corrupt", load_sae, npz)
    (npz / "params.npz").write_bytes(pickle.dumps(_Boom()))
    _refused("corrupt", load_sae, npz)
    assert not _Boom.fired
