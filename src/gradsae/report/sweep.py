"""One table over a sweep of tasks x layers (``gradsae sweep``), read from each task's ``results.json``.

Per task and layer the table puts side by side what the run measured:

* the model's task score without the SAE (``clean``) and with it spliced, and the kept ``n``;
* experiment 1 at each K: the score after zeroing GradSAE's and activation's TopK latents, and the
  paired difference ``GradSAE - activation`` (points, 95% bootstrap interval over the same kept
  examples; negative = GradSAE's latents matter more), with random TopK as the control;
* experiment 2 at each K: the swap's rate to the donor's answer next to its zero-only floor
  (``swap / zero``), per ranking, and the no-edit row (all measured);
* the faithfulness curves (when run with them, :mod:`gradsae.experiments.curves`): every figure of
  :meth:`~gradsae.experiments.curves.CurveResult.metric` (deletion area over log K, sufficiency as the
  fraction of ``Y_0`` kept, Spearman against the signed and absolute effect, recall, budgets) with its
  95% bootstrap interval over examples;
* a summary written from those numbers (:func:`summary_lines`): cells resolved after Holm correction
  (exact McNemar per cell) over the sweep's cells, the independent example sets behind them (a task's
  layers share one), and every reversal.

Nothing is recomputed here: every figure is read from the runs' files, so
``gradsae sweep`` on a finished folder rewrites the same ``sweep.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gradsae import _files
from gradsae.experiments.results import Condition, CurveResult, LayerResult, RunResults, from_data
from gradsae.experiments.stats import Stat, proportion
from gradsae.report.curves import fmt_metric, metric_title
from gradsae.report.tables import NAMES, experiment_sentences, fmt_prop, k_header, ordered_ks, paired_cell

SWEEP_TABLE = "sweep.md"
SUMMARY = "summary.md"
CURVE_METHODS = ("gradsae", "gradsae_sum", "activation")
CURVE_NAMES = {**NAMES, "gradsae_sum": "GradSAE sum", "ig": "IG sum", "relp": "RelP sum"}


def curve_methods(results: Sequence[CurveResult]) -> tuple[str, ...]:
    """:data:`CURVE_METHODS`, then every other estimator some run measured (``random`` and ``ablation`` are the
    anchors, not columns), in the order the runs list them."""
    extra = [m for r in results for m in r.methods if m not in (*CURVE_METHODS, "random", "ablation")]
    return (*CURVE_METHODS, *dict.fromkeys(extra))


@dataclass(frozen=True)
class SweepRun:
    """One task of a sweep: its results and the wall time its run reported (``timing.json``)."""

    task: str
    results: RunResults
    wall_s: float | None


def load_runs(folder: str | Path, tasks: Sequence[str]) -> list[SweepRun]:
    """Each task's ``<folder>/<task>/results.json`` and ``timing.json`` (missing timing: ``None``)."""
    runs = []
    for task in tasks:
        sub = Path(folder) / task
        timing = sub / "timing.json"
        wall = _files.read_json(timing).get("total_s") if timing.is_file() else None
        runs.append(SweepRun(task=task, results=RunResults.load(sub), wall_s=wall))
    return runs


def write_sweep(folder: str | Path, runs: Sequence[SweepRun], *, command: str, origin: str | None = None) -> Path:
    """Write ``<folder>/sweep.md`` and its summary ``<folder>/summary.md`` (each atomically).

    ``origin``: the folder the sweep ran into; the model and SAE paths the runs recorded are written relative
    to it (no directory of the machine that ran them in the page)."""
    _files.write_text(Path(folder) / SUMMARY, summary_markdown(runs, command=command))
    return _files.write_text(Path(folder) / SWEEP_TABLE, sweep_markdown(runs, command=command, origin=origin))


def sweep_tasks(folder: str | Path) -> list[str]:
    """The task sub-folders of a finished sweep (each holds ``results.json``), in ``sweep.md``'s order when
    it names them, else sorted."""
    folder = Path(folder)
    found = sorted(p.parent.name for p in folder.glob("*/results.json"))
    table = folder / SWEEP_TABLE
    if not table.is_file():
        return found
    text = table.read_text()
    return sorted(found, key=lambda task: (text.find(f"`{task}`") < 0, text.find(f"`{task}`")))


def recorded_command(folder: str | Path) -> str:
    """The command line ``sweep.md`` recorded, with its paths relative to the folder (``""`` if none)."""
    table = Path(folder) / SWEEP_TABLE
    if not table.is_file():
        return ""
    command = _raw_command(table)
    out = _files.command_out(command)
    return _files.relative_paths(command, out) if out else command


def recorded_origin(folder: str | Path) -> str | None:
    """The ``--out`` of the command ``sweep.md`` recorded, when it was absolute (older pages), else ``None``."""
    table = Path(folder) / SWEEP_TABLE
    out = _files.command_out(_raw_command(table)) if table.is_file() else None
    return out if out and Path(out).is_absolute() else None


