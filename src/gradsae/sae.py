"""Sparse autoencoders: encode, decode, and the files they live in.

For token states ``x`` (``[..., d_in]``)::

    pre  = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc      [..., d_sae]
    h    = sigma(pre)                                               [..., d_sae]
    x^   = h @ W_dec + b_dec                                        [..., d_in]

with ``sigma`` one of

* ``relu``:      ``max(pre, 0)``
* ``jumprelu``:  ``pre * (pre > threshold)`` with a per-latent ``threshold``
* ``topk``:      keep the ``k`` largest ``pre`` per token, then ``max(., 0)``

Shapes follow SAELens: ``W_enc`` is ``[d_in, d_sae]``, ``W_dec`` is ``[d_sae, d_in]``.
The maths runs in the weights' dtype: ``encode`` and ``decode`` cast their input
to it (so a float32 SAE on a bfloat16 model selects and reconstructs in float32).

Files: ``save``/``load`` use SAELens's on-disk layout (``cfg.json`` +
``sae_weights.safetensors`` with keys ``W_enc, W_dec, b_enc, b_dec[, threshold]``).
``load`` also reads Gemma Scope's ``params.npz`` and EleutherAI sparsify's
``cfg.json`` + ``sae.safetensors``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gradsae.errors import GradSAEError

Activation = Literal["relu", "jumprelu", "topk"]
ACTIVATIONS: tuple[str, ...] = ("relu", "jumprelu", "topk")
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMASCOPE_WEIGHTS = "params.npz"


@dataclass(frozen=True)
class SAEConfig:
    """What an SAE is, independent of its weights."""

    d_in: int
    """Width of the residual stream it reads."""
    d_sae: int
    """Number of latents."""
    activation: Activation = "relu"
    """``relu``, ``jumprelu`` (per-latent threshold) or ``topk``."""
    k: int | None = None
    """Active latents per token, for ``topk``."""
    hook_layer: int | None = None
    """Decoder layer whose output (the residual stream) the SAE reads."""
    model_name: str = ""
    """Model the SAE was trained on."""
    apply_b_dec_to_input: bool = False
    """Subtract ``b_dec`` from the input before encoding (sparsify and some SAELens SAEs)."""
    dtype: str = "float32"
    """Storage dtype of the weights."""
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """Free-form training and evaluation details (written to ``cfg.json``)."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise GradSAEError(f"unknown SAE activation {self.activation!r}: use one of {', '.join(ACTIVATIONS)}")
        if self.activation == "topk" and (self.k is None or not 0 < self.k <= self.d_sae):
            raise GradSAEError(f"a topk SAE needs 0 < k <= d_sae={self.d_sae}, got k={self.k}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise GradSAEError(f"SAE sizes must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")

    @property
    def hook_name(self) -> str:
        """The TransformerLens-style name SAELens uses for this hook point."""
        layer = -1 if self.hook_layer is None else self.hook_layer
        return f"blocks.{layer}.hook_resid_post"


class SAE(nn.Module):
    """A sparse autoencoder with SAELens parameter names and shapes."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        if cfg.activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))

    # -- maths ---------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_in] -> [..., d_sae]``: encoder pre-activations, in the SAE's dtype."""
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Apply the SAE's nonlinearity to pre-activations."""
        if self.cfg.activation == "relu":
            return torch.relu(pre)
        if self.cfg.activation == "jumprelu":
            return pre * (pre > self.threshold)
        assert self.cfg.k is not None
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_in] -> [..., d_sae]`` latent activations."""
        return self.activate(self.pre_acts(x))

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., d_sae] -> [..., d_in]`` reconstruction, in the SAE's dtype."""
        return h.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x))

    # -- construction --------------------------------------------------------
    @classmethod
    def random(cls, cfg: SAEConfig, *, seed: int = 0, threshold: float = 0.0) -> SAE:
        """An untrained SAE: unit-norm random decoder, encoder its transpose."""
        gen = torch.Generator().manual_seed(seed)
        sae = cls(replace(cfg, dtype="float32"))
        w = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
        w = w / w.norm(dim=-1, keepdim=True)
        with torch.no_grad():
            sae.W_dec.copy_(w)
            sae.W_enc.copy_(w.T)
            sae.b_enc.copy_(0.1 * torch.randn(cfg.d_sae, generator=gen) / math.sqrt(cfg.d_in))
            if cfg.activation == "jumprelu":
                sae.threshold.fill_(threshold)
        return sae

    def state(self) -> dict[str, torch.Tensor]:
        """Weights under SAELens's key names."""
        keys = ["W_enc", "W_dec", "b_enc", "b_dec"]
        if self.cfg.activation == "jumprelu":
            keys.append("threshold")
        return {key: getattr(self, key).detach().contiguous() for key in keys}

    # -- files ---------------------------------------------------------------
    def save(self, folder: str | Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout), atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state()
        if dtype is not None:
            state = {key: value.to(dtype) for key, value in state.items()}
        dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
        tmp = folder / (SAELENS_WEIGHTS + ".tmp")
        save_file(state, str(tmp))
        tmp.replace(folder / SAELENS_WEIGHTS)
        _write_json(folder / "cfg.json", saelens_cfg(replace(self.cfg, dtype=dtype_name)))
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
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


