"""SAE files: read every supported layout into an :class:`~gradsae.sae.SAE`, write three of them.

Default layout: :func:`save_sae` / :func:`load_sae` use SAELens's on-disk layout (``cfg.json`` +
``sae_weights.safetensors`` with keys ``W_enc, W_dec, b_enc, b_dec[, threshold]``).
``cfg.json``'s ``dtype`` is the dtype to compute in; weights are cast to it on load
(as SAELens does), so fp16 weights can be stored with ``"dtype": "float32"``.
``load_sae`` also reads Gemma Scope's ``params.npz``, Gemma Scope 2's
``params.safetensors`` (lowercase keys, optional ``config.json``) and EleutherAI
sparsify's ``cfg.json`` + ``sae.safetensors``. SAELens settings are applied
exactly by folding them into the weights:

* ``normalize_activations="expected_average_only_in"``: the SAE saw ``x * s``
  and its output was divided by ``s``; ``W_enc *= s``, ``W_dec /= s``,
  ``b_dec /= s`` (``s`` from ``activation_scaler.json``, a SAELens v5
  ``activations_store_state.safetensors`` or ``norm_scaling_factor`` in cfg.json);
* ``finetuning_scaling_factor``: ``decode(h * f)``; ``W_dec *= f[:, None]``;
* ``rescale_acts_by_decoder_norm`` (TopK): ``pre * |W_dec|``, ``decode(h / |W_dec|)``;
  ``W_enc *= n``, ``b_enc *= n``, ``W_dec /= n`` with ``n = |W_dec[c]|``;
* ``batchtopk`` (and ``matryoshka_batchtopk``): run at inference as JumpReLU with
  every latent's threshold the learned scalar ``topk_threshold``, as SAELens saves it.

Per-token normalisations (``constant_norm_rescale``, ``layer_norm``), whitening,
transcoders, skip connections, crosscoders and non-residual hooks are refused with
one line. No loader unpickles: weights come from safetensors or ``np.load(allow_pickle=False)``.

Writers: :func:`save_sae` (SAELens: ``cfg.json`` from :func:`saelens_cfg`, readable by SAELens v5 and
v6), :func:`save_sparsify` (TopK only) and :func:`save_gemmascope` (JumpReLU only), each the inverse of
its reader (tests round-trip them).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gradsae import _files
from gradsae.errors import GradSAEError
from gradsae.sae import SAE, Activation, HookPoint, SAEConfig

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMASCOPE_WEIGHTS = "params.npz"
GEMMASCOPE2_WEIGHTS = "params.safetensors"
DTYPES: tuple[str, ...] = ("float32", "float64", "float16", "bfloat16")


def save_sae(sae: SAE, folder: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout), each atomically.

    ``dtype`` is the storage dtype of the weights; cfg.json names the dtype to
    compute in: float32 (float64 for float64 weights), so that SAELens, which
    casts the weights to it, picks the same latents as float32 maths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = sae.state()
    if dtype is not None:
        state = {key: value.to(dtype) for key, value in state.items()}
    compute = "float64" if _dtype_of(state) == "float64" else "float32"
    with _files.atomic_path(folder / SAELENS_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    _write_json(folder / "cfg.json", saelens_cfg(replace(sae.cfg, dtype=compute)))
    return folder


def saelens_cfg(cfg: SAEConfig) -> dict[str, Any]:
    """``cfg.json`` contents readable by SAELens v5 and v6 (a superset of both)."""
    architecture = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[cfg.activation]
    out: dict[str, Any] = {
        "architecture": architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "hook_layer": -1 if cfg.hook_layer is None else cfg.hook_layer,
        "hook_head_index": None,
        "activation_fn_str": "topk" if cfg.activation == "topk" else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if cfg.activation == "topk" else {},
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",
        "prepend_bos": True,
        "context_size": cfg.metadata.get("context_size", 128),
        "dataset_path": cfg.metadata.get("dataset_path", ""),
        "metadata": {
            "model_name": cfg.model_name,
            "hook_name": cfg.hook_name,
            "hook_layer": cfg.hook_layer,
            "gradsae": cfg.metadata,
        },
    }
    if cfg.activation == "topk":
        out["k"] = cfg.k
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as indented, sorted JSON (no trailing newline, as these files have always been), atomically."""
    _files.write_text(path, json.dumps(data, indent=2, sort_keys=True))


