"""SAEs shipped inside the package for the embedded models.

``src/gradsae/saes/<model>/layer_<l>/`` hold TopK SAEs in SAELens's layout, trained
by ``gradsae train-sae``: ``smollm2-135m-instruct`` (the default model) at layers 6,
15 and 24, ``gemma3-270m`` at layer 9. Each folder's ``README.md`` is its model card.
Where none ships, callers get a clearly labelled random SAE instead.

Every SAE that has shipped keeps a name, so that earlier results stay reproducible
when newer SAEs replace them at the default path: ``--sae shipped:<name>`` loads the SAE
of that name at the layer asked for (SmolLM2: ``shipped:k64``, the 4608-latent, k = 64
``taskmix`` SAEs shipped now; ``shipped:k32``, the k = 32 ``chatmix`` SAEs they replaced).
:data:`SHIPPED_VERSIONS` pins each by its weights' SHA-256. It is looked for in
``saes/<model>/<name>/layer_<l>/`` (where a replaced version is moved) and then in
``saes/<model>/layer_<l>/`` (while it is the current one); the first folder whose weights
have the pinned digest is used, and none is an error.
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
from gradsae.sae import SAE, SAEConfig, check_compatible
from gradsae.sae_formats import load_sae

log = logging.getLogger(__name__)

DEFAULT_LAYER = 6
SHIPPED_LAYERS = (6, 15, 24)
SHIPPED_K = 32
SHIPPED_FOLDER = "smollm2-135m-instruct"
UNTRAINED = "UNTRAINED random SAE (no trained SAE ships for this model/layer yet)"


SHIPPED_VERSIONS: dict[str, dict[str, dict[int, str]]] = {
    SHIPPED_FOLDER: {
        "k32": {
            6: "da8447a5277fcb4bbe760c57ead4f41d5fb25e3736eb7bf6a1ab9ed81858384d",
            15: "79b625544c3dca2ec0e92f4d6ee714acaa55dbf82f299f28862541e149d245db",
            24: "2cebc5f4f26fcd92b769da09db1d71362093d91811dc11bb76085eb2865c8450",
        },
        "k64": {
            6: "7af19f6425a46bcdde85d2478f2fd703ebbaec0c6d6710b61392f7fb37ac7283",
            15: "ea5650cc75c3c387097e7533c65ee4bb15052ba698bc3725f963fa60e2acc850",
            24: "50ce457a3ad9d41b8c5d0a09cc05b78e5e1602555688312a7b28da7e7e1dc312",
        },
    },
    "gemma3-270m": {
        "news": {9: "e88c9cda4385611a83c96d61001d2c220ca8f87abe08d203234394749a416efa"},
        "k64": {9: "a5e1da1149cb49d8ac3de507a3d130c3b2d2ab6c0d3ead548523d92eb42c1154"},
    },
}
"""``saes/`` folder -> version name -> layer -> SHA-256 of ``sae_weights.safetensors`` (module docstring)."""
SHIPPED_PREFIX = "shipped:"

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


def is_version_spec(spec: str | Path | None) -> bool:
    """Is ``spec`` a ``shipped:<name>`` version rather than a folder?"""
    return isinstance(spec, str) and spec.startswith(SHIPPED_PREFIX)


def check_version_spec(spec: str, layers: Sequence[int | None], model: str | None = None) -> None:
    """Refuse an unknown ``shipped:<name>`` or a layer that version lacks (before any model loads)."""
    name = spec.removeprefix(SHIPPED_PREFIX)
    folders = [shipped_folder(model)] if shipped_folder(model) is not None else list(SHIPPED_VERSIONS)
    known = {v: sorted(by_layer) for f in folders if f for v, by_layer in SHIPPED_VERSIONS.get(f, {}).items()}
    if name not in known:
        names = ", ".join(SHIPPED_PREFIX + v for v in known) or "none"
        raise GradSAEError(f"--sae {spec}: no shipped SAEs of that name (known: {names}): pass one, or a folder")
    for layer in layers:
        use = DEFAULT_LAYER if layer is None else layer
        if use not in known[name]:
            have = ", ".join(str(n) for n in known[name])
            raise GradSAEError(f"--sae {spec} has no SAE at layer {use} (it has layers {have}): pass one of those")


def shipped_version_path(name: str, layer: int, model: str | None = None) -> Path:
    """Folder of the shipped SAE version ``name`` at ``layer`` (module docstring); an error if none matches."""
    folder = shipped_folder(model)
    pinned = SHIPPED_VERSIONS.get(folder or "", {}).get(name, {}).get(layer)
    if folder is None or pinned is None:
        check_version_spec(SHIPPED_PREFIX + name, [layer], model)
        raise GradSAEError(f"--sae {SHIPPED_PREFIX}{name} is for another model: pass a folder instead")
    root = _root(model)
    assert root is not None
    for candidate in (root / name / f"layer_{layer}", root / f"layer_{layer}"):
        weights = candidate / "sae_weights.safetensors"
        if weights.is_file() and hashlib.sha256(weights.read_bytes()).hexdigest() == pinned:
            return candidate
    raise GradSAEError(
        f"the shipped SAE {SHIPPED_PREFIX}{name} at layer {layer} is not in this install (no folder under {root} "
        f"holds weights with sha256 {pinned[:12]}): reinstall gradsae, or pass the SAE's folder"
    )


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

    ``sae`` is a folder (any supported layout) or ``shipped:<name>``, a named shipped
    version (module docstring); ``None`` means the shipped SAE of an embedded model at
    ``layer`` (default 6), else an untrained random SAE.
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
    if is_version_spec(sae):
        assert sae is not None
        return _version(lm, sae, DEFAULT_LAYER if layer is None else layer)
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


def _version(lm: LoadedModel, spec: str, layer: int) -> ResolvedSAE:
    check_layers(lm, [layer])
    path = shipped_version_path(spec.removeprefix(SHIPPED_PREFIX), layer, lm.name)
    return ResolvedSAE(_wide(load_sae(path)), layer, f"{shipped_label(path)}, {spec}")


def shipped_label(path: Path) -> str:
    """``shipped SAE <model>/layer_<l> (<corpus>, sha256 <12 hex>)``: which of the SAEs ever shipped there."""
    cfg = json.loads((path / "cfg.json").read_text())
    corpus = cfg.get("dataset_path") or "corpus not stated"
    digest = hashlib.sha256((path / "sae_weights.safetensors").read_bytes()).hexdigest()[:12]
    return f"shipped SAE {path.parent.name}/{path.name} ({corpus}, sha256 {digest})"


def _wide(sae: SAE) -> SAE:
    """The SAE in at least float32 (a float64 one stays float64)."""
    return sae.to(dtype=torch.promote_types(sae.W_enc.dtype, torch.float32))
