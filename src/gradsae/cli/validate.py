"""Checks of the command line, run before any model loads or anything is computed.

Each check raises :class:`GradSAEError` (printed by :func:`gradsae.cli.main` as
``error: <problem>: <fix>``, exit status 2). They read at most small files: a
model folder's ``config.json``, an SAE's own files, the first bytes of a GGUF
file; outputs are write-probed (:func:`gradsae._files.probe_folder`) so a run
never computes for an hour and then finds it cannot save.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from gradsae import _files
from gradsae.errors import GradSAEError


def at_least(option: str, value: float | None, low: float, *, what: str = "") -> None:
    """Refuse ``value < low`` (``None`` passes: the option's default applies)."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise GradSAEError(f"{option} must be a finite number, got {value}")
    if value < low:
        raise GradSAEError(f"{option} must be at least {low:g}{what}, got {value:g}: pass {option} {low:g} or more")


def positive(option: str, value: float | None) -> None:
    """Refuse ``value <= 0`` or a value that is not finite (``None`` passes)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise GradSAEError(f"{option} must be a positive number, got {value:g}: pass e.g. {option} 1e-4")


def model_and_device(model: str | None, device: str = "cpu", device_map: str | None = None) -> None:
    """The ``--model`` source exists and is what it claims; ``--device`` names a device this machine has;
    ``--device-map`` is one accelerate knows."""
    from gradsae.models import check_device, check_device_map, check_model_source  # torch: not for `report`

    check_device(device)
    check_device_map(device_map)
    check_model_source(model)


def folder_layers(model: str | None) -> int | None:
    """Decoder blocks of a local model folder, read from its ``config.json`` (``None``: not known yet)."""
    config = Path(str(model)) / "config.json" if model else None
    if config is None or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    value = data.get("num_hidden_layers", data.get("n_layer")) if isinstance(data, dict) else None
    return value if isinstance(value, int) else None


def layers(values: Iterable[int | None], model: str | None, *, option: str) -> None:
    """Refuse negative layers, and layers past a local model folder's last block."""
    n_layers = folder_layers(model)
    for layer in values:
        if layer is None:
            continue
        if layer < 0:
            raise GradSAEError(f"{option} {layer} is negative: layers count from 0")
        if n_layers is not None and layer >= n_layers:
            raise GradSAEError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}")


def sae_folders(spec: str | None, values: Sequence[int | None]) -> None:
    """Load each SAE ``--sae`` names (``{layer}`` filled in) once, to refuse a bad one before the model loads."""
    if spec is None or spec.startswith("saelens:"):
        return
    from gradsae.pretrained import check_version_spec, is_version_spec  # torch: not for `report`

    if is_version_spec(spec):
        check_version_spec(spec, values)
        return
    if "{layer}" in spec and any(layer is None for layer in values):
        raise GradSAEError(f"--sae {spec} has {{layer}} in it: pass --layer or --layers too")
    from gradsae.pretrained import sae_folder  # torch: not for `report`
    from gradsae.sae_formats import load_sae

    for folder in dict.fromkeys(str(sae_folder(spec, layer)) for layer in values):
        load_sae(folder)


def out_folder(path: str | Path, *, option: str = "--out") -> None:
    """``path`` is (or can become) a folder this process can write."""
    _files.probe_folder(path, option=option)


def out_file(path: str | Path | None, *, option: str) -> None:
    """A file could be written at ``path`` (``None``: no file asked for)."""
    if path is not None:
        _files.probe_file(path, option=option)


def text(option: str, value: str | None, *, fix: str) -> None:
    """Refuse a value that is empty or only whitespace."""
    if value is not None and not value.strip():
        raise GradSAEError(f"{option} is empty: {fix}")