# -- hook points ---------------------------------------------------------------
_TL_HOOK = re.compile(r"blocks\.(-?\d+)\.(.+)")
_HF_HOOK = re.compile(r"(?:model\.)?(?:language_model\.)?layers\.(\d+)(.*)")
_EMBED_HOOKS = ("embed_tokens", "model.embed_tokens", "model.language_model.embed_tokens")


def parse_hook(name: str) -> tuple[HookPoint, int | None]:
    """``(hook point, layer)`` of a residual-stream hook name; any other hook is refused.

    TransformerLens names (``blocks.L.hook_resid_post`` / ``hook_resid_pre``) and
    Hugging Face module names (``model.layers.L[.output]``: block ``L``'s output;
    ``embed_tokens``: block 0's input) are understood. Layer ``-1`` means unknown.
    """
    match = _TL_HOOK.fullmatch(name)
    if match and match.group(2) in ("hook_resid_post", "hook_resid_pre"):
        layer = int(match.group(1))
        point: HookPoint = "resid_post" if match.group(2) == "hook_resid_post" else "resid_pre"
        return point, None if layer < 0 else layer
    match = _HF_HOOK.fullmatch(name)
    if match and match.group(2) in ("", ".output"):
        return "resid_post", int(match.group(1))
    if name in _EMBED_HOOKS:
        return "resid_pre", 0
    raise GradSAEError(
        f"SAE hook {name!r} is not supported: gradsae splices SAEs on the residual stream only "
        "(blocks.L.hook_resid_post or blocks.L.hook_resid_pre); use a residual-stream SAE"
    )


def _saelens_hook(raw: dict[str, Any]) -> tuple[HookPoint, int | None]:
    meta = raw.get("metadata") or {}
    if raw.get("hook_head_index", meta.get("hook_head_index")) is not None:
        raise GradSAEError("this SAE reads one attention head (hook_head_index): use a residual-stream SAE")
    name = raw.get("hook_name") or meta.get("hook_name") or raw.get("hook_point")
    stated = raw.get("hook_layer", meta.get("hook_layer"))
    stated = None if stated is None or int(stated) == -1 else int(stated)
    if not name:
        return "resid_post", stated
    point, layer = parse_hook(str(name))
    if stated is not None and layer is not None and stated != layer:
        raise GradSAEError(f"cfg.json says hook_name={name!r} but hook_layer={stated}: fix one of them so they agree")
    return point, layer if layer is not None else stated


