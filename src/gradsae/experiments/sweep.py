"""One table over a sweep of tasks x layers (``gradsae sweep``), read from each task's ``results.json``.

Per task and layer the table puts side by side what the run measured:

* the model's task score without the SAE (``clean``) and with it spliced, and the kept ``n``;
* experiment 1 at each K: the score after zeroing GradSAE's and activation's TopK latents, and the
  paired difference ``GradSAE - activation`` (points, 95% bootstrap interval over the same kept
  examples; negative = GradSAE's latents matter more), with random TopK as the control;
* experiment 2 at each K: the swap's rate to the donor's answer next to its zero-only floor
  (``swap / zero``), per ranking, and the no-edit row (all measured);
* the faithfulness curves (when run with them, :mod:`gradsae.experiments.curves`): deletion and
  sufficiency areas normalised so that 0 = the random ranking and 1 = the exact-ablation ranking,
  Spearman against exact ablation over the active latents, and recall of the exact top-10 among each
  ranking's top-10.

Nothing is recomputed here: every figure is read from the runs' files, so
``gradsae sweep`` on a finished folder rewrites the same ``sweep.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gradsae import _files
from gradsae.estimators import ESTIMATORS
from gradsae.experiments.perturb import Condition
from gradsae.experiments.report import NAMES, fmt, paired_cell
from gradsae.experiments.run import LayerResult, RunResults
from gradsae.experiments.stats import Stat

SWEEP_TABLE = "sweep.md"
CURVE_METHODS = ("gradsae", "gradsae_sum", "activation")
CURVE_NAMES = {**NAMES, "gradsae_sum": "GradSAE sum", "ig": "IG sum", "relp": "RelP sum"}


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


def write_sweep(folder: str | Path, runs: Sequence[SweepRun], *, command: str) -> Path:
    """Write ``<folder>/sweep.md`` (atomically)."""
    return _files.write_text(Path(folder) / SWEEP_TABLE, sweep_markdown(runs, command=command))


def sweep_markdown(runs: Sequence[SweepRun], *, command: str) -> str:
    """The whole ``sweep.md``: set-up, masking, steering, curves, wall times."""
    ks = _shared_ks(runs)
    out = [
        "# GradSAE sweep: tasks x layers",
        "",
        f"Command: `{command}`",
        "",
        *_setup_lines(runs),
        "",
        *masking_table(runs, ks),
        *steering_table(runs, ks),
        *curves_table(runs),
        *timing_lines(runs),
    ]
    return "\n".join(out) + "\n"


def _shared_ks(runs: Sequence[SweepRun]) -> list[str]:
    ks: list[str] = []
    for run in runs:
        ks += [k for k in run.results.config.ks if k not in ks]
    return ks


def _setup_lines(runs: Sequence[SweepRun]) -> list[str]:
    metas = {(r.results.config.model, r.results.config.mode, r.results.config.seed) for r in runs}
    lines = [
        f"- model / splice mode / seed: {', '.join(f'{m} / {mode} / {s}' for m, mode, s in sorted(metas))}",
    ]
    for run in runs:
        meta = run.results.config
        labels = "; ".join(f"layer {k}: {v}" for k, v in meta.sae_labels.items())
        lines.append(f"- `{run.task}`: {meta.n} examples drawn, metric {meta.metric}; SAEs: {labels}")
    lines.append(
        "- Cells: mean over kept examples [95% bootstrap interval]; `kept` = answered correctly with the SAE "
        "spliced, the examples every perturbation starts from (score 100 before editing)."
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
    return "-" if stat is None or stat.n == 0 or math.isnan(stat.mean) else f"{stat.mean:.0f}"


def masking_table(runs: Sequence[SweepRun], ks: Sequence[str]) -> list[str]:
    """Experiment 1: model accuracy, kept n, TopK masking per ranking and the paired difference per K."""
    head = ["task", "layer", "clean", "with SAE", "kept"]
    for k in ks:
        head += [f"GradSAE K={k}", f"activation K={k}", f"random K={k}", f"GradSAE - activation K={k}"]
    lines = [
        "## Experiment 1: zero the TopK latents (score vs the gold answer; 100 = unperturbed)",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for task, layer in _rows(runs):
        seed = next(r.results.config.seed for r in runs if r.task == task)
        cells = [task, str(layer.layer), fmt(layer.clean_baseline), fmt(layer.baseline), str(layer.n_kept)]
        for k in ks:
            by = {m: _find(layer.perturbation, m, "zero", k) for m in ("gradsae", "activation", "random")}
            cells += [fmt(c.exact) if c else "-" for c in by.values()]
            cells.append(paired_cell(by["gradsae"], by["activation"], seed=seed))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def steering_table(runs: Sequence[SweepRun], ks: Sequence[str]) -> list[str]:
    """Experiment 2: per ranking and K, the swap's success next to its zero-only floor; the no-edit row."""
    head = ["task", "layer", "pairs", "no edit"]
    for k in ks:
        head += [f"{NAMES[m]} K={k}" for m in ("gradsae", "activation", "random")]
    lines = [
        "## Experiment 2: steer toward the donor (% of pairs whose answer became the donor's)",
        "",
        "Each cell is `swap / zero-only` (means): the swap zeroes the example's own TopK and injects the "
        "donor's; zero-only does the first half alone. Steering is the swap's rate above its zero-only "
        "floor; `no edit` is the measured rate without any edit. Pairs with the same gold answer are not donors.",
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
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def curve_methods(layers: Sequence[LayerResult]) -> tuple[str, ...]:
    """:data:`CURVE_METHODS`, then each estimator of :mod:`gradsae.estimators` that some run measured."""
    found = {m for layer in layers for m in layer.curves.get("summary", {})}
    return (*CURVE_METHODS, *(m for m in ESTIMATORS if m in found))


def curves_table(runs: Sequence[SweepRun]) -> list[str]:
    """Faithfulness summary per task and layer (rows without curves are left out)."""
    rows = [(task, layer) for task, layer in _rows(runs) if layer.curves]
    if not rows:
        return []
    head = ["task", "layer", "examples"]
    methods = curve_methods([layer for _, layer in rows])
    for m in methods:
        name = CURVE_NAMES[m]
        head += [f"{name} deletion", f"{name} sufficiency", f"{name} Spearman", f"{name} recall@10"]
    lines = [
        "## Faithfulness against exact ablation",
        "",
        "Areas (deletion, sufficiency) are normalised over the examples (a ratio of sums): 0 = the random "
        "ranking, 1 = the exact-ablation ranking; single-latent ablation is not the best order for "
        "sufficiency, so a value far outside [0, 1] there says the random and exact curves nearly coincide. "
        "Spearman (mean over examples): the ranking's score against the exact ablation effect over the "
        "active latents, the clean greedy token held fixed; recall@10: share of the exact top-10 in the "
        "ranking's top-10. `GradSAE` is the paper's score (mean over positions of relu(h dY/dh)); "
        "`GradSAE sum` is the signed first-order estimate of the ablation effect (sum over positions).",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for task, layer in rows:
        summary = layer.curves.get("summary", {})
        cells = [task, str(layer.layer), str(len(layer.curves.get("examples", [])))]
        for m in methods:
            s = summary.get(m, {})
            cells += [_num(s.get("deletion_area")), _num(s.get("sufficiency_area"))]
            cells += [_num(s.get("spearman"), 3), _num(s.get("recall"))]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


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
