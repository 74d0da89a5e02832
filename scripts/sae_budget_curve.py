"""Tokens vs held-out FVU for SAEs of one width trained with several budgets, and the budget a target needs.

    python scripts/sae_budget_curve.py --point 125k=runs/curve/e125k/eval_sae.json ... \\
        --point 3M=docs/results/eval_sae_shipped/eval_sae.json --layers 15,24 --out docs/results/sae_budget_curve

Each ``--point`` is one budget's ``gradsae eval-sae`` output (the same sets and
options for every point). For each layer and set, fits
:class:`gradsae.training.budget.BudgetFit` to the typical FVU (massive-activation
tokens left out, as ``eval-sae`` reports it) and to the pooled FVU, and writes
``curve.json``, ``curve.md`` and ``curve.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gradsae.cli.common import parse_count, parse_layers  # noqa: E402
from gradsae.training.budget import BudgetFit, fit_budget, holdout_check  # noqa: E402

SETS = ("news", "chat", "generated")
MARKERS = ("x", "+", "^", "s")
METRICS = {"fvu_typical": "FVU typical", "fvu": "FVU pooled"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--point", action="append", required=True, help="BUDGET=PATH/eval_sae.json, e.g. 1M=...")
    parser.add_argument("--layers", default="15,24")
    parser.add_argument(
        "--other", action="append", default=[], help="LABEL:BUDGET=PATH, another SAE shape to set beside the curve"
    )
    parser.add_argument(
        "--shape", default="", help="what the curve's SAEs are, for the plot, e.g. '4608 latents, k = 32'"
    )
    parser.add_argument("--target", type=float, default=0.15)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    points = read_points(args.point)
    layers = parse_layers(args.layers)
    rows = curve_rows(points, layers, args.target)
    others = other_rows(args.other, points, layers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"target": args.target, "points": args.point, "rows": rows, "others": others}
    (out / "curve.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "curve.md").write_text(markdown(rows, args.target) + other_markdown(others))
    plot(rows, args.target, out / "curve.png", others, shape=args.shape)
    sys.stdout.write(f"wrote {out}/curve.json, curve.md and curve.png\n")


def read_points(specs: list[str]) -> dict[int, list[dict[str, Any]]]:
    """Budget -> that eval-sae run's per-(set, layer) figures."""
    points = {}
    for spec in specs:
        budget, _, path = spec.partition("=")
        points[parse_count(budget)] = json.loads(Path(path).read_text())["figures"]
    return dict(sorted(points.items()))


def curve_rows(points: dict[int, list[dict[str, Any]]], layers: tuple[int, ...], target: float) -> list[dict[str, Any]]:
    """One row per (layer, set, metric): the measured FVU per budget, the fit and the budget for ``target``."""
    rows = []
    for layer in layers:
        for name in SETS:
            for metric in METRICS:
                measured = {t: _figure(figs, layer, name)[metric] for t, figs in points.items()}
                tokens, fvu = list(measured), list(measured.values())
                fit = fit_budget(tokens, fvu)
                check = holdout_check(tokens, fvu)
                rows.append(
                    {
                        "layer": layer,
                        "set": name,
                        "metric": metric,
                        "measured": {str(t): v for t, v in measured.items()},
                        "fit": asdict(fit),
                        "tokens_for_target": fit.tokens_for(target),
                        "holdout": None if check is None else {"predicted": check[0], "measured": check[1]},
                    }
                )
    return rows


def other_rows(
    specs: list[str], points: dict[int, list[dict[str, Any]]], layers: tuple[int, ...]
) -> list[dict[str, Any]]:
    """Per (other SAE, layer, set): its typical FVU and the curve's at the same budget (measured there or None)."""
    rows = []
    for spec in specs:
        label, _, rest = spec.partition(":")
        budget, _, path = rest.partition("=")
        tokens = parse_count(budget)
        figures = json.loads(Path(path).read_text())["figures"]
        same = points.get(tokens)
        for layer in layers:
            for name in SETS:
                rows.append(
                    {
                        "label": label,
                        "tokens": tokens,
                        "layer": layer,
                        "set": name,
                        "fvu_typical": _figure(figures, layer, name)["fvu_typical"],
                        "curve_fvu_typical": None if same is None else _figure(same, layer, name)["fvu_typical"],
                    }
                )
    return rows


