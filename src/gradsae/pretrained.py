"""SAEs shipped inside the package for the embedded default model.

``src/gradsae/saes/smollm2-135m-instruct/layer_{6,15,24}/`` hold TopK SAEs
(width 4608) in SAELens's layout, trained by ``gradsae train-sae`` on the
NewsArticles corpus; each folder's ``README.md`` is its model card. Until they
exist, callers get a clearly labelled random SAE instead.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import torch

from gradsae.errors import GradSAEError
from gradsae.models import DEFAULT_NAMES, LoadedModel, check_layers
from gradsae.sae import SAE, SAEConfig, load_sae

log = logging.getLogger(__name__)

DEFAULT_LAYER = 6
SHIPPED_LAYERS = (6, 15, 24)
SHIPPED_K = 32
SHIPPED_FOLDER = "smollm2-135m-instruct"
UNTRAINED = "UNTRAINED random SAE (no trained SAE ships for this model/layer yet)"


def shipped_sae_path(layer: int) -> Path | None:
    """Folder of the shipped SAE for ``layer`` of the default model, if it exists."""
    folder = Path(str(resources.files("gradsae"))) / "saes" / SHIPPED_FOLDER / f"layer_{layer}"
    return folder if (folder / "sae_weights.safetensors").exists() else None


class ResolvedSAE(NamedTuple):
    """What :func:`resolve_sae` found."""

    sae: SAE
    """The SAE (parameters frozen)."""
    layer: int
    """The decoder block it is spliced at."""
    label: str
    """What it is, for reports (a folder, ``shipped SAE ...`` or the UNTRAINED warning)."""


def resolve_sae(
    lm: LoadedModel,
    sae: str | Path | None = None,
    layer: int | None = None,
    *,
    default_model: bool | None = None,
) -> ResolvedSAE:
    """The SAE to use, its layer, and a label saying what it is.

    ``sae`` is a folder (any supported layout); ``None`` means the shipped SAE of
    the default model at ``layer`` (default 6), else an untrained random SAE.
    ``default_model`` says whether ``lm`` is the embedded default (default: judged
    from ``lm.name``).

    The SAE is kept in (at least) float32 whatever the model's dtype: TopK and
    JumpReLU selection, the error term and the latent gradients then run in
    float32, and the splice casts only its output back to the model's dtype.
    """
    if default_model is None:
        default_model = lm.name in DEFAULT_NAMES
    found = _resolve(lm, None if sae is None else str(sae), layer, default_model=default_model)
    found.sae.requires_grad_(False)
    return found


def _resolve(lm: LoadedModel, sae: str | None, layer: int | None, *, default_model: bool) -> ResolvedSAE:
    if sae is not None:
        loaded = _wide(load_sae(sae))
        use = layer if layer is not None else loaded.cfg.hook_layer
        if use is None:
            raise GradSAEError(f"SAE {sae} does not say its layer: pass --layer")
        return ResolvedSAE(loaded, int(use), str(sae))
    use = DEFAULT_LAYER if layer is None else layer
    check_layers(lm, [use])
    path = shipped_sae_path(use) if default_model else None
    if path is not None:
        return ResolvedSAE(_wide(load_sae(path)), use, f"shipped SAE {SHIPPED_FOLDER}/layer_{use}")
    log.warning("using an %s at layer %d", UNTRAINED, use)
    cfg = SAEConfig(d_in=lm.d_model, d_sae=8 * lm.d_model, activation="topk", k=SHIPPED_K, hook_layer=use)
    return ResolvedSAE(_wide(SAE.random(cfg, seed=0)), use, UNTRAINED)


def _wide(sae: SAE) -> SAE:
    """The SAE in at least float32 (a float64 one stays float64)."""
    return sae.to(dtype=torch.promote_types(sae.W_enc.dtype, torch.float32))
