"""Sparse autoencoders: the configuration, encode and decode.

For token states ``x`` (``[..., d_in]``)::

    pre  = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc      [..., d_sae]
    h    = sigma(pre)                                               [..., d_sae]
    x^   = h @ W_dec + b_dec                                        [..., d_in]

with ``sigma`` one of

* ``relu``:      ``max(pre, 0)``
* ``jumprelu``:  ``relu(pre) * (pre > threshold)`` with a per-latent ``threshold`` (as SAELens:
  a negative threshold still zeroes negative pre-activations)
* ``topk``:      keep the ``k`` largest ``pre`` per token, then ``max(., 0)``

Shapes follow SAELens: ``W_enc`` is ``[d_in, d_sae]``, ``W_dec`` is ``[d_sae, d_in]``.
The maths runs in the weights' dtype: ``encode`` and ``decode`` cast their input
to it (so a float32 SAE on a bfloat16 model selects and reconstructs in float32).

An SAE reads the residual stream at ``hook_point`` of ``hook_layer``: ``resid_post``
is the output of decoder block ``l`` (``blocks.l.hook_resid_post``), ``resid_pre``
its input (``blocks.l.hook_resid_pre``). Other hook points are refused at load.

Files (SAELens, sparsify, Gemma Scope 1 and 2; :func:`~gradsae.sae_formats.load_sae`,
:func:`~gradsae.sae_formats.save_sae`) are read and written by :mod:`gradsae.sae_formats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from gradsae.errors import GradSAEError

Activation = Literal["relu", "jumprelu", "topk"]
ACTIVATIONS: tuple[str, ...] = ("relu", "jumprelu", "topk")
HookPoint = Literal["resid_post", "resid_pre"]
HOOK_POINTS: tuple[str, ...] = ("resid_post", "resid_pre")


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
    """Decoder layer whose residual stream the SAE reads (at ``hook_point``)."""
    hook_point: HookPoint = "resid_post"
    """``resid_post``: the output of block ``hook_layer``; ``resid_pre``: its input."""
    model_name: str = ""
    """Model the SAE was trained on."""
    apply_b_dec_to_input: bool = False
    """Subtract ``b_dec`` from the input before encoding (sparsify and some SAELens SAEs)."""
    dtype: str = "float32"
    """Dtype of the parameters and of the maths (cfg.json's ``dtype``; the weights file may be narrower)."""
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """Free-form training and evaluation details (written to ``cfg.json``)."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise GradSAEError(f"unknown SAE activation {self.activation!r}: use one of {', '.join(ACTIVATIONS)}")
        if self.activation == "topk" and (self.k is None or not 0 < self.k <= self.d_sae):
            raise GradSAEError(f"a topk SAE needs 0 < k <= d_sae={self.d_sae}, got k={self.k}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise GradSAEError(f"SAE sizes must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.hook_point not in HOOK_POINTS:
            raise GradSAEError(f"unknown SAE hook point {self.hook_point!r}: use one of {', '.join(HOOK_POINTS)}")

    @property
    def hook_name(self) -> str:
        """The TransformerLens-style name SAELens uses for this hook point."""
        layer = -1 if self.hook_layer is None else self.hook_layer
        return f"blocks.{layer}.hook_{self.hook_point}"


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
    def pre_acts(self, x: torch.Tensor, latents: slice = slice(None)) -> torch.Tensor:
        """``[..., d_in] -> [..., d_sae]``: encoder pre-activations, in the SAE's dtype.

        ``latents``: a block of latents only (``[..., len(block)]``), for encoders too wide to run at once.
        """
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        if x.ndim == 2:  # the bias added inside the matmul: one pass over the [n, d_sae] output, not two
            return torch.addmm(self.b_enc[latents], x, self.W_enc[:, latents])
        return x @ self.W_enc[:, latents] + self.b_enc[latents]

    def activate(self, pre: torch.Tensor, latents: slice = slice(None)) -> torch.Tensor:
        """Apply the SAE's nonlinearity to pre-activations (of the block ``latents``; not for ``topk``)."""
        if self.cfg.activation == "relu":
            return torch.relu(pre)
        if self.cfg.activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold[latents])
        if latents != slice(None):
            raise GradSAEError("a TopK activation needs every latent's pre-activation: pass no latent block")
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


def check_compatible(sae: SAE, *, d_model: int, n_layers: int, layer: int) -> None:
    """Refuse an SAE whose width or layer does not fit the model."""
    if sae.cfg.d_in != d_model:
        raise GradSAEError(
            f"SAE d_in={sae.cfg.d_in} does not match the model's hidden size {d_model}: "
            "use an SAE trained on this model"
        )
    if not 0 <= layer < n_layers:
        raise GradSAEError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}")
