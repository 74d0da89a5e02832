"""gradsae: find the SAE latents that drive a language model's output (GradSAE), prove it, steer with them.

The public API (``import gradsae`` loads neither torch nor transformers; each name loads on first use)::

    from gradsae import load_model, resolve_sae, score_latents, NextTokenProb, ScoreOptions, splice, Edit

    lm = load_model()                                   # embedded SmolLM2-135M-Instruct
    sae, layer, label = resolve_sae(lm, layer=6)        # the shipped SAE for layer 6
    enc = lm.tokenizer(["The capital of France is"], return_tensors="pt")
    scores = score_latents(lm, sae, enc, NextTokenProb(), options=ScoreOptions(layer=layer))
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = importlib.metadata.version("gradsae")
"""The installed distribution's version (``pyproject.toml``): the one version source."""


class _Package(types.ModuleType):
    """``gradsae`` itself: ``splice`` is both a submodule and the function exported here, so when the
    import system binds the submodule as an attribute (on its first import), the function is bound instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "splice" and isinstance(value, types.ModuleType):
            value = value.splice
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

_EXPORTS = {
    "splice": "gradsae.splice",
    "Edit": "gradsae.splice",
    "load_model": "gradsae.models",
    "LoadedModel": "gradsae.models",
    "SAE": "gradsae.sae",
    "SAEConfig": "gradsae.sae",
    "load_sae": "gradsae.sae_formats",
    "save_sae": "gradsae.sae_formats",
    "resolve_sae": "gradsae.pretrained",
    "ResolvedSAE": "gradsae.pretrained",
    "NextTokenProb": "gradsae.objectives",
    "TargetLogProb": "gradsae.objectives",
    "LabelLogProb": "gradsae.objectives",
    "CustomObjective": "gradsae.objectives",
    "score_latents": "gradsae.scores",
    "Scores": "gradsae.scores",
    "ScoreOptions": "gradsae.scores",
    "GradSAEError": "gradsae.errors",
}

__all__ = [
    "SAE",
    "CustomObjective",
    "Edit",
    "GradSAEError",
    "LabelLogProb",
    "LoadedModel",
    "NextTokenProb",
    "ResolvedSAE",
    "SAEConfig",
    "ScoreOptions",
    "Scores",
    "TargetLogProb",
    "__version__",
    "load_model",
    "load_sae",
    "resolve_sae",
    "save_sae",
    "score_latents",
    "splice",
]

if TYPE_CHECKING:
    from gradsae.errors import GradSAEError
    from gradsae.models import LoadedModel, load_model
    from gradsae.objectives import CustomObjective, LabelLogProb, NextTokenProb, TargetLogProb
    from gradsae.pretrained import ResolvedSAE, resolve_sae
    from gradsae.sae import SAE, SAEConfig
    from gradsae.sae_formats import load_sae, save_sae
    from gradsae.scores import ScoreOptions, Scores, score_latents
    from gradsae.splice import Edit, splice


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradsae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
