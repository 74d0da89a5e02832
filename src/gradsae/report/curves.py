"""The faithfulness curves of a run as a markdown section and a two-panel plot (read from ``results.json``).

Per ranking ``m``: the normalised deletion and sufficiency areas ``N_m`` (1 = the exact-ablation
ranking, 0 = the random one; :class:`~gradsae.experiments.results.CurveResult`), the mean
Spearman against exact ablation, the top-``k`` recall and the budget.
"""

from __future__ import annotations

import math
from pathlib import Path

from gradsae import _files
from gradsae.experiments.results import CurveResult

CURVES = ("deletion", "sufficiency")
NAMES = {
    "gradsae": "GradSAE",
    "gradsae_sum": "GradSAE (sum)",
    "activation": "activation",
    "random": "random",
    "ablation": "exact ablation",
}
COLOURS = {
    "gradsae": "tab:red",
    "gradsae_sum": "tab:orange",
    "activation": "tab:blue",
    "random": "tab:gray",
    "ablation": "tab:green",
}


def curves_markdown(result: CurveResult) -> list[str]:
    """A markdown section: one row per ranking (normalised areas, estimate vs exact, budget)."""
    k = result.top
    lines = [
        f"### Faithfulness curves ({len(result.examples)} examples; objective p(pinned clean token))",
        "",
        f"Normalised areas: 1 = exact-ablation ranking, 0 = random. Spearman, top-{k} recall and the budget "
        f"(exact ablations in that order until the exact top-{k} are found; mean active latents "
        f"{_mean_active(result):.0f}) are means over examples.",
        "",
        f"| ranking | deletion area | sufficiency area | Spearman vs exact | top-{k} recall | budget for top-{k} |",
        "|---|---|---|---|---|---|",
    ]
    for method, row in result.summary().items():
        cells = [row["deletion_area"], row["sufficiency_area"], row["spearman"], row["recall"]]
        text = " | ".join("n/a" if math.isnan(v) else f"{v:.2f}" for v in cells)
        lines.append(f"| {NAMES.get(method, method)} | {text} | {row['budget']:.1f} |")
    return [*lines, ""]


def plot_curves(result: CurveResult, path: str | Path) -> Path:
    """Two panels (deletion drop, sufficiency) of the mean curves vs the fraction of active latents, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    titles = {"deletion": "deletion: Y_0 - Y(top K zeroed)", "sufficiency": "sufficiency: Y(all but top K zeroed)"}
    for ax, name in zip(axes, CURVES, strict=True):
        for method in result.methods:
            area = result.normalised_area(name, method)
            label = f"{NAMES.get(method, method)} (area {area:.2f})"
            ax.plot(result.grid, result.mean_curve(name, method), "-o", ms=3, color=COLOURS.get(method), label=label)
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