# -- loading -----------------------------------------------------------------
def load_sae(path: str | Path, *, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder in SAELens, sparsify or Gemma Scope (1 or 2) layout (detected).

    ``saelens:RELEASE:SAE_ID`` delegates to the optional ``sae-lens`` package
    (which needs the Hugging Face hub) and converts through SAELens's own files.
    """
    if isinstance(path, str) and path.startswith("saelens:"):
        return _load_via_saelens(path.removeprefix("saelens:")).to(device)
    path = Path(path)
    if path.is_file() and path.name in (GEMMASCOPE_WEIGHTS, GEMMASCOPE2_WEIGHTS):
        path = path.parent
    if not path.is_dir():
        raise GradSAEError(f"SAE folder {path} does not exist: pass a folder holding cfg.json + weights")
    if (path / SAELENS_WEIGHTS).exists():
        sae = _load_saelens(path)
    elif (path / SPARSIFY_WEIGHTS).exists():
        sae = _load_sparsify(path)
    elif (path / GEMMASCOPE_WEIGHTS).exists():
        sae = _load_gemmascope(path)
    elif (path / GEMMASCOPE2_WEIGHTS).exists():
        sae = _load_gemmascope2(path)
    else:
        raise GradSAEError(
            f"{path} holds no SAE weights: expected {SAELENS_WEIGHTS} (SAELens), {SPARSIFY_WEIGHTS} (sparsify), "
            f"{GEMMASCOPE_WEIGHTS} (Gemma Scope) or {GEMMASCOPE2_WEIGHTS} (Gemma Scope 2)"
        )
    return sae.to(device)


def _load_via_saelens(spec: str) -> SAE:
    import tempfile

    release, _, sae_id = spec.partition(":")
    if not release or not sae_id:
        raise GradSAEError(
            f"saelens:{spec}: write saelens:RELEASE:SAE_ID, e.g. saelens:gpt2-small-res-jb:blocks.8.hook_resid_pre"
        )
    try:
        from sae_lens import SAE as LensSAE  # noqa: N811
    except ImportError:
        raise GradSAEError(
            "loading by SAELens release needs `pip install sae-lens`; or pass a local SAE folder"
        ) from None
    try:
        loaded = LensSAE.from_pretrained(release, sae_id)
    except Exception as exc:  # any hub or registry failure becomes one line
        raise GradSAEError(
            f"SAELens could not load {release}:{sae_id} ({_first_line(exc)}): check hub access or pass a local folder"
        ) from None
    lens = loaded[0] if isinstance(loaded, tuple) else loaded
    with tempfile.TemporaryDirectory() as folder:
        lens.save_model(folder)
        return _load_saelens(Path(folder))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise GradSAEError(f"{path} is missing: an SAE folder needs its cfg.json next to the weights")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GradSAEError(f"{path} is not valid JSON ({exc}): re-save or re-download the SAE") from None
    if not isinstance(data, dict):
        raise GradSAEError(f"{path} must hold a JSON object: re-save or re-download the SAE")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (never unpickles: a pickle under this name is refused)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise GradSAEError(
            f"{path} is corrupt, truncated or not a safetensors file ({_first_line(exc)}): re-save or re-download it"
        ) from None


def _torch_dtype(name: Any, source: Path) -> torch.dtype:
    text = str(name).removeprefix("torch.")
    if text not in DTYPES:
        raise GradSAEError(f"{source}: dtype {name!r} is not supported: use one of {', '.join(DTYPES)}")
    dtype: torch.dtype = getattr(torch, text)
    return dtype


# -- SAELens -------------------------------------------------------------------
_BATCHTOPK = ("batchtopk", "matryoshka_batchtopk")


def _saelens_activation(raw: dict[str, Any]) -> tuple[Activation, int | None]:
    arch = raw.get("architecture", "standard")
    fn = raw.get("activation_fn_str", raw.get("activation_fn", "relu"))
    kwargs = raw.get("activation_fn_kwargs") or {}
    k = raw.get("k", kwargs.get("k"))
    if arch in _BATCHTOPK:
        return "jumprelu", None
    if arch == "topk" or (arch == "standard" and fn == "topk"):
        return "topk", int(k) if k is not None else None
    if arch == "jumprelu":
        return "jumprelu", None
    if arch == "standard" and fn == "relu":
        return "relu", None
    raise GradSAEError(
        f"SAE architecture {arch!r} / activation {fn!r} is not supported: use standard, jumprelu, topk or batchtopk"
    )


def _load_saelens(folder: Path) -> SAE:
    raw = _read_json(folder / "cfg.json")
    if not isinstance(raw.get("d_in"), int) or not isinstance(raw.get("d_sae"), int):
        raise GradSAEError(f"{folder / 'cfg.json'} lacks integer d_in and d_sae: it is not a SAELens cfg.json")
    point, layer = _saelens_hook(raw)
    activation, k = _saelens_activation(raw)
    source = folder / SAELENS_WEIGHTS
    dtype = _torch_dtype(raw.get("dtype", "float32"), folder / "cfg.json")
    weights = {key: value.to(dtype) for key, value in _read_safetensors(source).items()}
    state = _saelens_state(folder, raw, weights, source)
    meta = raw.get("metadata") or {}
    cfg = SAEConfig(
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        activation=activation,
        k=k,
        hook_layer=layer,
        hook_point=point,
        model_name=str(raw.get("model_name", meta.get("model_name", ""))),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),  # SAELens's default
        dtype=_dtype_of(state),
        metadata=dict(meta.get("gradsae") or {}),
    )
    return _from_state(cfg, state, source)


def _saelens_state(folder: Path, raw: dict[str, Any], weights: dict[str, torch.Tensor], source: Path) -> dict[str, Any]:
    """SAELens weights with every inference-time setting folded in (see the module docstring)."""
    state = dict(weights)
    missing = sorted({"W_enc", "W_dec", "b_enc", "b_dec"} - set(state))
    if missing:
        raise GradSAEError(f"{source} lacks weights {missing}: the file is incomplete or of another format")
    if "log_threshold" in state and "threshold" not in state:
        state["threshold"] = state.pop("log_threshold").exp()
    _fold_finetuning_scale(raw, state, source)
    batchtopk = raw.get("architecture") in _BATCHTOPK
    rescale = bool(raw.get("rescale_acts_by_decoder_norm", batchtopk))
    scale = _norm_scaling_factor(folder, raw)
    with torch.no_grad():
        if scale is not None:
            state["W_enc"], state["W_dec"], state["b_dec"] = _scaled(state, scale)
            if batchtopk and rescale and "topk_threshold" in state:
                state["topk_threshold"] = state["topk_threshold"] / scale
        if rescale and raw.get("architecture") in ("topk", *_BATCHTOPK):
            state["W_enc"], state["b_enc"], state["W_dec"] = _unit_decoder(state)
    if batchtopk:
        state["threshold"] = _batchtopk_threshold(state, int(raw["d_sae"]), source)
    return state


def _fold_finetuning_scale(raw: dict[str, Any], state: dict[str, torch.Tensor], source: Path) -> None:
    """``decode(h * f)`` becomes ``h @ (f[:, None] * W_dec)`` (SAELens v5; key ``scaling_factor`` before that)."""
    factor = state.pop("finetuning_scaling_factor", None)
    legacy = state.pop("scaling_factor", None)
    factor = factor if factor is not None else legacy
    if factor is None:
        if raw.get("finetuning_scaling_factor"):
            raise GradSAEError(
                f"{source}: cfg.json sets finetuning_scaling_factor but the weights hold no scaling tensor: "
                "re-save the SAE or set it to false"
            )
        return
    if not raw.get("finetuning_scaling_factor"):
        if torch.allclose(factor, torch.ones_like(factor)):
            return  # SAELens drops an all-ones tensor
        raise GradSAEError(
            f"{source} holds a finetuning scaling tensor but cfg.json's finetuning_scaling_factor is false: "
            "set it to true or re-save the SAE"
        )
    if factor.shape != state["W_dec"].shape[:1]:
        raise GradSAEError(f"{source}: the finetuning scaling tensor has shape {tuple(factor.shape)}, not [d_sae]")
    state["W_dec"] = state["W_dec"] * factor[:, None]


def _norm_scaling_factor(folder: Path, raw: dict[str, Any]) -> float | None:
    """``s`` of ``expected_average_only_in``; ``None`` when the SAE reads raw activations."""
    mode = raw.get("normalize_activations", "none")
    if mode is None or mode is False or mode == "none":
        return None
    if mode is not True and mode != "expected_average_only_in":
        raise GradSAEError(
            f"normalize_activations={mode!r} rescales each token at run time, which gradsae cannot apply exactly: "
            "use an SAE saved with normalize_activations='none' or 'expected_average_only_in'"
        )
    scale = _stored_scaling_factor(folder, raw)
    if scale is None or not math.isfinite(scale) or scale <= 0:
        raise GradSAEError(
            f"{folder}: normalize_activations='expected_average_only_in' needs its scaling factor: put "
            "activation_scaler.json (SAELens) next to cfg.json or set norm_scaling_factor in cfg.json"
        )
    return scale


def _stored_scaling_factor(folder: Path, raw: dict[str, Any]) -> float | None:
    if raw.get("norm_scaling_factor") is not None:
        return float(raw["norm_scaling_factor"])
    if (folder / "activation_scaler.json").exists():  # SAELens v6 checkpoints
        value = _read_json(folder / "activation_scaler.json").get("scaling_factor")
        return None if value is None else float(value)
    if (folder / "activations_store_state.safetensors").exists():  # SAELens v5 checkpoints
        store = _read_safetensors(folder / "activations_store_state.safetensors")
        value = store.get("estimated_norm_scaling_factor")
        return None if value is None else float(value)
    return None


def _scaled(state: dict[str, torch.Tensor], scale: float) -> tuple[torch.Tensor, ...]:
    """SAELens's ``fold_activation_norm_scaling_factor``: ``W_enc * s, W_dec / s, b_dec / s``."""
    return state["W_enc"] * scale, state["W_dec"] / scale, state["b_dec"] / scale


def _unit_decoder(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """SAELens's TopK norm fold: ``W_enc * n, b_enc * n, W_dec / n`` with ``n = |W_dec[c]|``."""
    norm = state["W_dec"].norm(dim=-1).clamp(min=1e-8)
    return state["W_enc"] * norm, state["b_enc"] * norm, state["W_dec"] / norm[:, None]


def _batchtopk_threshold(state: dict[str, torch.Tensor], d_sae: int, source: Path) -> torch.Tensor:
    """SAELens saves a BatchTopK SAE as JumpReLU with every threshold the learned ``topk_threshold``."""
    scalar = state.pop("topk_threshold", None)
    if "threshold" in state:
        return state["threshold"]
    if scalar is None or scalar.numel() != 1:
        raise GradSAEError(
            f"{source}: a batchtopk SAE needs its learned scalar topk_threshold to run per token: "
            "re-save it with SAELens (as jumprelu) or include topk_threshold"
        )
    return torch.full((d_sae,), float(scalar), dtype=state["W_enc"].dtype)


# -- sparsify ------------------------------------------------------------------
def _load_sparsify(folder: Path) -> SAE:
    raw = _read_json(folder / "cfg.json")
    source = folder / SPARSIFY_WEIGHTS
    _refuse_sparsify_kind(raw, source)
    weights = _read_safetensors(source)
    if "W_skip" in weights:
        raise GradSAEError(f"{source} has a skip connection (W_skip): gradsae supports plain SAEs only")
    try:
        enc_w, enc_b = weights.pop("encoder.weight"), weights.pop("encoder.bias")
        state = {"W_enc": enc_w.T.contiguous(), "b_enc": enc_b, "W_dec": weights.pop("W_dec")}
        state["b_dec"] = weights.pop("b_dec")
    except KeyError as exc:
        raise GradSAEError(f"{source} lacks key {exc}: it is not a sparsify SAE") from None
    state |= weights  # anything left over is refused by _from_state
    if state["W_dec"].ndim != 2:
        raise GradSAEError(f"{source}: W_dec has shape {tuple(state['W_dec'].shape)}, not [num_latents, d_in]")
    d_sae, d_in = state["W_dec"].shape
    stated_in = int(raw.get("d_in", d_in))
    width = raw.get("num_latents") or stated_in * int(raw.get("expansion_factor") or 0)
    if stated_in != d_in or (width and int(width) != d_sae):
        raise GradSAEError(
            f"{source}: W_dec is {d_sae} x {d_in} but cfg.json says num_latents={width}, d_in={stated_in}; "
            "the cfg.json and weights do not belong together"
        )
    point, layer = _sparsify_hook(folder.name)
    cfg = SAEConfig(
        d_in=int(d_in),
        d_sae=int(d_sae),
        activation="topk",
        k=int(raw.get("k", 32)),
        hook_layer=layer,
        hook_point=point,
        apply_b_dec_to_input=True,
        dtype=_dtype_of(state),
        metadata={"source": "sparsify", **{k: v for k, v in raw.items() if isinstance(v, (int, float, str, bool))}},
    )
    return _from_state(cfg, state, source)


def _refuse_sparsify_kind(raw: dict[str, Any], source: Path) -> None:
    """Transcoders, skip connections and non-TopK sparsify coders are not residual SAEs gradsae can run.

    ``multi_topk`` is accepted: it only adds a ``4k``-latent term to the training
    loss; sparsify's ``encode``/``forward`` keep ``k`` latents.
    """
    if raw.get("transcode"):
        raise GradSAEError(f"{source} is a transcoder (transcode: true), not an SAE: use a residual-stream SAE")
    if raw.get("skip_connection"):
        raise GradSAEError(f"{source} has a skip connection (skip_connection: true): gradsae supports plain SAEs only")
    if raw.get("activation", "topk") != "topk" or raw.get("signed"):
        raise GradSAEError(f"{source}: sparsify activation {raw.get('activation')!r} is not supported: use a TopK SAE")


def _sparsify_hook(name: str) -> tuple[HookPoint, int | None]:
    """sparsify names a folder after its hookpoint (``layers.6``, ``embed_tokens``); other names say nothing."""
    if _HF_HOOK.fullmatch(name) or name in _EMBED_HOOKS:
        return parse_hook(name)
    return "resid_post", None


# -- Gemma Scope -----------------------------------------------------------------
_GEMMASCOPE_NOT_RESIDUAL = re.compile(
    r"(?:models--google--)?gemma-scope-.*-(?:mlp|att).*|embedding|(?:attn_out|mlp_out)(?:_all)?"
)
_GEMMASCOPE_CODERS = re.compile(r"(?:skip_)?(?:transcoder|clt|crosscoder)(?:_all)?|layer_\d+_.*_affine")
_LAYER_FOLDER = re.compile(r"layer_(\d+)(?:_.*)?")


def _gemmascope_folder(folder: Path) -> tuple[int | None, str]:
    """Layer (from ``layer_N[_...]``) and the first non-residual path part, if any."""
    layer, odd = None, ""
    for part in folder.parts:
        if match := _LAYER_FOLDER.fullmatch(part):
            layer = int(match.group(1))
        if not odd and (_GEMMASCOPE_NOT_RESIDUAL.fullmatch(part) or _GEMMASCOPE_CODERS.fullmatch(part)):
            odd = part
    return layer, odd


def _load_gemmascope(folder: Path) -> SAE:
    import numpy as np

    file = folder / GEMMASCOPE_WEIGHTS
    layer, odd = _gemmascope_folder(folder)
    if odd:
        raise GradSAEError(
            f"{file} is a Gemma Scope {odd!r} dictionary, not a residual-stream SAE: use a gemma-scope-*-res SAE"
        )
    try:
        with np.load(file, allow_pickle=False) as npz:
            state = {_gemma_key(key): torch.from_numpy(npz[key].copy()).float() for key in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise GradSAEError(f"{file} is corrupt or truncated ({_first_line(exc)}): re-download it") from None
    return _gemmascope_sae(state, layer, file, {"source": "gemma-scope"})


def _load_gemmascope2(folder: Path) -> SAE:
    """Gemma Scope 2: ``params.safetensors`` with ``w_enc, w_dec, b_enc, b_dec, threshold`` (+ ``config.json``)."""
    file = folder / GEMMASCOPE2_WEIGHTS
    config = _read_json(folder / "config.json") if (folder / "config.json").exists() else {}
    weights = _read_safetensors(file)
    layer, odd = _gemmascope_folder(folder)
    hook_in, hook_out = config.get("hf_hook_point_in"), config.get("hf_hook_point_out")
    coder = (
        (hook_out is not None and hook_out != hook_in)
        or config.get("affine_connection")
        or "affine_skip_connection" in weights
        or any(value.ndim > 2 for value in weights.values())
        or (odd and _GEMMASCOPE_CODERS.fullmatch(odd))
    )
    if coder:
        raise GradSAEError(
            f"{file} is a Gemma Scope 2 transcoder or crosscoder, which is not supported: use a resid_post SAE"
        )
    if hook_in is not None:
        point, layer = parse_hook(str(hook_in))
    elif odd:
        raise GradSAEError(f"{file} is a Gemma Scope 2 {odd!r} SAE, not a residual-stream one: use a resid_post SAE")
    else:
        point = "resid_post"
    if config.get("architecture", "jump_relu") != "jump_relu":
        raise GradSAEError(f"{file}: Gemma Scope 2 architecture {config['architecture']!r} is not supported")
    state = {_gemma_key(key): value.float() for key, value in weights.items()}
    width = config.get("width")
    if width is not None and "W_enc" in state and int(width) != state["W_enc"].shape[-1]:
        raise GradSAEError(
            f"{file}: config.json says width {width} but w_enc has {state['W_enc'].shape[-1]} latents; "
            "the config.json and weights do not belong together"
        )
    meta = {"source": "gemma-scope-2", "model_name": str(config.get("model_name", ""))}
    return _gemmascope_sae(state, layer, file, meta, point)


def _gemma_key(key: str) -> str:
    return "W_" + key[2:] if key.startswith("w_") else key


def _gemmascope_sae(
    state: dict[str, torch.Tensor], layer: int | None, file: Path, meta: dict[str, Any], point: HookPoint = "resid_post"
) -> SAE:
    if "W_enc" not in state or state["W_enc"].ndim != 2:
        raise GradSAEError(f"{file} lacks a [d_in, d_sae] w_enc: it is not a Gemma Scope SAE")
    d_in, d_sae = state["W_enc"].shape
    cfg = SAEConfig(
        d_in=int(d_in),
        d_sae=int(d_sae),
        activation="jumprelu",
        hook_layer=layer,
        hook_point=point,
        model_name=meta.pop("model_name", ""),
        dtype="float32",
        metadata=meta,
    )
    return _from_state(cfg, state, file)


def _dtype_of(state: dict[str, torch.Tensor]) -> str:
    return str(next(iter(state.values())).dtype).removeprefix("torch.")


def _from_state(cfg: SAEConfig, state: dict[str, torch.Tensor], source: Path) -> SAE:
    """An SAE holding exactly ``state``: every weight present, of the right shape, finite, nothing extra."""
    sae = SAE(cfg)
    expected = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    extra = sorted(set(state) - set(expected))
    if extra:
        raise GradSAEError(
            f"{source} holds weights {extra} that a {cfg.activation} SAE does not have "
            "(a skip connection, gate or other architecture): this SAE type is not supported"
        )
    for name, shape in expected.items():
        if name not in state:
            raise GradSAEError(f"{source} lacks weight {name!r}: the file is incomplete or of another format")
        if tuple(state[name].shape) != shape:
            raise GradSAEError(
                f"{source}: weight {name} has shape {tuple(state[name].shape)} but cfg.json implies {shape}; "
                "the cfg.json and weights do not belong together"
            )
        if not bool(torch.isfinite(state[name]).all()):
            raise GradSAEError(f"{source}: weight {name} holds NaN or inf values; re-save or re-download the SAE")
    with torch.no_grad():
        for name in expected:
            getattr(sae, name).copy_(state[name])
    return sae


def save_sparsify(sae: SAE, folder: str | Path) -> Path:
    """Write an SAE in sparsify's layout (``cfg.json`` + ``sae.safetensors``); topk only."""
    if sae.cfg.activation != "topk" or not sae.cfg.apply_b_dec_to_input:
        raise GradSAEError("sparsify's layout holds topk SAEs that subtract b_dec from the input")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = sae.state()
    save_file(
        {
            "encoder.weight": state["W_enc"].T.contiguous(),
            "encoder.bias": state["b_enc"],
            "W_dec": state["W_dec"],
            "b_dec": state["b_dec"],
        },
        str(folder / SPARSIFY_WEIGHTS),
    )
    cfg = {"d_in": sae.cfg.d_in, "num_latents": sae.cfg.d_sae, "k": sae.cfg.k, "normalize_decoder": True}
    _write_json(folder / "cfg.json", cfg)
    return folder


def save_gemmascope(sae: SAE, folder: str | Path) -> Path:
    """Write a JumpReLU SAE as Gemma Scope's ``params.npz``."""
    import numpy as np

    if sae.cfg.activation != "jumprelu":
        raise GradSAEError("Gemma Scope's params.npz holds jumprelu SAEs only")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {key: value.cpu().numpy() for key, value in sae.state().items()}
    np.savez(str(folder / GEMMASCOPE_WEIGHTS), **arrays)  # type: ignore[arg-type]
    return folder
