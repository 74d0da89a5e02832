"""Render a steering run (:class:`~gradsae.experiments.concepts.SteerResult`) as markdown and a Pareto plot.

* ``steering.md``: per concept, the headline table (each method at the alpha chosen
  on the held-aside prompts, reported on the evaluation prompts, with the paired
  difference to GradSAE over the same prompts), then the whole sweep, then examples.
* ``steering.png``: success vs perplexity over alpha on the evaluation prompts,
  one curve per method, 95% bootstrap intervals on both axes, one panel per concept.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from gradsae import _files
from gradsae.experiments.concepts import NEUTRAL_TEXTS, ConceptRun, MethodRun, Point, SteerResult, choose_alpha
from gradsae.experiments.stats import Stat, paired_difference
from gradsae.steer import Concept

COLORS = {
    "gradsae": "tab:red",
    "gradsae-label": "tab:orange",
    "activation": "tab:blue",
    "logit-lens": "tab:green",
    "random": "tab:gray",
}
EXAMPLES = 2
"""Evaluation generations shown per method."""
BUDGETS = (5.0, 10.0)
"""Perplexity ratios of the extra budget table (besides the run's own)."""


def fmt(stat: Stat | None, digits: int = 1) -> str:
    """``mean [low, high]``, or ``-``."""
    if stat is None or stat.n == 0:
        return "-"
    return f"{stat.mean:.{digits}f} [{stat.low:.{digits}f}, {stat.high:.{digits}f}]"


def markdown(result: SteerResult) -> str:
    """The whole report."""
    cfg = result.config
    out = [
        f"# Steering with SAE latents: `{result.model}`, layer {result.layer}",
        "",
        f"- SAE: {result.sae}; splice mode: {cfg.mode}; K = {cfg.k} latents per method; "
        f"alpha in {list(cfg.alphas)} x each latent's mean non-zero activation, added at every position and step",
        f"- prompts: {cfg.n_seed} seed (GradSAE's scores only), {cfg.n_heldout} held-aside (alpha choice only), "
        f"{cfg.n_eval} evaluation (reported); {cfg.max_new_tokens} new tokens each, greedy",
        f"- fluency budget for the alpha choice: held-aside perplexity <= {cfg.max_ppl_ratio:g} x and "
        f"distinct-2 >= {cfg.min_distinct_ratio:g} x the unsteered model's",
        f"- cost: SST-2 accuracy on {cfg.sst2_n} examples while steered; unsteered {fmt(result.cost_unsteered)}",
        f"- intervals: 95% bootstrap over prompts ({cfg.resamples} resamples, seed {cfg.seed}); "
        f"wall time {result.wall_s / 60:.1f} min",
    ]
    if result.command:
        out.append(f"- command: `{result.command}`")
    out.append("")
    for run in result.concepts:
        out += concept_section(run, result)
    return "\n".join(out) + "\n"


def concept_section(run: ConceptRun, result: SteerResult) -> list[str]:
    """Headline table, sweep table and example generations of one concept."""
    concept = run.concept
    what = (
        f"sentiment: success = the model's own p({concept.judge}) of the text as an SST-2 review (x100)"
        if concept.judge
        else "topic: success = % of generations with a concept word"
    )
    out = [
        f"## Concept `{concept.name}`",
        "",
        f"{what}; words: {', '.join(concept.words)}"
        + f"; contrast for gradsae and activation: {_contrast(concept, result)}",
        "",
        headline(run, result),
        "",
        "### Looser fluency budgets (alpha again chosen on the held-aside prompts)",
        "",
        budget_table(run, result),
        "",
        "### The sweep (evaluation prompts; the curves of the plot)",
        "",
        sweep_table(run),
        "",
        "### Examples (first evaluation prompts, chosen alpha)",
        "",
    ]
    for method in run.methods:
        point = method.point(method.alpha, "eval") or run.base("eval")
        for prompt, text in list(zip(result.prompts["eval"], point.texts, strict=False))[:EXAMPLES]:
            out.append(f"- {method.method}, alpha {method.alpha:g}: *{prompt}* -> {text.strip()!r}")
    out.append("")
    return out


def _contrast(concept: Concept, result: SteerResult) -> str:
    if concept.negatives:
        return f"its {len(concept.negatives)} negative texts"
    if result.config.contrast == "neutral":
        return f"the {len(NEUTRAL_TEXTS)} built-in neutral texts"
    return "none"


def chosen_point(method: MethodRun, run: ConceptRun) -> Point:
    """The evaluation point at the chosen alpha (the unsteered one for alpha 0)."""
    return method.point(method.alpha, "eval") or run.base("eval")


def headline(run: ConceptRun, result: SteerResult) -> str:
    """Best success at equal fluency: each method at its held-aside alpha, on the evaluation prompts."""
    cfg = result.config
    base = run.base("eval")
    rows = [
        "Each method at the alpha chosen on the held-aside prompts (best held-aside success within the fluency "
        "budget), measured on the evaluation prompts. Difference: paired over the same prompts, in points.",
        "",
        "| method | alpha | success | vs GradSAE | concept words / 100 | perplexity | distinct-2 (%) | SST-2 acc | "
        "latents |",
        "|---|---:|---|---|---|---|---|---|---|",
        f"| unsteered | 0 | {fmt(base.success)} | | {fmt(base.rate)} | {fmt(base.ppl, 2)} | {fmt(base.distinct)} "
        f"| {fmt(result.cost_unsteered)} | |",
    ]
    reference = next((m for m in run.methods if m.method == "gradsae"), None)
    for method in run.methods:
        point = chosen_point(method, run)
        diff = ""
        if reference is not None and method is not reference:
            ref = chosen_point(reference, run)
            stat = paired_difference(
                ref.success_per_prompt, point.success_per_prompt, seed=cfg.seed, resamples=cfg.resamples
            )
            diff = f"{fmt(stat)}"
        cost = method.cost if method.alpha > 0 else result.cost_unsteered
        latents = ", ".join(f"{c}{'*' if u else ''}" for c, u in zip(method.latents, method.unfired, strict=True))
        rows.append(
            f"| {method.method} | {method.alpha:g} | {fmt(point.success)} | {diff} | {fmt(point.rate)} | "
            f"{fmt(point.ppl, 2)} | {fmt(point.distinct)} | {fmt(cost)} | {latents} |"
        )
    rows += [
        "",
        "vs GradSAE: GradSAE's success minus this method's (positive: GradSAE steers better). "
        "Latents marked * never fired on the reference texts and were scaled by the median typical activation.",
    ]
    return "\n".join(rows)


def budget_table(run: ConceptRun, result: SteerResult) -> str:
    """Success on the evaluation prompts at the alpha each held-aside budget picks (perplexity ratios)."""
    ratios = sorted({result.config.max_ppl_ratio, *BUDGETS})
    head = " | ".join(f"ppl <= {r:g}x" for r in ratios)
    rows = [f"| method | {head} |", "|---|" + "---|" * len(ratios)]
    for method in run.methods:
        heldout = [p for p in method.points if p.split == "heldout"]
        cells = []
        for ratio in ratios:
            cfg = dataclasses.replace(result.config, max_ppl_ratio=ratio)
            alpha = choose_alpha(heldout, run.base("heldout"), cfg)
            point = method.point(alpha, "eval") or run.base("eval")
            cells.append(f"{fmt(point.success)} (alpha {alpha:g}, ppl {point.ppl.mean:.1f})")
        rows.append(f"| {method.method} | " + " | ".join(cells) + " |")
    rows += [
        "",
        f"Each cell: evaluation success at the held-aside choice; distinct-2 >= {result.config.min_distinct_ratio:g} x "
        "unsteered still required; alpha 0 = no strength beat the unsteered model.",
    ]
    return "\n".join(rows)


def sweep_table(run: ConceptRun) -> str:
    """Every alpha of every method on both splits."""
    rows = [
        "| method | alpha | eval success | eval perplexity | eval distinct-2 | held-aside success | "
        "held-aside perplexity | held-aside distinct-2 |",
        "|---|---:|---|---|---|---|---|---|",
    ]
    lines = [("unsteered", run.base("eval"), run.base("heldout"))]
    for method in run.methods:
        for alpha in dict.fromkeys(p.alpha for p in method.points):
            ev, ho = method.point(alpha, "eval"), method.point(alpha, "heldout")
            if ev is not None and ho is not None:
                mark = " (chosen)" if alpha == method.alpha else ""
                lines.append((f"{method.method}{mark}", ev, ho))
    for name, ev, ho in lines:
        rows.append(
            f"| {name} | {ev.alpha:g} | {fmt(ev.success)} | {fmt(ev.ppl, 2)} | {fmt(ev.distinct)} | "
            f"{fmt(ho.success)} | {fmt(ho.ppl, 2)} | {fmt(ho.distinct)} |"
        )
    return "\n".join(rows)


def plot(result: SteerResult, path: str | Path) -> Path:
    """``success`` vs ``perplexity`` over alpha (evaluation prompts), one panel per concept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.concepts)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(6 * max(n, 1), 4.5), squeeze=False)
    for ax, run in zip(axes[0], result.concepts, strict=False):
        _panel(ax, run, result.config.max_ppl_ratio)
    fig.tight_layout()
    path = Path(path)
    with _files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _panel(ax: Any, run: ConceptRun, budget: float) -> None:
    base = run.base("eval")
    for method in run.methods:
        points = sorted((p for p in method.points if p.split == "eval"), key=lambda p: p.alpha)
        curve = [base, *points]
        xs, ys = [p.ppl.mean for p in curve], [p.success.mean for p in curve]
        xerr = [
            [x - p.ppl.low for x, p in zip(xs, curve, strict=True)],
            [p.ppl.high - x for x, p in zip(xs, curve, strict=True)],
        ]
        yerr = [
            [y - p.success.low for y, p in zip(ys, curve, strict=True)],
            [p.success.high - y for y, p in zip(ys, curve, strict=True)],
        ]
        color = COLORS.get(method.method)
        ax.errorbar(
            xs, ys, xerr=xerr, yerr=yerr, fmt="-o", ms=4, capsize=2, color=color, alpha=0.85, label=method.method
        )
        for p in points:
            ax.annotate(
                f"{p.alpha:g}", (p.ppl.mean, p.success.mean), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
        chosen = method.point(method.alpha, "eval")
        if chosen is not None:
            ax.plot([chosen.ppl.mean], [chosen.success.mean], "o", ms=11, mfc="none", color=color)
    ax.plot([base.ppl.mean], [base.success.mean], "k*", ms=12, label="unsteered")
    ax.axvline(budget * base.ppl.mean, color="k", ls=":", lw=1, label=f"{budget:g}x unsteered perplexity")
    ax.set_xscale("log")
    finite = [p.ppl.high for m in run.methods for p in m.points if math.isfinite(p.ppl.high)]
    if finite:
        ax.set_xlim(right=float(np.max(finite)) * 1.3)
    ax.set_ylim(-5, 105)
    ax.set_xlabel("perplexity of the steered text under the unsteered model (log)")
    ax.set_ylabel("success (%)")
    ax.set_title(f"{run.concept.name}: success vs fluency over alpha (circled: chosen)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def render(result: SteerResult, folder: str | Path) -> list[Path]:
    """Write ``steering.json``, ``steering.md`` and ``steering.png`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        result.save(folder / "steering.json"),
        _files.write_text(folder / "steering.md", markdown(result)),
        plot(result, folder / "steering.png"),
    ]
