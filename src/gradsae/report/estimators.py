"""``estimators.md``: which estimator to trust, per task and layer, judged by the exact oracle (issue 23).

Read from a sweep's stored curves (``gradsae sweep --methods gradsae,activation,random,ig,relp``;
:mod:`gradsae.experiments.curves`). For each cell (task, layer) and each ranking ``m`` it puts side
by side, each as the mean over the cell's curve examples with a 95% bootstrap interval:

* Spearman's rho of ``m``'s score against the exact effect ``e_c = Y_0 - Y({c})``, over all active
  latents and over the exact top-50 (by ``e_c``);
* recall of the exact top-10 among ``m``'s top 10;
* the threshold budget: exact ablations taken in ``m``'s order until every latent with
  ``|e_c| >= 5% Y_0`` is found (AtP*; smaller is better, the number of active latents is the worst);
* ``D(K) / Y_0`` at the experiment's K (the drop after zeroing ``m``'s top K);
* the cost of one score in forward + backward equivalents, from a benchmark file when given
  (``benchmarks/results.json``: ``ig_cost``, ``relp_cost``; GradSAE and its signed sum are one
  forward + backward by definition; activation needs the forward only).

and counts, per estimator, the cells that meet issue 23's bar (recall@10 >= 0.9 and Spearman over the
exact top-50 >= 0.9). ``random`` is the floor every figure is read against. Nothing is recomputed:
``gradsae report SWEEP_DIR`` rewrites the same page from the same files.

The recommended default (:func:`recommend`) is the estimator (``random`` and ``activation`` excepted:
they estimate no effect) ranked first by, in turn: the cells meeting the bar, the mean over cells of
recall@10 (the top of the ranking is what masking and steering use), the mean of the top-50 Spearman,
then the lower cost. The page states the rule and the winner's figures beside the paper's score, and
tests the difference: per cell, the paired two-sided sign-flip test of recall@10 (and of the top-50
Spearman) over the curve examples (:func:`~gradsae.experiments.stats.paired_p`), Holm over the cells,
counted with the independent example sets behind them (a task's layers share its examples).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradsae import _files
from gradsae.experiments.results import CurveResult, from_data
from gradsae.experiments.stats import ALPHA, paired_p, resolved, smallest_p
from gradsae.report.curves import fmt_metric, metric_title

ESTIMATORS_PAGE = "estimators.md"
ORDER = ("gradsae", "gradsae_sum", "ig", "relp", "activation", "random")
NAMES = {
    "gradsae": "GradSAE (paper: mean relu)",
    "gradsae_sum": "GradSAE sum (signed, first order)",
    "ig": "integrated gradients (sum)",
    "relp": "RelP (sum)",
    "activation": "activation",
    "random": "random (floor)",
}
BAR = {"recall": 0.9, "spearman_top": 0.9}
"""Issue 23's target for the best estimator, in every cell."""
THRESHOLD = "budget_0.05"
COST_FIGURES = {"ig": "ig_cost", "relp": "relp_cost"}
FIXED_COSTS = {"gradsae": 1.0, "gradsae_sum": 1.0}
CHOOSE = {
    "gradsae": "the default (`--aggregation paper`)",
    "gradsae_sum": "`gradsae score --aggregation sum` (the experiments' TopK sets use the paper's score)",
    "ig": "`--methods ig` (`--ig-steps N`)",
    "relp": "`--methods relp`",
}
"""How a user picks each estimator that :func:`recommend` may name."""


def cells(runs: Sequence[Any]) -> list[tuple[str, CurveResult]]:
    """(task, curves) for every layer of every sweep run that stored curves."""
    out = []
    for run in runs:
        for layer in run.results.layers:
            if layer.curves:
                out.append((run.task, from_data(CurveResult, layer.curves)))
    return out


def costs_from(bench: Mapping[str, Any] | None) -> dict[str, float]:
    """Forward + backward equivalents per estimator (``ig``/``relp`` measured by the benchmark when given)."""
    costs = dict(FIXED_COSTS)
    figures = (bench or {}).get("figures", {})
    for method, name in COST_FIGURES.items():
        value = figures.get(name, {}).get("value")
        if value is not None:
            costs[method] = float(value)
    return costs