# -- loading -----------------------------------------------------------------
def load_sae(path: str | Path, *, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder in SAELens, sparsify or Gemma Scope layout (detected).

    ``saelens:RELEASE:SAE_ID`` delegates to the optional ``sae-lens`` package
    (which needs the Hugging Face hub) and converts through SAELens's own files.
    """
    if isinstance(path, str) and path.startswith("saelens:"):
        return _load_via_saelens(path.removeprefix("saelens:")).to(device)
    path = Path(path)
    if path.is_file() and path.name == GEMMASCOPE_WEIGHTS:
        path = path.parent
    if not path.is_dir():
        raise GradSAEError(f"SAE folder {path} does not exist: pass a folder holding cfg.json + weights")
    if (path / SAELENS_WEIGHTS).exists():
        sae = _load_saelens(path)
    elif (path / SPARSIFY_WEIGHTS).exists():
        sae = _load_sparsify(path)
    elif (path / GEMMASCOPE_WEIGHTS).exists():
        sae = _load_gemmascope(path)
    else:
        raise GradSAEError(
            f"{path} holds no SAE weights: expected {SAELENS_WEIGHTS} (SAELens), "
            f"{SPARSIFY_WEIGHTS} (sparsify) or {GEMMASCOPE_WEIGHTS} (Gemma Scope)"
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
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise GradSAEError(
            f"SAELens could not load {release}:{sae_id} ({first}): check hub access or pass a local folder"
        ) from None
    lens = loaded[0] if isinstance(loaded, tuple) else loaded
    with tempfile.TemporaryDirectory() as folder:
        lens.save_model(folder)
        return _load_saelens(Path(folder))


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
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise GradSAEError(f"{path} is corrupt or truncated ({exc}): re-save or re-download it") from None


def _saelens_activation(raw: dict[str, Any]) -> tuple[Activation, int | None]:
    arch = raw.get("architecture", "standard")
    fn = raw.get("activation_fn_str", "relu")
    kwargs = raw.get("activation_fn_kwargs") or {}
    k = raw.get("k", kwargs.get("k"))
    if arch in ("topk", "batchtopk") or fn == "topk":
        return "topk", int(k) if k is not None else None
    if arch == "jumprelu":
        return "jumprelu", None
    if arch == "standard" and fn == "relu":
        return "relu", None
    raise GradSAEError(
        f"SAE architecture {arch!r} / activation {fn!r} is not supported: use standard, jumprelu or topk"
    )


def _hook_layer(raw: dict[str, Any]) -> int | None:
    meta = raw.get("metadata") or {}
    layer = raw.get("hook_layer", meta.get("hook_layer"))
    if layer is None or layer == -1:
        name = raw.get("hook_name", meta.get("hook_name", ""))
        parts = str(name).split(".")
        layer = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    return None if layer is None else int(layer)


def _load_saelens(folder: Path) -> SAE:
    raw = _read_json(folder / "cfg.json")
    activation, k = _saelens_activation(raw)
    weights = _read_safetensors(folder / SAELENS_WEIGHTS)
    if "log_threshold" in weights and "threshold" not in weights:
        weights["threshold"] = weights.pop("log_threshold").exp()
    meta = raw.get("metadata") or {}
    cfg = SAEConfig(
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        activation=activation,
        k=k,
        hook_layer=_hook_layer(raw),
        model_name=str(raw.get("model_name", meta.get("model_name", ""))),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", False)),
        dtype=_dtype_of(weights),
        metadata=dict(meta.get("gradsae") or {}),
    )
    return _from_state(cfg, weights, folder / SAELENS_WEIGHTS)


def _load_sparsify(folder: Path) -> SAE:
    raw = _read_json(folder / "cfg.json")
    weights = _read_safetensors(folder / SPARSIFY_WEIGHTS)
    try:
        enc_w, enc_b = weights["encoder.weight"], weights["encoder.bias"]
        state = {"W_enc": enc_w.T.contiguous(), "b_enc": enc_b, "W_dec": weights["W_dec"], "b_dec": weights["b_dec"]}
    except KeyError as exc:
        raise GradSAEError(f"{folder / SPARSIFY_WEIGHTS} lacks key {exc}: it is not a sparsify SAE") from None
    d_sae, d_in = state["W_dec"].shape
    cfg = SAEConfig(
        d_in=int(raw.get("d_in", d_in)),
        d_sae=int(d_sae),
        activation="topk",
        k=int(raw.get("k", 32)),
        apply_b_dec_to_input=True,
        dtype=_dtype_of(state),
        metadata={"source": "sparsify", **{k: v for k, v in raw.items() if isinstance(v, (int, float, str, bool))}},
    )
    return _from_state(cfg, state, folder / SPARSIFY_WEIGHTS)


def _load_gemmascope(folder: Path) -> SAE:
    import numpy as np

    file = folder / GEMMASCOPE_WEIGHTS
    try:
        with np.load(file) as npz:
            state = {key: torch.from_numpy(npz[key].copy()) for key in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise GradSAEError(f"{file} is corrupt or truncated ({exc}): re-download it") from None
    missing = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"} - set(state)
    if missing:
        raise GradSAEError(f"{file} lacks {sorted(missing)}: it is not a Gemma Scope params.npz")
    d_in, d_sae = state["W_enc"].shape
    layer = None
    for part in folder.parts:
        if part.startswith("layer_") and part[6:].isdigit():
            layer = int(part[6:])
    cfg = SAEConfig(
        d_in=int(d_in),
        d_sae=int(d_sae),
        activation="jumprelu",
        hook_layer=layer,
        dtype=_dtype_of(state),
        metadata={"source": "gemma-scope"},
    )
    return _from_state(cfg, state, file)


def _dtype_of(state: dict[str, torch.Tensor]) -> str:
    return str(next(iter(state.values())).dtype).removeprefix("torch.")


def _from_state(cfg: SAEConfig, state: dict[str, torch.Tensor], source: Path) -> SAE:
    sae = SAE(cfg)
    expected = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    for name, shape in expected.items():
        if name not in state:
            raise GradSAEError(f"{source} lacks weight {name!r}: the file is incomplete or of another format")
        if tuple(state[name].shape) != shape:
            raise GradSAEError(
                f"{source}: weight {name} has shape {tuple(state[name].shape)} but cfg.json implies {shape}; "
                "the cfg.json and weights do not belong together"
            )
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


def check_compatible(sae: SAE, *, d_model: int, n_layers: int, layer: int) -> None:
    """Refuse an SAE whose width or layer does not fit the model."""
    if sae.cfg.d_in != d_model:
        raise GradSAEError(
            f"SAE d_in={sae.cfg.d_in} does not match the model's hidden size {d_model}: "
            "use an SAE trained on this model"
        )
    if not 0 <= layer < n_layers:
        raise GradSAEError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}")
