"""The generic loader of result files: what ``asdict`` writes, :func:`from_data` reads back as the same object."""

from __future__ import annotations

import dataclasses
import json
import math

from gradsae.experiments.results import Condition, CurveResult, ExampleCurves, ExampleRecord, LatentTrace, from_data
from gradsae.experiments.stats import Stat


def _round_trip(obj):
    return from_data(type(obj), json.loads(json.dumps(dataclasses.asdict(obj))))


def test_nested_dataclasses_tuples_and_optionals_read_back_equal():
    stat = Stat(mean=50.0, low=25.0, high=75.0, n=4)
    condition = Condition("gradsae", "top", "10", stat, stat, own=None, per_example=(1.0, 0.0))
    assert _round_trip(condition) == condition
    assert _round_trip(dataclasses.replace(condition, own=stat)).own == stat
    trace = LatentTrace(
        latent=3, gradsae=0.5, mean_activation=1.0, positions=(1, 2), activation=(1.0, 2.0), influence=(0.1, -0.2)
    )
    record = ExampleRecord(
        id="a",
        tokens=("x", "y"),
        prompt_len=1,
        answer="y",
        gold=("y",),
        label=None,
        target="y",
        objective=0.3,
        top={"gradsae": ((3, 0.5), (4, 0.25))},
        traces=(trace,),
        masked={"none": "y"},
    )
    assert _round_trip(record) == record and isinstance(_round_trip(record).top["gradsae"][0], tuple)
    curves = CurveResult(
        layer=1,
        mode="error",
        grid=(0.0, 1.0),
        methods=("random",),
        top=1,
        examples=(
            ExampleCurves(
                token=2,
                clean=0.5,
                n_active=2,
                ks=(0, 2),
                deletion={"random": (0.5, 0.1)},
                sufficiency={"random": (0.1, 0.5)},
                spearman={"random": math.nan},
                recall={"random": 1.0},
                budget={"random": 1},
            ),
        ),
    )
    again = _round_trip(curves)
    assert again.examples[0].deletion == curves.examples[0].deletion and again.grid == curves.grid


def test_unknown_keys_are_ignored_and_missing_ones_take_defaults():
    data = {"method": "none", "set": "-", "k": "0", "exact": {"mean": 1, "low": 1, "high": 1, "n": 1}}
    data |= {"f1": data["exact"], "added_by_a_newer_version": 7}
    condition = from_data(Condition, data)
    assert condition.per_example == () and condition.edit == "zero" and isinstance(condition.exact.mean, float)