def estimators_markdown(runs: Sequence[Any], *, command: str, bench: Mapping[str, Any] | None = None) -> str:
    """The whole page (see the module docstring)."""
    found = cells(runs)
    lines = [
        "# Which estimator to trust: every ranking against exact ablation",
        "",
        f"Command (paths relative to this folder): `{command}`",
        "",
    ]
    if not found:
        return "\n".join([*lines, "No run of this sweep stored faithfulness curves (run it without --no-curves).", ""])
    methods = [m for m in ORDER if any(m in result.methods for _, result in found)]
    costs = costs_from(bench)
    lines += _bar_lines(found, methods)
    lines += _recommendation_lines(found, methods, costs)
    lines += [
        "",
        "Per cell: mean over the curve examples [95% bootstrap interval over examples]; the cost is one score in "
        "forward + backward equivalents (" + _cost_note(costs) + ").",
        "",
    ]
    for task, result in found:
        lines += _cell_table(task, result, methods, costs)
    return "\n".join(lines) + "\n"


def _bar_lines(found: Sequence[tuple[str, CurveResult]], methods: Sequence[str]) -> list[str]:
    lines = ["## Summary (written from the numbers below)", ""]
    for m in methods:
        if m == "random":
            continue
        met = [(task, result.layer) for task, result in found if _meets(result, m)]
        measured = sum(_bar_measured(result, m) for _, result in found)  # the cells standing() counts too
        lines.append(
            f"- {NAMES[m]}: recall of the exact top-10 >= {BAR['recall']} and Spearman over the exact top-50 >= "
            f"{BAR['spearman_top']} in {len(met)} of {measured} cells"
            + (": " + ", ".join(f"{t} layer {layer}" for t, layer in met) if met else "")
            + "."
        )
    return lines


def _bar_measured(result: CurveResult, method: str) -> bool:
    return method in result.methods and all(name in result.metric_names() for name in BAR)


def _meets(result: CurveResult, method: str) -> bool:
    """Does ``method`` meet issue 23's bar in this cell?"""
    return _bar_measured(result, method) and all(_mean(result, name, method) >= bar for name, bar in BAR.items())


def standing(found: Sequence[tuple[str, CurveResult]], method: str) -> tuple[int, int, float, float]:
    """(cells meeting the bar, cells measured, mean recall@10 over cells, mean top-50 Spearman over cells)."""
    mine = [result for _, result in found if _bar_measured(result, method)]
    met = sum(_meets(r, method) for r in mine)
    if not mine:
        return 0, 0, float("nan"), float("nan")
    recall = sum(_mean(r, "recall", method) for r in mine) / len(mine)
    top = sum(_mean(r, "spearman_top", method) for r in mine) / len(mine)
    return met, len(mine), recall, top


def recommend(
    found: Sequence[tuple[str, CurveResult]], methods: Sequence[str], costs: Mapping[str, float]
) -> str | None:
    """The recommended default estimator by the module docstring's rule (``None`` if none was measured)."""
    candidates = [m for m in methods if m in CHOOSE and standing(found, m)[1]]
    if not candidates:
        return None

    def key(m: str) -> tuple[float, float, float, float]:
        met, _, recall, top = standing(found, m)
        return (-met, -recall, -top, costs.get(m, float("inf")))

    return min(candidates, key=key)


