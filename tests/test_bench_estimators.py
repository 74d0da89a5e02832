"""The estimator benchmarks (benchmarks/estimators.py) run on the tiny model and report ratios."""

from __future__ import annotations

import math

from benchmarks.estimators import estimator_costs, multilayer_cost, spread_layers

from tests.helpers import padded_batch, tiny_lm, tiny_sae


def test_spread_layers() -> None:
    assert spread_layers(30) == (6, 15, 24)
    assert spread_layers(3) == (1, 2)


def test_estimator_timings_run_on_the_tiny_model() -> None:
    lm = tiny_lm(layers=3)
    ids, mask = padded_batch()
    saes = {layer: tiny_sae(layer=layer, seed=layer) for layer in (0, 1, 2)}
    figures = [multilayer_cost(lm, saes, ids, mask, 1), *estimator_costs(lm, saes[1], ids, mask, 1, 1, ig_steps=3)]
    assert [f.name for f in figures] == ["multilayer_cost", "ig_cost", "relp_cost"]
    for figure in figures:
        assert figure.value is not None and math.isfinite(figure.value) and figure.value > 0
    assert figures[0].extra["vs_each_alone"] > 0