def other_markdown(others: list[dict[str, Any]]) -> str:
    if not others:
        return ""
    lines = [
        "",
        "| SAE | budget | layer | set | its FVU typical | the curve's at that budget |",
        "|---|---|---|---|---|---|",
    ]
    for row in others:
        curve = "-" if row["curve_fvu_typical"] is None else f"{row['curve_fvu_typical']:.3f}"
        lines.append(
            f"| {row['label']} | {row['tokens'] / 1e6:g}M | {row['layer']} | {row['set']} "
            f"| {row['fvu_typical']:.3f} | {curve} |"
        )
    return "\n".join(lines) + "\n"


def _figure(figures: list[dict[str, Any]], layer: int, name: str) -> dict[str, Any]:
    return next(f for f in figures if f["layer"] == layer and f["set"] == name)


def _tokens(value: float | None) -> str:
    if value is None:
        return "unreachable (floor above target)"
    return f"{value / 1e6:.1f}M" if value < 1e9 else f"{value / 1e9:.1f}B"


def markdown(rows: list[dict[str, Any]], target: float) -> str:
    budgets = list(rows[0]["measured"])
    head = " | ".join(f"{int(b) / 1e6:g}M" for b in budgets)
    lines = [
        f"| layer | set | metric | {head} | fitted floor | power | largest budget: fit of the rest vs measured "
        f"| tokens to FVU {target:g} |",
        "|---|---|---|" + "---|" * len(budgets) + "---|---|---|---|",
    ]
    for row in rows:
        values = " | ".join(f"{row['measured'][b]:.3f}" for b in budgets)
        fit, hold = row["fit"], row["holdout"]
        check = "-" if hold is None else f"{hold['predicted']:.3f} vs {hold['measured']:.3f}"
        need = "met" if row["measured"][budgets[-1]] <= target else _tokens(row["tokens_for_target"])
        lines.append(
            f"| {row['layer']} | {row['set']} | {METRICS[row['metric']]} | {values} | {fit['floor']:.3f} "
            f"| {fit['power']:.2f} | {check} | {need} |"
        )
    return "\n".join(lines) + "\n"


def plot(
    rows: list[dict[str, Any]], target: float, path: Path, others: list[dict[str, Any]], *, shape: str = ""
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted({row["layer"] for row in rows})
    fig, axes = plt.subplots(1, len(layers), figsize=(5.5 * len(layers), 4.2), sharey=True, squeeze=False)
    grid = np.geomspace(5e4, 1e8, 200)
    labels = list(dict.fromkeys(o["label"] for o in others))
    for ax, layer in zip(axes[0], layers, strict=True):
        for colour, name in zip(("C0", "C1", "C2"), SETS, strict=True):
            row = next(r for r in rows if r["layer"] == layer and r["set"] == name and r["metric"] == "fvu_typical")
            tokens = [int(t) for t in row["measured"]]
            fit = BudgetFit(**row["fit"])
            ax.plot(tokens, list(row["measured"].values()), "o", color=colour, label=f"{name} (measured)")
            ax.plot(grid, [fit.fvu(t) for t in grid], "--", color=colour, lw=1, label=f"{name} (fit)")
            for other in (o for o in others if o["layer"] == layer and o["set"] == name):
                marker = MARKERS[labels.index(other["label"]) % len(MARKERS)]
                ax.plot(
                    other["tokens"], other["fvu_typical"], marker, color=colour, ms=9, label=f"{name}, {other['label']}"
                )
        ax.axhline(target, color="k", lw=0.8, ls=":", label=f"target {target:g}")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens (each budget with its own learning-rate decay)")
        ax.set_title(f"layer {layer}: typical FVU on the held-out sets" + (f"\n{shape}" if shape else ""))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("FVU (massive-activation tokens left out)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