def _against_paper(found: Sequence[tuple[str, CurveResult]], best: str) -> str:
    """The paired tests of ``best`` against the paper's score, cell by cell, counted after Holm."""
    parts, sets_note, notes = [], 0, []
    for name, label in (("recall", "recall@10"), ("spearman_top", "the top-50 Spearman")):
        pvalues, signs, sets, sizes = [], [], [], []
        for task, result in found:
            if {best, "gradsae"} <= set(result.methods) and name in result.metric_names():
                pairs = [
                    (x, y)
                    for x, y in zip(result.per_example(name, best), result.per_example(name, "gradsae"), strict=True)
                    if math.isfinite(x) and math.isfinite(y)
                ]
                if not pairs:
                    continue
                a, b = [x for x, _ in pairs], [y for _, y in pairs]
                pvalues.append(paired_p(a, b)[0])
                sizes.append(len(pairs))
                signs.append(sum(a) / len(a) - sum(b) / len(b))
                sets.append(task)
        counted = resolved(pvalues, signs, sets)
        sets_note = max(sets_note, counted.example_sets)  # the tasks behind the tested cells
        floor = smallest_p(max(sizes, default=0))  # (enumerated below 17 pairs, the only sizes where it can bind)
        if pvalues and floor > ALPHA / len(pvalues):  # Holm's first step compares the smallest p with alpha / m
            notes.append(
                f"for {label}, with at most {max(sizes)} examples per cell the smallest p the two-sided "
                f"sign-flip test can give is {floor:.3g}, above Holm's first threshold {ALPHA:g} / {len(pvalues)} = "
                f"{ALPHA / len(pvalues):.3g}: no cell can be resolved at this size, whatever the data"
            )
        higher = sum(1 for x in signs if x > 0)
        parts.append(
            f"{label} higher than the paper's in {higher} of {counted.cells} cells by the point estimate, "
            f"{counted.positive} higher and {counted.negative} lower after Holm"
        )
    text = (
        "Against the paper's score (paired sign-flip test over each cell's curve examples, Holm over the cells; "
        f"{sets_note} independent example sets): " + "; ".join(parts) + "."
    )
    return text + "".join(f" Note: {n}." for n in notes)


def _recommendation_lines(
    found: Sequence[tuple[str, CurveResult]], methods: Sequence[str], costs: Mapping[str, float]
) -> list[str]:
    best = recommend(found, methods, costs)
    if best is None:
        return []
    met, measured, recall, top = standing(found, best)
    cost = f"{costs[best]:.2f} forward + backward" if best in costs else "cost not measured"
    line = (
        f"- Recommended default (rule: most cells meeting the bar, then the highest mean recall@10 over cells, then "
        f"the highest mean top-50 Spearman, then the lower cost): {NAMES[best]}: the bar in {met} of {measured} "
        f"cells, mean recall@10 {recall:.2f}, mean top-50 Spearman {top:.2f}, {cost}; choose it with {CHOOSE[best]}."
    )
    if best != "gradsae" and standing(found, "gradsae")[1]:
        p_met, p_measured, p_recall, p_top = standing(found, "gradsae")
        line += (
            f" The paper's score ({NAMES['gradsae']}): the bar in {p_met} of {p_measured} cells, mean recall@10 "
            f"{p_recall:.2f}, mean top-50 Spearman {p_top:.2f}."
        )
        line += " " + _against_paper(found, best)
    if not any(0 < met == measured for met, measured, _, _ in (standing(found, m) for m in methods if m in CHOOSE)):
        line += " No estimator meets the bar in every cell it was measured in."
    return [line]


def _mean(result: CurveResult, name: str, method: str) -> float:
    return result.metric(name, method).mean


def _cost_note(costs: Mapping[str, float]) -> str:
    measured = [f"{NAMES[m]} {costs[m]:.2f}" for m in ("ig", "relp") if m in costs]
    text = "GradSAE and its sum 1 by definition; activation a forward only"
    return text + ("; measured by the benchmark: " + ", ".join(measured) if measured else "; ig/relp: no benchmark")


def _cell_table(task: str, result: CurveResult, methods: Sequence[str], costs: Mapping[str, float]) -> list[str]:
    names = result.metric_names()
    wanted = ["spearman", "spearman_top", "recall", THRESHOLD, *(n for n in names if n.startswith("deletion@"))]
    shown = [n for n in wanted if n in names]
    head = ["estimator", *(metric_title(n, result.top) for n in shown), "cost (fwd+bwd)"]
    mean_active = sum(ex.n_active for ex in result.examples) / max(1, len(result.examples))
    lines = [
        f"### {task}, layer {result.layer} ({len(result.examples)} examples, {mean_active:.0f} active latents on "
        "average)",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for m in methods:
        if m not in result.methods:
            continue
        row = [NAMES[m], *(fmt_metric(result.metric(n, m), 0 if n.startswith("budget") else 2) for n in shown)]
        row.append(f"{costs[m]:.2f}" if m in costs else ("forward only" if m == "activation" else "-"))
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def write_estimators(
    folder: str | Path, runs: Sequence[Any], *, command: str, bench: Mapping[str, Any] | None = None
) -> Path:
    """Write ``<folder>/estimators.md`` (atomically)."""
    return _files.write_text(Path(folder) / ESTIMATORS_PAGE, estimators_markdown(runs, command=command, bench=bench))