def _raw_command(table: Path) -> str:
    line = next((x for x in table.read_text().splitlines() if x.startswith("Command")), "")
    return line.split("`")[1] if line.count("`") >= 2 else ""


def sweep_markdown(runs: Sequence[SweepRun], *, command: str, origin: str | None = None) -> str:
    """The whole ``sweep.md``: set-up, masking, steering, curves, wall times."""
    ks = _shared_ks(runs)
    out = [
        "# GradSAE sweep: tasks x layers",
        "",
        f"Command (paths relative to this folder): `{command}`",
        "",
        *_setup_lines(runs, origin),
        "",
        *summary_lines(runs),
        *masking_table(runs, ks),
        *steering_table(runs, ks),
        *curves_table(runs),
        *timing_lines(runs),
    ]
    return "\n".join(out) + "\n"


def _shared_ks(runs: Sequence[SweepRun]) -> list[str]:
    """Every run's K, in increasing order of the K actually used (over all layers)."""
    ks: list[str] = []
    for run in runs:
        ks += [k for k in run.results.config.ks if k not in ks]
    every = [c for run in runs for layer in run.results.layers for c in layer.perturbation]
    return ordered_ks(every, ks)


def _all_conditions(runs: Sequence[SweepRun]) -> list[Condition]:
    return [c for run in runs for layer in run.results.layers for c in layer.perturbation]


def summary_lines(runs: Sequence[SweepRun]) -> list[str]:
    """``## Summary``: cells resolved after Holm over the sweep's cells, example sets, reversals, curves."""
    triples = [(run.task, layer, run.results.config) for run in runs for layer in run.results.layers]
    body = experiment_sentences(triples)
    if not body:
        return []
    return ["## Summary (written from the numbers below)", "", *body, ""]


def summary_markdown(runs: Sequence[SweepRun], *, command: str) -> str:
    """The summary alone (``summary.md``)."""
    return "\n".join(["# GradSAE sweep: summary", "", f"Command: `{command}`", "", *summary_lines(runs)]) + "\n"


def _setup_lines(runs: Sequence[SweepRun], origin: str | None = None) -> list[str]:
    rel = (lambda text: _files.relative_paths(text, origin)) if origin else (lambda text: text)
    metas = {(rel(r.results.config.model), r.results.config.mode, r.results.config.seed) for r in runs}
    lines = [
        f"- model / splice mode / seed: {', '.join(f'{m} / {mode} / {s}' for m, mode, s in sorted(metas))}",
    ]
    for run in runs:
        meta = run.results.config
        labels = "; ".join(f"layer {k}: {rel(v)}" for k, v in meta.sae_labels.items())
        lines.append(f"- `{run.task}`: {meta.n} examples drawn, metric {meta.metric}; SAEs: {labels}")
    lines.append(
        "- Cells: share of kept examples [exact 95% Clopper-Pearson interval]; paired differences: points "
        "[95% bootstrap interval], exact McNemar p; `kept` = answered correctly with the SAE spliced, the examples "
        "every perturbation starts from (score 100 before editing). In error mode every layer of a task keeps the "
        "same examples, so a task's cells share one example set."
    )
    return lines


def _rows(runs: Sequence[SweepRun]) -> list[tuple[str, LayerResult]]:
    return [(run.task, layer) for run in runs for layer in run.results.layers]


def _find(conditions: Sequence[Condition], method: str, edit: str, k: str) -> Condition | None:
    for c in conditions:
        if (c.method, c.set, c.edit, c.k) == (method, "top", edit, k):
            return c
    return None


def _mean(stat: Stat | None) -> str:
    return "-" if stat is None or stat.n == 0 or math.isnan(stat.mean) else f"{proportion(stat).mean:.0f}"


