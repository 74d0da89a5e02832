"""Feature cards in Neuronpedia's upload format: one JSON file per SAE (source), ready for ``upload-batch``.

Target: the payload of Neuronpedia's feature upload (its Python library's
``FeatureRequest.upload_batch``, ``POST /api/feature/upload-batch``)::

    {"modelId": str, "source": "{layer}-{source set}",
     "features": [{"index": int, "density": float,
                   "activations": [{"tokens": [str], "values": [float]}, ...],   at least one
                   "explanations": [],
                   "topLogits": [{"token": str, "value": float}, ...],
                   "bottomLogits": [{"token": str, "value": float}, ...]}, ...]}

Per card of latent ``c``: ``density`` is the share of corpus tokens where ``c`` fires,
``activations`` its top contexts by activation, ``topLogits`` / ``bottomLogits`` the logit
lens's promoted / suppressed tokens. A latent with no context (it never fired on the corpus)
cannot be uploaded (Neuronpedia wants at least one activation) and is left out.
GradSAE's own fields (influence contexts, the run's TopK membership) stay in ``cards_layer{l}.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradsae import _files
from gradsae.experiments.results import CardSet, FeatureCard

SOURCE_SET = "gradsae-res"
"""Default source-set name: the source id is ``"{layer}-{source set}"``."""


def neuronpedia_upload(cards: CardSet, *, model_id: str | None = None, source_set: str = SOURCE_SET) -> dict[str, Any]:
    """The upload payload of ``cards`` (module docstring); ``model_id`` defaults to the cards' model."""
    return {
        "modelId": model_id or cards.model,
        "source": f"{cards.layer}-{source_set}",
        "features": [_feature(card) for card in cards.cards if card.top_activation],
    }


def _feature(card: FeatureCard) -> dict[str, Any]:
    return {
        "index": card.latent,
        "density": card.density,
        "activations": [{"tokens": list(c.tokens), "values": list(c.activation)} for c in card.top_activation],
        "explanations": [],
        "topLogits": [{"token": t, "value": v} for t, v in card.promoted],
        "bottomLogits": [{"token": t, "value": v} for t, v in card.suppressed],
    }


def write_neuronpedia(path: str | Path, cards: CardSet, **kwargs: Any) -> Path:
    """Write :func:`neuronpedia_upload` as one JSON file."""
    return _files.write_json(path, neuronpedia_upload(cards, **kwargs), sort_keys=False)
