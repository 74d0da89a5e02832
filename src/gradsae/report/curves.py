"""The faithfulness curves of a run as a markdown section and a two-panel plot (read from ``results.json``).

Per ranking ``m``: the normalised deletion and sufficiency areas ``N_m`` (1 = the exact-ablation
ranking, 0 = the random one; :class:`~gradsae.experiments.results.CurveResult`), the mean
Spearman against exact ablation, the top-``k`` recall and the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from gradsae import _files
from gradsae.experiments.results import KMAX, CurveResult, _mean, stat_over
from gradsae.experiments.stats import Stat

CURVES = ("deletion", "sufficiency")
NAMES = {
    "gradsae": "GradSAE",
    "gradsae_sum": "GradSAE (sum)",
    "activation": "activation",
    "random": "random",
    "ablation": "exact ablation",
    "ig": "integrated gradients (sum)",
    "relp": "RelP (sum)",
}
COLOURS = {
    "gradsae": "tab:red",
    "gradsae_sum": "tab:orange",
    "activation": "tab:blue",
    "random": "tab:gray",
    "ablation": "tab:green",
    "ig": "tab:purple",
    "relp": "tab:brown",
}


METRIC_TITLES = {
    "deletion_log": "deletion area over log K (K <= 50; 0 = random, 1 = exact)",
    "sufficiency_log": "sufficiency over log K (fraction of Y_0 kept)",
    "spearman": "Spearman vs signed effect (all active)",
    "spearman_abs": "Spearman vs |effect| (all active)",
    "spearman_top": "Spearman vs signed effect (exact top-50)",
    "spearman_top_abs": "Spearman vs |effect| (top-50 by |effect|)",
}


def metric_title(name: str, top: int) -> str:
    """A column title for :meth:`CurveResult.metric` ``name``."""
    if "@" in name:
        curve, label = name.split("@", 1)
        return f"{'D' if curve == 'deletion' else 'S'}(K={label}) / Y_0"
    if name == "recall":
        return f"top-{top} recall"
    if name == "budget":
        return f"budget for the exact top-{top}"
    if name.startswith("budget_"):
        return f"budget for every |effect| >= {100 * float(name.removeprefix('budget_')):g}% of Y_0"
    return METRIC_TITLES.get(name, name)


def fmt_metric(figure: Stat, digits: int = 2) -> str:
    """``0.53 [0.41, 0.66]`` (``n/a`` without a value)."""
    if figure.n == 0 or math.isnan(figure.mean):
        return "n/a"
    if math.isnan(figure.low):
        return f"{figure.mean:.{digits}f}"
    return f"{figure.mean:.{digits}f} [{figure.low:.{digits}f}, {figure.high:.{digits}f}]"


def _digits(name: str) -> int:
    return 0 if name.startswith("budget") else 2


def curves_markdown(result: CurveResult) -> list[str]:
    """A markdown section: per ranking, every curve figure with its 95% bootstrap interval over examples."""
    names = result.metric_names()
    shape = [n for n in names if n in ("deletion_log", "sufficiency_log") or "@" in n]
    exact = [n for n in names if n not in shape]
    mean_a = _mean([float(ex.n_active) for ex in result.examples])
    draws = min((ex.random_draws for ex in result.examples), default=1)  # at least this many, as the summary says
    lines = [
        f"### Faithfulness curves ({len(result.examples)} examples; objective p(pinned clean token); "
        f"first token {'left unspliced' if result.skip_first else 'spliced'})",
        "",
        f"Every figure: mean over examples [95% bootstrap interval over examples]. Mean active latents "
        f"{mean_a:.0f}; the random anchor averages {draws} permutation{'s' if draws != 1 else ''} per example. "
        "D(K) = Y_0 - Y(top K zeroed), S(K) = Y(all but the top K zeroed); the deletion area is the mean of D over "
        "ln K for 1 <= K <= 50 (the measured points), normalised as a ratio of sums over examples.",
        "",
    ]
    for title, group in (("Curves", shape), ("Estimate vs exact ablation", exact)):
        lines += [
            f"{title}:",
            "",
            "| ranking | " + " | ".join(metric_title(n, result.top) for n in group) + " |",
            "|---|" + "---|" * len(group),
        ]
        for method in result.methods:
            cells = [fmt_metric(result.metric(n, method), _digits(n)) for n in group]
            lines.append(f"| {NAMES.get(method, method)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def curve_summary_sentence(result: CurveResult, methods: Sequence[str] | None = None) -> str:
    """Every curve figure of ``methods`` (default: every ranking measured but the random anchor and the exact
    one) with its interval, as one paragraph a summary can quote."""
    wanted = [m for m in result.methods if m not in ("random", "ablation")] if methods is None else methods
    present = [m for m in wanted if m in result.methods]
    parts = []
    for name in result.metric_names():
        values = ", ".join(f"{NAMES.get(m, m)} {fmt_metric(result.metric(name, m), _digits(name))}" for m in present)
        extra = ""
        if name.startswith("budget"):
            extra = f"; random {fmt_metric(result.metric(name, 'random'), 0)}"
        parts.append(f"{metric_title(name, result.top)}: {values}{extra}")
    mean_a = _mean([float(ex.n_active) for ex in result.examples])
    draws = min((ex.random_draws for ex in result.examples), default=1)
    head = (
        f"{len(result.examples)} examples, {mean_a:.0f} active latents on average, random anchor averaged over "
        f"{draws} permutation{'s' if draws != 1 else ''}"
    )
    if not any(ex.fixed_ks for ex in result.examples):
        ks = sorted({k for ex in result.examples for k in ex.ks if 1 <= k <= KMAX})
        span = f"K = {ks[0]}-{ks[-1]}" if ks else "no K"
        head += (
            f" (this file predates the log-K points: its areas use the linear grid's points with K <= {KMAX}, {span})"
        )
    return head + "; " + "; ".join(parts) + "."


def plot_curves(result: CurveResult, path: str | Path) -> Path:
    """Two panels (deletion drop, sufficiency) of the mean curves vs the fraction of active latents, with a 95%
    bootstrap band over examples, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    titles = {"deletion": "deletion: Y_0 - Y(top K zeroed)", "sufficiency": "sufficiency: Y(all but top K zeroed)"}
    for ax, name in zip(axes, CURVES, strict=True):
        for method in result.methods:
            figure = result.metric(f"{name}_log" if name == "sufficiency" else "deletion_log", method)
            label = f"{NAMES.get(method, method)} ({'log-K area' if name == 'deletion' else 'S/Y_0'} {figure.mean:.2f})"
            band = [stat_over(col) for col in zip(*(ex.curve(name, method) for ex in result.examples), strict=True)]
            colour = COLOURS.get(method)
            ax.plot(result.grid, [b.mean for b in band], "-o", ms=3, color=colour, label=label)
            ax.fill_between(result.grid, [b.low for b in band], [b.high for b in band], color=colour, alpha=0.12)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0, 1)
        ax.set_title(f"layer {result.layer}: {titles[name]}")
        ax.set_xlabel("fraction of active latents (K / a)")
        ax.set_ylabel("drop in p(pinned token)" if name == "deletion" else "p(pinned token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with _files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _mean_active(result: CurveResult) -> float:
    return sum(ex.n_active for ex in result.examples) / len(result.examples) if result.examples else math.nan