def masking_table(runs: Sequence[SweepRun], ks: Sequence[str]) -> list[str]:
    """Experiment 1: model accuracy, kept n, TopK masking per ranking and the paired difference per K."""
    every = _all_conditions(runs)
    extra = [m for m in ("ablation", "activation_answer", "activation_nosink") if any(c.method == m for c in every)]
    head = ["task", "layer", "clean", "with SAE", "kept"]
    for k in ks:
        label = k_header(every, k)
        head += [f"{NAMES[m]} {label}" for m in ("gradsae", "activation", "random", *extra)]
        head += [f"GradSAE - activation {label}"]
    lines = [
        "## Experiment 1: zero the TopK latents (score vs the gold answer; 100 = unperturbed)",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for task, layer in _rows(runs):
        seed = next(r.results.config.seed for r in runs if r.task == task)
        cells = [task, str(layer.layer), fmt_prop(layer.clean_baseline), fmt_prop(layer.baseline), str(layer.n_kept)]
        for k in ks:
            by = {m: _find(layer.perturbation, m, "zero", k) for m in ("gradsae", "activation", "random", *extra)}
            cells += [fmt_prop(c.exact) if c else "-" for c in by.values()]
            cells.append(paired_cell(by["gradsae"], by["activation"], seed=seed))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def steering_table(runs: Sequence[SweepRun], ks: Sequence[str]) -> list[str]:
    """Experiment 2: per ranking and K, the swap's success next to its zero-only floor; the no-edit row."""
    every = _all_conditions(runs)
    head = ["task", "layer", "pairs", "no edit"]
    for k in ks:
        label = k_header(every, k)
        head += [f"{NAMES[m]} {label}" for m in ("gradsae", "activation", "random")]
        head += [f"GradSAE swap - zero-only {label}"]
    lines = [
        "## Experiment 2: steer toward the donor (% of pairs whose answer became the donor's)",
        "",
        "Each cell is `swap / zero-only` (means): the swap zeroes the example's own TopK and injects the "
        "donor's; zero-only does the first half alone. Steering is the swap's rate above its zero-only "
        "floor; `no edit` is the measured rate without any edit. Pairs with the same gold answer are not donors. "
        "`GradSAE swap - zero-only`: paired difference in points [95% bootstrap interval], exact McNemar p.",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for task, layer in _rows(runs):
        none = next((c for c in layer.steering if c.edit == "none"), None)
        cells = [task, str(layer.layer), str(layer.n_donor_pairs), _mean(none.exact if none else None)]
        for k in ks:
            for method in ("gradsae", "activation", "random"):
                swap = _find(layer.steering, method, "swap", k)
                zero = _find(layer.steering, method, "zero", k)
                cells.append(f"{_mean(swap.exact if swap else None)} / {_mean(zero.exact if zero else None)}")
            seed = next(r.results.config.seed for r in runs if r.task == task)
            where = {c.positions for c in layer.steering if c.edit == "swap"}
            first = sorted(where)[0] if where else ""
            part = [c for c in layer.steering if c.positions == first]
            cells.append(paired_cell(_find(part, "gradsae", "swap", k), _find(part, "gradsae", "zero", k), seed=seed))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def curves_table(runs: Sequence[SweepRun]) -> list[str]:
    """Faithfulness per task and layer, every figure with its 95% bootstrap interval over examples (rows
    without curves are left out). Computed from each layer's stored curves, so older files get the new figures
    they hold the data for."""
    rows = [(task, from_data(CurveResult, layer.curves)) for task, layer in _rows(runs) if layer.curves]
    if not rows:
        return []
    names = [n for n in rows[0][1].metric_names() if all(n in r.metric_names() for _, r in rows)]
    top = rows[0][1].top
    lines = [
        "## Faithfulness against exact ablation",
        "",
        "Per ranking, mean over the examples [95% bootstrap interval over examples]. Deletion area: the mean "
        "drop D(K) = Y_0 - Y(top K zeroed) over ln K for 1 <= K <= 50, normalised as a ratio of sums (0 = the "
        "random anchor, averaged over its permutations; 1 = exact ablation). Sufficiency: S(K) / Y_0, the fraction "
        "of Y_0 the top K alone keep (mean over ln K, and at the experiment's K). Spearman: the score against the "
        "exact effect (signed, and its absolute value; all active latents, and the exact top-50). Budgets: exact "
        "ablations taken in the ranking's order until the exact top-10 (or every latent whose |effect| is at least "
        "the given share of Y_0) is found. `GradSAE` is the paper's score (mean over positions of relu(h dY/dh)); "
        "`GradSAE sum` the signed first-order estimate (sum over positions). Files written before a figure existed "
        "lack it (the linear grid's points then stand in for the log grid).",
        "",
    ]
    methods = curve_methods([r for _, r in rows])
    for name in names:
        head = ["task", "layer", "examples", *(CURVE_NAMES.get(m, m) for m in methods), "random"]
        lines += [f"### {metric_title(name, top)}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        digits = 0 if name.startswith("budget") else 2
        for task, result in rows:
            cells = [task, str(result.layer), str(len(result.examples))]
            cells += [
                fmt_metric(result.metric(name, m), digits) if m in result.methods else "-" for m in (*methods, "random")
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def timing_lines(runs: Sequence[SweepRun]) -> list[str]:
    """Wall time per task: ``timing.json``'s ``total_s``, summed over the completed invocations into its folder."""
    lines = [
        "## Wall time",
        "",
        "Per task, summed over the completed invocations into its folder (`timing.json`); an interrupted "
        "invocation's time is not counted.",
        "",
        "| task | wall time (s) |",
        "|---|---|",
    ]
    lines += [f"| {r.task} | {'-' if r.wall_s is None else f'{r.wall_s:.0f}'} |" for r in runs]
    known = [r.wall_s for r in runs if r.wall_s is not None]
    lines += [f"| total | {sum(known):.0f} |", ""]
    return lines
