"""SAEs shipped inside the package for the embedded models.

``src/gradsae/saes/<model>/layer_<l>/`` hold TopK SAEs in SAELens's layout, trained
by ``gradsae train-sae``: ``smollm2-135m-instruct`` (the default model) at layers 6,
15 and 24, ``gemma3-270m`` at layer 9. Each folder's ``README.md`` is its model card.
Where none ships, callers get a clearly labelled random SAE instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import torch

from gradsae.embedded import GEMMA_NAMES
from gradsae.errors import GradSAEError
from gradsae.models import DEFAULT_NAMES, LoadedModel, check_layers
from gradsae.sae import SAE, SAEConfig, check_compatible, load_sae

log = logging.getLogger(__name__)

DEFAULT_LAYER = 6
SHIPPED_LAYERS = (6, 15, 24)
SHIPPED_K = 32
SHIPPED_FOLDER = "smollm2-135m-instruct"
UNTRAINED = "UNTRAINED random SAE (no trained SAE ships for this model/layer yet)"


SHIPPED_FOR: dict[str, tuple[str | None, ...]] = {SHIPPED_FOLDER: DEFAULT_NAMES, "gemma3-270m": GEMMA_NAMES}
"""Folder under ``saes/`` -> the ``--model`` names it serves."""


def shipped_folder(model: str | None) -> str | None:
    """The ``saes/`` folder of an embedded model's name (``None``, ``smollm2``, ``gemma3-270m``...), else ``None``."""
    return next((folder for folder, names in SHIPPED_FOR.items() if model in names), None)


def shipped_sae_path(layer: int, model: str | None = None) -> Path | None:
    """Folder of the shipped SAE for ``layer`` of ``model`` (default: the default model), if it exists."""
    root = _root(model)
    folder = root / f"layer_{layer}" if root is not None else None
    return folder if folder is not None and (folder / "sae_weights.safetensors").exists() else None


def shipped_layers(model: str | None = None) -> tuple[int, ...]:
    """The layers with a shipped SAE for ``model``."""
    root = _root(model)
    if root is None:
        return ()
    found = (int(p.name.removeprefix("layer_")) for p in root.glob("layer_*") if p.name[6:].isdigit())
    return tuple(sorted(layer for layer in found if shipped_sae_path(layer, model) is not None))


def _root(model: str | None) -> Path | None:
    """``saes/<folder>`` inside the installed package for ``model``, if it ships any."""
    name = shipped_folder(model)
    return None if name is None else Path(str(resources.files("gradsae"))) / "saes" / name


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
    an embedded model at ``layer`` (default 6), else an untrained random SAE.
    ``default_model`` says whether ``lm`` was loaded by an embedded model's name, so
    that its shipped SAEs apply (default: judged from ``lm.name``).

    The SAE is kept in (at least) float32 whatever the model's dtype: TopK and
    JumpReLU selection, the error term and the latent gradients then run in
    float32, and the splice casts only its output back to the model's dtype.
    """
    if default_model is None:
        default_model = shipped_folder(lm.name) is not None
    found = _resolve(lm, None if sae is None else str(sae), layer, default_model=default_model)
    found.sae.requires_grad_(False)
    return found


def sae_folder(spec: str | Path | None, layer: int | None) -> str | None:
    """``spec`` with ``{layer}`` filled in (``None`` stays ``None``; so does the template when ``layer`` is)."""
    if spec is None:
        return None
    return str(spec) if layer is None else str(spec).replace("{layer}", str(layer))


def resolve_saes(lm: LoadedModel, spec: str | Path | None, layers: Sequence[int | None]) -> list[ResolvedSAE]:
    """:func:`resolve_sae` for each of ``layers`` (``{layer}`` in ``spec`` filled in), each checked against the
    model (its width and layer) before any computing."""
    check_layers(lm, [layer for layer in layers if layer is not None])
    out = []
    for layer in layers:
        found = resolve_sae(lm, sae_folder(spec, layer), layer)
        check_compatible(found.sae, d_model=lm.d_model, n_layers=lm.n_layers, layer=found.layer)
        out.append(found)
    return out


def _resolve(lm: LoadedModel, sae: str | None, layer: int | None, *, default_model: bool) -> ResolvedSAE:
    if sae is not None:
        loaded = _wide(load_sae(sae))
        use = layer if layer is not None else loaded.cfg.hook_layer
        if use is None:
            raise GradSAEError(f"SAE {sae} does not say its layer: pass --layer")
        return ResolvedSAE(loaded, int(use), str(sae))
    use = DEFAULT_LAYER if layer is None else layer
    check_layers(lm, [use])
    model = lm.name if shipped_folder(lm.name) is not None else None
    path = shipped_sae_path(use, model) if default_model else None
    if path is not None:
        return ResolvedSAE(_wide(load_sae(path)), use, shipped_label(path))
    log.warning("using an %s at layer %d", UNTRAINED, use)
    cfg = SAEConfig(d_in=lm.d_model, d_sae=8 * lm.d_model, activation="topk", k=SHIPPED_K, hook_layer=use)
    return ResolvedSAE(_wide(SAE.random(cfg, seed=0)), use, UNTRAINED)


def shipped_label(path: Path) -> str:
    """``shipped SAE <model>/layer_<l> (<corpus>, sha256 <12 hex>)``: which of the SAEs ever shipped there."""
    cfg = json.loads((path / "cfg.json").read_text())
    corpus = cfg.get("dataset_path") or "corpus not stated"
    digest = hashlib.sha256((path / "sae_weights.safetensors").read_bytes()).hexdigest()[:12]
    return f"shipped SAE {path.parent.name}/{path.name} ({corpus}, sha256 {digest})"


def _wide(sae: SAE) -> SAE:
    """The SAE in at least float32 (a float64 one stays float64)."""
    return sae.to(dtype=torch.promote_types(sae.W_enc.dtype, torch.float32))
