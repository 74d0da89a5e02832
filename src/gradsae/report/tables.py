"""Turn experiment results into what a person reads: ``table.md`` and PNG plots.

Table layout follows the paper: rows are ranking x {TopK, BottomK}, columns are K;
each cell is the mean task score over kept examples (100 = unperturbed) with its
95% bootstrap interval. Steering cells are the share of examples whose answer
matches the donor's gold answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradsae import _files
from gradsae.experiments.results import Condition, CurveResult, LayerResult, RunMeta, RunResults, from_data
from gradsae.experiments.stats import Stat, paired_difference
from gradsae.report.curves import curves_markdown, plot_curves

BOOTSTRAP = 1000
"""Resamples for the paired-difference intervals (seeded by the run's seed)."""
NAMES = {"gradsae": "GradSAE", "activation": "activation", "random": "random", "ablation": "exact ablation"}


def fmt(stat: Stat) -> str:
    """``mean [low, high]`` with one decimal."""
    if stat.n == 0 or math.isnan(stat.mean):
        return "n/a"
    return f"{stat.mean:.1f} [{stat.low:.1f}, {stat.high:.1f}]"


def cell(c: Condition, squad: bool) -> str:
    return f"{fmt(c.exact)} / {fmt(c.f1)}" if squad else fmt(c.exact)


POSITION_TITLES = {
    "last": "the last position of each pass, KV cache unedited (authors' final code)",
    "cumulative": "the newest token of each pass, kept in the KV cache (a cumulative variant, not the authors')",
    "all": "every position of every pass (authors' earlier code)",
}


def condition_table(
    conditions: Sequence[Condition], ks: Sequence[str], squad: bool, *, edits: Sequence[str] = ("zero",)
) -> list[str]:
    """Markdown rows: ranking x set (x edit) by K; the no-edit row and paired differences are separate."""
    lines = ["| ranking / edited set | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    methods = list(dict.fromkeys(c.method for c in conditions if c.method != "none"))
    for method in methods:
        for which in ("top", "bottom"):
            for edit in edits:
                row = {c.k: c for c in conditions if (c.method, c.set, c.edit) == (method, which, edit)}
                if not row:
                    continue
                label = NAMES.get(method, method) + (" TopK" if which == "top" else " BottomK")
                label += {"zero": " zero-only", "inject": " inject-only"}.get(edit, "") if len(edits) > 1 else ""
                cells = [cell(row[k], squad) if k in row else "-" for k in ks]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def paired_cell(a: Condition | None, b: Condition | None, *, seed: int) -> str:
    """``a - b`` over the same examples, in points with its bootstrap interval; ``-`` if not comparable."""
    if a is None or b is None or not a.per_example or len(a.per_example) != len(b.per_example):
        return "-"
    diff = paired_difference(a.per_example, b.per_example, seed=seed, resamples=BOOTSTRAP)
    return f"{diff.mean:+.1f} [{diff.low:+.1f}, {diff.high:+.1f}]"


def paired_row(
    conditions: Sequence[Condition], ks: Sequence[str], meta: RunMeta, *, edit: str, a: str = "gradsae"
) -> list[str]:
    """``GradSAE - activation`` TopK per K: mean paired difference in points with its bootstrap interval."""
    cells = []
    for k in ks:
        row = {c.method: c for c in conditions if (c.set, c.edit, c.k) == ("top", edit, k)}
        cells.append(paired_cell(row.get(a), row.get("activation"), seed=meta.seed))
    return [f"| {NAMES[a]} - activation TopK, paired | " + " | ".join(cells) + " |"]


def layer_section(result: LayerResult, meta: RunMeta) -> list[str]:
    squad = meta.metric == "squad"
    unit = "EM / F1" if squad else "accuracy"
    ks = [str(k) for k in meta.ks]
    out = [
        f"## Layer {result.layer}",
        "",
        f"- SAE: {meta.sae_labels[str(result.layer)]}",
        f"- task score on all {result.n_examples} examples: without the SAE {fmt(result.clean_baseline)}, "
        f"with the SAE spliced ({meta.mode} mode) {fmt(result.baseline)}",
        f"- kept (answered correctly with the SAE): {result.n_kept}; donor pairs for steering: {result.n_donor_pairs}",
        "",
        f"### Experiment 1: mask the selected latents ({unit} vs the gold answer)",
        "",
        *_unperturbed(result.perturbation, squad),
        "",
        *condition_table(result.perturbation, ks, squad),
        *paired_row(result.perturbation, ks, meta, edit="zero"),
        "",
    ]
    for where in meta.steer_positions:
        out += _steering_section(result, meta, where, ks, squad, unit)
    if result.overlap:
        out += ["### Overlap of Top-10 sets (% of K)", "", "| pair | overlap |", "|---|---|"]
        out += [f"| {name} | {value:.1f} |" for name, value in sorted(result.overlap.items())]
        out.append("")
    if result.curves:
        out += curves_markdown(from_data(CurveResult, result.curves))
    rho = result.diagnostics.get("spearman_gradsae_sum_vs_ablation")
    if rho:
        out += [
            f"First-order estimate vs exact ablation: Spearman {rho['mean']:.3f} (mean over {rho['n']} examples, "
            f"min {rho['min']:.3f}).",
            "",
        ]
    return out


def _unperturbed(conditions: Sequence[Condition], squad: bool) -> list[str]:
    none = [c for c in conditions if c.edit == "none"]
    if not none:
        return ["Unperturbed (K = 0): not measured in this run (100 by construction of the kept set)."]
    return [
        f"Unperturbed (K = 0, the same batches, measured): {cell(none[0], squad)}. Paired rows: GradSAE minus "
        "activation on the same examples, in points, 95% bootstrap interval."
    ]


def _fmt_own(condition: Condition | None) -> str:
    own = None if condition is None else condition.own
    return "-" if own is None else fmt(own)


def _steering_section(
    result: LayerResult, meta: RunMeta, where: str, ks: Sequence[str], squad: bool, unit: str
) -> list[str]:
    part = [c for c in result.steering if c.positions == where]
    out = [f"### Experiment 2: steer toward the donor, edits at {POSITION_TITLES.get(where, where)}", ""]
    if not part:
        return [*out, "No donor pairs with different answers: nothing to steer.", ""]
    none = [c for c in result.steering if c.edit == "none"]
    floor = (
        f"No edit (measured): {cell(none[0], squad)} match the donor's answer, {_fmt_own(none[0])} keep their own. "
        if none
        else ""
    )
    out += [
        f"{floor}Cells: {unit} against the donor's gold answer over {result.n_donor_pairs} pairs. "
        "`swap` zeroes the example's own TopK and sets the donor's (the paper's steering); `zero-only` and "
        "`inject-only` are its two halves: steering is the swap's rate above the zero-only floor.",
        "",
        *condition_table(part, ks, squad, edits=("swap", "zero", "inject")),
        *paired_row(part, ks, meta, edit="swap"),
        "",
        "Answer still the example's own (swap / zero-only, TopK):",
        "",
        "| ranking | " + " | ".join(f"K={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for method in dict.fromkeys(c.method for c in part if c.method != "none"):
        cells = []
        for k in ks:
            by = {c.edit: c for c in part if (c.method, c.set, c.k) == (method, "top", k)}
            pair = [_fmt_own(by.get(e)) for e in ("swap", "zero")]
            cells.append(" / ".join(pair))
        out.append(f"| {NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    return [*out, ""]


def sweep_table(results: Sequence[LayerResult], k: str = "50%") -> list[str]:
    """The paper's Table 4: TopK at one K, activation vs GradSAE, one row per layer."""
    lines = [
        f"## Layer sweep: TopK masked at K={k}",
        "",
        "| layer | activation TopK | GradSAE TopK | random TopK |",
        "|---|---|---|---|",
    ]
    for result in results:
        row = {c.method: c for c in result.perturbation if c.set == "top" and c.k == k and c.edit == "zero"}
        cells = [fmt(row[m].exact) if m in row else "-" for m in ("activation", "gradsae", "random")]
        lines.append(f"| {result.layer} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def table_markdown(results: Sequence[LayerResult], meta: RunMeta) -> str:
    """The whole ``table.md``."""
    out = [
        f"# GradSAE reproduction: task `{meta.task}`, model `{meta.model}`",
        "",
        f"Examples: {meta.n} (seed {meta.seed}); splice mode: {meta.mode}; rankings: "
        f"{', '.join(NAMES.get(m, m) for m in meta.methods)}. Cells: mean over kept examples "
        "[95% bootstrap interval].",
        "",
    ]
    for result in results:
        out += layer_section(result, meta)
    if len(results) > 1:
        out += sweep_table(results)
    return "\n".join(out) + "\n"


def render(folder: str | Path, results: RunResults) -> list[Path]:
    """Write ``table.md`` and the plots of every layer into ``folder`` from a run's results."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [p for layer in results.layers for p in plot_layer(layer, results.config, folder)]
    paths.append(_files.write_text(folder / "table.md", table_markdown(results.layers, results.config)))
    return paths


def plot_layer(result: LayerResult, meta: RunMeta, folder: Path) -> list[Path]:
    """``exp1_layer{l}.png`` and ``exp2_layer{l}.png``: score vs K, one line per ranking and set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [str(k) for k in meta.ks]
    paths = []
    panels: list[tuple[str, list[tuple[str, Sequence[Condition]]]]] = [
        ("exp1", [("masking", result.perturbation)]),
        (
            "exp2",
            [
                (f"steering at {w} positions", [c for c in result.steering if c.positions == w])
                for w in meta.steer_positions
            ],
        ),
    ]
    for name, groups in panels:
        fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
        for ax, (title, conditions) in zip(axes[0], groups, strict=True):
            _draw(ax, conditions, ks, edit="zero" if name == "exp1" else "swap")
            ax.set_title(f"layer {result.layer}: {title}")
            ax.set_xlabel("K (latents edited)")
            ax.set_ylabel("task score (%)" if name == "exp1" else "success: matches donor (%)")
        fig.tight_layout()
        path = folder / f"{name}_layer{result.layer}.png"
        with _files.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(path)
    if result.curves:
        paths.append(plot_curves(from_data(CurveResult, result.curves), folder / f"curves_layer{result.layer}.png"))
    return paths


def _draw(ax: Any, conditions: Sequence[Condition], ks: Sequence[str], *, edit: str) -> None:
    colors = {"gradsae": "tab:red", "activation": "tab:blue", "random": "tab:gray", "ablation": "tab:green"}
    x = list(range(len(ks)))
    for method in dict.fromkeys(c.method for c in conditions if c.method != "none"):
        for which, style in (("top", "-o"), ("bottom", "--s")):
            row = {c.k: c for c in conditions if (c.method, c.set, c.edit) == (method, which, edit)}
            if not row:
                continue
            ys = [row[k].exact.mean if k in row else math.nan for k in ks]
            lo = [y - row[k].exact.low if k in row else 0 for y, k in zip(ys, ks, strict=True)]
            hi = [row[k].exact.high - y if k in row else 0 for y, k in zip(ys, ks, strict=True)]
            ax.errorbar(
                x,
                ys,
                yerr=[lo, hi],
                fmt=style,
                capsize=3,
                color=colors.get(method),
                label=f"{NAMES.get(method, method)} {'TopK' if which == 'top' else 'BottomK'}",
            )
    ax.set_xticks(x, ks)
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
