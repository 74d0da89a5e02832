"""Cost of the estimators beyond first order and of every layer in one backward (issue 23).

* ``multilayer_cost``: :func:`gradsae.multilayer.score_layers` with SAEs at three
  layers (default 6, 15, 24), one forward and one backward / one single-layer
  GradSAE score at the shallowest of them (the same backward depth), same batch.
  Target <= 1.2. ``extra`` also holds the ratio to the three single-layer scores
  run one after another.
* ``ig_cost``: ``ig`` (``--ig-steps`` 10) / one GradSAE score, same batch: the
  measured cost in GradSAE-score (forward + backward) equivalents. Target <= 11.
* ``relp_cost``: ``relp`` / one GradSAE score. Target <= 1.5 (the same passes;
  the rules add element-wise work).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from benchmarks.common import Figure, compare, load_sae, ratio_figure

if TYPE_CHECKING:
    from gradsae.models import LoadedModel
    from gradsae.sae import SAE

MULTILAYER_TARGET = 1.2
IG_TARGET = 11.0
RELP_TARGET = 1.5


def spread_layers(n_layers: int) -> tuple[int, ...]:
    """Three layers at 20%, 50% and 80% of the depth (6, 15, 24 of SmolLM2's 30)."""
    return tuple(sorted({min(n_layers - 1, round(n_layers * f)) for f in (0.2, 0.5, 0.8)}))


def shipped_saes(lm: LoadedModel, model: str | None) -> dict[int, SAE]:
    """The shipped (else labelled random) SAE at each of :func:`spread_layers`."""
    return {layer: load_sae(lm, None, layer, model)[0] for layer in spread_layers(lm.n_layers)}


def multilayer_cost(
    lm: LoadedModel, saes: dict[int, SAE], ids: torch.Tensor, mask: torch.Tensor, repeats: int
) -> Figure:
    """``score_layers`` at every layer of ``saes`` / a single-layer score at the shallowest."""
    from gradsae.multilayer import score_layers
    from gradsae.objectives import NextTokenProb
    from gradsae.scores import ScoreOptions, score_latents

    layers = sorted(saes)
    first = layers[0]
    fns = {
        "together": lambda: score_layers(lm, saes, ids, mask, NextTokenProb()),
        "single": lambda: score_latents(
            lm,
            saes[first],
            {"input_ids": ids, "attention_mask": mask},
            NextTokenProb(),
            options=ScoreOptions(layer=first),
        ),
        "each": lambda: [
            score_latents(
                lm, s, {"input_ids": ids, "attention_mask": mask}, NextTokenProb(), options=ScoreOptions(layer=lay)
            )
            for lay, s in saes.items()
        ],
    }
    times = compare(fns, repeats)
    detail = (
        f"layers {list(layers)} in one backward {times['together'].median:.3f} s / one score at layer {first} "
        f"{times['single'].median:.3f} s; each layer alone {times['each'].median:.3f} s; batch {tuple(ids.shape)}"
    )
    figure = ratio_figure("multilayer_cost", times["together"], times["single"], MULTILAYER_TARGET, "<=", detail)
    figure.extra["vs_each_alone"] = times["together"].median / times["each"].median
    return figure


def estimator_costs(
    lm: LoadedModel, sae: SAE, ids: torch.Tensor, mask: torch.Tensor, layer: int, repeats: int, ig_steps: int = 10
) -> list[Figure]:
    """``ig`` and ``relp`` against one GradSAE score, same batch."""
    from gradsae.objectives import NextTokenProb
    from gradsae.scores import ScoreOptions, score_methods

    def run(method: str) -> None:
        score_methods(
            lm, sae, ids, mask, NextTokenProb(), methods=(method,), options=ScoreOptions(layer=layer, ig_steps=ig_steps)
        )

    times = compare({m: (lambda m=m: run(m)) for m in ("gradsae", "ig", "relp")}, repeats)
    base = f"one GradSAE score {times['gradsae'].median:.3f} s, batch {tuple(ids.shape)}, layer {layer}"
    return [
        ratio_figure(
            "ig_cost",
            times["ig"],
            times["gradsae"],
            IG_TARGET,
            "<=",
            f"ig ({ig_steps} steps) {times['ig'].median:.3f} s / {base}",
        ),
        ratio_figure("relp_cost", times["relp"], times["gradsae"], RELP_TARGET, "<=", f"relp / {base}"),
    ]
