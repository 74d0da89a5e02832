"""Render a steering run (:class:`~gradsae.experiments.results.SteerResult`) as markdown and a Pareto plot.

Everything here is computed from ``steering.json`` alone, so the text follows the numbers:

* Units: one evaluation prompt of one concept under one prompt seed, for the
  concepts whose judge passed its check. The evaluation prompts depend on the seed
  only, so every layer reuses them (and the unsteered model answers them alike):
  the layers of a unit are not independent, and a unit's outcome is the mean over
  its layers. A selector's outcome at one layer is its evaluation success at the
  alpha it chose on the held-aside prompts (the unsteered outcome when it chose 0);
  ``random`` is the mean over its draws.
* Gain: mean over units of (selector - unsteered), x100, with a 95% bootstrap
  interval over units.
* Pairs: every two selectors, paired over units: the difference with its
  bootstrap interval, exact McNemar when both outcomes are binary, else the
  sign-flip test (:mod:`gradsae.experiments.stats`); Holm over all pairs.
* Headline (:func:`headline`): the selector with the largest gain is named the
  best only when it beats every other selector (Holm-adjusted ``p <= 0.05``);
  otherwise the text names the selectors it beats and those it does not.
* ``steering.png``: per concept, success vs perplexity over alpha on the
  held-aside prompts (mean over cells), every selector, the unsteered model a star.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradsae import _files
from gradsae.experiments.results import (
    METHOD_NAMES,
    ConceptRun,
    MethodRun,
    Point,
    SteerResult,
    within_budget,
)
from gradsae.experiments.stats import Stat, bootstrap, holm, is_binary, paired_p, proportion

COLORS = {
    "gradsae": "tab:red",
    "gradsae-target": "tab:orange",
    "activation": "tab:blue",
    "logit-lens": "tab:green",
    "arad": "tab:purple",
    "dtc": "tab:brown",
    "random": "tab:gray",
}
LEVEL = 0.05
"""Family-wise level of the Holm-corrected comparisons."""


def fmt(stat: Stat | None, digits: int = 1) -> str:
    """``mean [low, high]``, or ``-``."""
    if stat is None or stat.n == 0:
        return "-"
    return f"{stat.mean:.{digits}f} [{stat.low:.{digits}f}, {stat.high:.{digits}f}]"


def selectors(result: SteerResult) -> list[str]:
    """The selectors in config order, random once."""
    return list(result.config.methods)


def runs_of(run: ConceptRun, selector: str) -> list[MethodRun]:
    """The method runs of a selector (every draw for random)."""
    if selector == "random":
        return [m for m in run.methods if m.method.startswith("random-")]
    return [m for m in run.methods if m.method == selector]


def outcome(run: ConceptRun, selector: str) -> list[float]:
    """Per evaluation prompt: the selector's success at its chosen alpha (random: mean over draws)."""
    draws = [run.evaluated(m).success_per_prompt for m in runs_of(run, selector)]
    return [float(np.mean(col)) for col in zip(*draws, strict=True)] if draws else []


def good_concepts(result: SteerResult) -> list[str]:
    """Concepts whose judge passed its check."""
    return [c.name for c in result.concepts if result.judges.get(c.name, {}).get("good")]


@dataclass(frozen=True)
class Pair:
    """Two selectors compared over the same units."""

    a: str
    b: str
    diff: Stat
    """``a - b`` success (points), 95% bootstrap interval over units."""
    p: float
    test: str
    p_holm: float


@dataclass(frozen=True)
class Comparison:
    """The pooled comparison over units."""

    concepts: tuple[str, ...]
    units: int
    success: dict[str, Stat]
    gain: dict[str, Stat]
    """Selector minus unsteered (points)."""
    pairs: tuple[Pair, ...]
    best: str
    beats_all: bool


def compare(result: SteerResult, concepts: list[str] | None = None) -> Comparison:
    """Gains over no steering and every pair of selectors, pooled over the units of ``concepts``."""
    names = good_concepts(result) if concepts is None else concepts
    boot = {"seed": 0, "resamples": result.config.resamples}
    sel = selectors(result)
    pooled = unit_outcomes(result, names)
    success = {s: bootstrap(pooled[s], np.mean, scale=100, **boot) for s in ["none", *sel]}
    gain = {s: bootstrap(np.subtract(pooled[s], pooled["none"]).tolist(), np.mean, scale=100, **boot) for s in sel}
    raw = []
    for i, a in enumerate(sel):
        for b in sel[i + 1 :]:
            diff = bootstrap(np.subtract(pooled[a], pooled[b]).tolist(), np.mean, scale=100, **boot)
            p, test = paired_p(pooled[a], pooled[b]) if pooled[a] else (1.0, "-")
            raw.append((a, b, diff, p, test))
    adjusted = holm([r[3] for r in raw]) if raw else []
    pairs = tuple(Pair(a, b, diff, p, test, q) for (a, b, diff, p, test), q in zip(raw, adjusted, strict=True))
    best = max(sel, key=lambda s: (gain[s].mean if gain[s].n else -math.inf, -sel.index(s)))
    beats_all = bool(pairs) and all(
        pair.p_holm <= LEVEL and ((pair.a == best) == (pair.diff.mean > 0))
        for pair in pairs
        if best in (pair.a, pair.b)
    )
    return Comparison(
        concepts=tuple(names),
        units=len(pooled["none"]),
        success=success,
        gain=gain,
        pairs=pairs,
        best=best,
        beats_all=beats_all,
    )


def unit_outcomes(result: SteerResult, names: list[str]) -> dict[str, list[float]]:
    """Per selector (and ``none``, unsteered), its outcome on every unit of ``names`` (module docstring): units
    are (concept, prompt seed, evaluation prompt), each the mean over the layers that reuse the prompt."""
    sel = selectors(result)
    found: dict[tuple[str, int, int, str], dict[str, list[float]]] = {}
    for cell in result.cells:
        for run in cell.concepts:
            if run.concept not in names:
                continue
            values = {"none": list(run.base("eval").success_per_prompt), **{s: outcome(run, s) for s in sel}}
            for s, per_prompt in values.items():
                for i, (prompt, value) in enumerate(zip(cell.prompts["eval"], per_prompt, strict=False)):
                    found.setdefault((run.concept, cell.seed, i, prompt), {}).setdefault(s, []).append(value)
    units = [key for key in sorted(found) if all(s in found[key] for s in ["none", *sel])]
    return {s: [float(np.mean(found[key][s])) for key in units] for s in ["none", *sel]}


def headline(result: SteerResult) -> str:
    """The one-paragraph answer: which selector steers best at matched fluency, or which it beats and which not."""
    comp = compare(result)
    if not comp.units:
        return "No concept has a judge that passed its check, so no selector is compared."
    layers = sorted({c.layer for c in result.cells})
    seeds = sorted({c.seed for c in result.cells})
    where = (
        f"over {comp.units} independent units ({len(comp.concepts)} concepts with a working judge x prompt seeds "
        f"{', '.join(map(str, seeds))} x evaluation prompts; each unit the mean over layers "
        f"{', '.join(map(str, layers))}, which reuse its prompt)"
    )
    best, gain = comp.best, comp.gain[comp.best]
    against = [p for p in comp.pairs if comp.best in (p.a, p.b)]
    worst = max((p.p_holm for p in against), default=1.0)
    largest = f"{best}'s {gain.mean:+.1f} points of success over no steering [{gain.low:.1f}, {gain.high:.1f}]"
    if comp.beats_all:
        return (
            f"At matched fluency, **{best}** steers best {where}: {gain.mean:+.1f} points of success over no "
            f"steering [{gain.low:.1f}, {gain.high:.1f}], ahead of every other selector (Holm-adjusted p <= "
            f"{worst:.3g})."
        )
    if not against:
        return f"At matched fluency, {where}, only one selector was run: {largest}; there is nothing to compare it to."
    ahead = [p.b if p.a == best else p.a for p in against if p.p_holm <= LEVEL]
    not_ahead = [p.b if p.a == best else p.a for p in against if p.p_holm > LEVEL]
    return (
        f"At matched fluency the largest gain {where} is {largest}, but it does not beat every other selector: "
        + (f"ahead of {', '.join(ahead)} (Holm-adjusted p <= {LEVEL:g}); " if ahead else "")
        + f"not resolved against {', '.join(not_ahead)} (Holm-adjusted p > {LEVEL:g})."
    )


def success_stat(point: Point) -> Stat:
    """A point's success with the interval its outcome needs: Clopper-Pearson for a 0/1 outcome (a topic's word
    present or not; a percentile bootstrap of 0 of 12 would print [0.0, 0.0]), else the stored bootstrap one."""
    return proportion(point.success) if is_binary(point.success_per_prompt) else point.success


# -- markdown ---------------------------------------------------------------------------------------------------
def markdown(result: SteerResult, *, plot_path: str = "steering.png") -> str:
    """The whole report."""
    cfg = result.config
    layers = sorted({c.layer for c in result.cells})
    out = [
        f"# Steering with SAE latents, every selector at the same strength: `{result.model}`",
        "",
        "Generated by `gradsae steer` from `steering.json` alone; every number below is computed from that file.",
        "",
        f"- layers {', '.join(map(str, layers))}; prompt seeds {', '.join(str(s) for s in cfg.seeds)} (the second "
        f"drawn from the freeze hash `{result.freeze.get('sha256', '')[:12]}`, {result.freeze.get('date', '')}: "
        f"{result.freeze.get('note', '')})",
        f"- K = {cfg.k} latents per selector; the added vector has norm alpha x R at every position and step, "
        f"alpha in {list(cfg.alphas)}, R the residual stream's median token norm at the layer on the held-aside "
        "prompts (" + "; ".join(f"layer {c.layer} seed {c.seed}: R = {c.resid_norm:.1f}" for c in result.cells) + ")",
        f"- prompts per cell: {cfg.n_seed} seed (scores only), {cfg.n_heldout} held-aside (alpha and R only), "
        f"{cfg.n_eval} evaluation (reported); {cfg.max_new_tokens} new tokens each, greedy",
        f"- matched fluency: alpha is the best held-aside success with held-aside perplexity <= "
        f"{cfg.max_ppl_ratio:g} x and distinct-2 >= {cfg.min_distinct_ratio:g} x the unsteered model's; 0 = none "
        "beat no steering",
        f"- intervals: 95% bootstrap ({cfg.resamples} resamples), but Clopper-Pearson for a cell's 0/1 success "
        "(topics); tests: exact McNemar (binary outcomes) or the "
        f"paired sign-flip test, Holm over all pairs at {LEVEL:g}",
    ]
    if result.command:
        out.append(f"- command: `{result.command}`")
    out += ["", "## Selectors", ""]
    out += [f"- `{s}`: {METHOD_NAMES.get(s, s)}" for s in selectors(result)]
    out += ["", "## Answer", "", headline(result), "", judges_section(result), "", fluency_section(result), ""]
    out += pooled_section(result)
    out += ["", f"![success vs perplexity]({plot_path})", ""]
    for concept in result.concepts:
        out += concept_section(result, concept.name)
    return "\n".join(out) + "\n"


def judges_section(result: SteerResult) -> str:
    """One line per concept: does its judge work, by the numbers of its check."""
    lines = ["### Judges", ""]
    for concept in result.concepts:
        check = result.judges.get(concept.name, {})
        verdict = "works" if check.get("good") else "**no good judge**: its numbers are shown but not pooled"
        if check.get("kind") == "words":
            lines.append(
                f"- `{concept.name}` (whole listed words): matches {100 * check['hit_texts']:.0f}% of its concept "
                f"texts and {100 * check['hit_neutral']:.0f}% of the neutral texts and prompts; {verdict}"
            )
        elif check.get("kind") == "sentiment":
            lines.append(
                f"- `{concept.name}` (the model's P({check['label']}), summed over spellings): "
                f"{100 * check['p_texts']:.1f} on its texts vs {100 * check['p_negatives']:.1f} on their opposites; "
                f"the label spellings hold {100 * check['label_mass']:.1f}% of the next-token mass; the judge "
                f"emits {', '.join(sorted(set(check['emitted'])))} ({100 * check['emitted_covered']:.0f}% label "
                f"spellings); {verdict}"
            )
    return "\n".join(lines)


def fluency_section(result: SteerResult) -> str:
    """Does the grid reach down to where every selector is fluent?"""
    cfg = result.config
    low = min(cfg.alphas)
    total, fluent, off = 0, 0, []
    for cell in result.cells:
        for run in cell.concepts:
            base = run.base("heldout")
            for method in run.methods:
                point = method.point(low, "heldout")
                if point is None:
                    continue
                total += 1
                if within_budget(point, base, cfg):
                    fluent += 1
                else:
                    off.append(f"{method.method} on {run.concept} (layer {cell.layer}, seed {cell.seed})")
    line = (
        f"### Grid\n\nAt the smallest alpha ({low:g}), {fluent} of {total} selector runs are within the fluency budget"
    )
    return line + (
        f"; outside it: {'; '.join(off)}." if off else ": the grid reaches down to where every one is fluent."
    )


def pooled_section(result: SteerResult) -> list[str]:
    comp = compare(result)
    out = [
        "### Pooled over units",
        "",
        f"Concepts pooled: {', '.join(comp.concepts) or 'none'}; {comp.units} independent units (concept x prompt "
        "seed x evaluation prompt; each the mean over the layers, which reuse its prompt).",
        "",
        "| selector | success (%) | gain over no steering (points) | alpha 0 chosen |",
        "|---|---|---|---|",
        f"| unsteered | {fmt(comp.success['none'])} | | |",
    ]
    for s in selectors(result):
        zero = sum(
            1
            for cell in result.cells
            for run in cell.concepts
            if run.concept in comp.concepts
            for m in runs_of(run, s)
            if m.alpha == 0
        )
        runs = sum(
            len(runs_of(run, s)) for cell in result.cells for run in cell.concepts if run.concept in comp.concepts
        )
        out.append(f"| {s} | {fmt(comp.success[s])} | {fmt(comp.gain[s])} | {zero} of {runs} |")
    if "random" in selectors(result):
        out += ["", random_spread(result, comp.concepts)]
    out += [
        "",
        "| pair | difference (points) | test | p | Holm p |",
        "|---|---|---|---|---|",
    ]
    out += [f"| {p.a} - {p.b} | {fmt(p.diff)} | {p.test} | {p.p:.3g} | {p.p_holm:.3g} |" for p in comp.pairs]
    return out


def random_spread(result: SteerResult, concepts: tuple[str, ...]) -> str:
    """Mean success of each random draw, pooled over the same units: the spread of the null."""
    draws: dict[str, list[float]] = {}
    for cell in result.cells:
        for run in cell.concepts:
            if run.concept not in concepts:
                continue
            for m in runs_of(run, "random"):
                draws.setdefault(m.method, []).extend(run.evaluated(m).success_per_prompt)
    means = [100 * float(np.mean(v)) for _, v in sorted(draws.items())]
    if not means:
        return ""
    return (
        f"Random draws (each pooled over the same units): {', '.join(f'{m:.1f}' for m in means)}; mean "
        f"{np.mean(means):.1f}, standard deviation {np.std(means, ddof=1) if len(means) > 1 else 0.0:.1f}."
    )


def concept_section(result: SteerResult, name: str) -> list[str]:
    """Per cell: each selector's chosen alpha and evaluation numbers, the paired test against no steering."""
    concept = result.concept(name)
    what = f"sentiment ({concept.judge})" if concept.judge else "topic"
    out = [f"## `{name}` ({what})", "", f"Words: {', '.join(concept.words)}.", ""]
    comp = compare(result, [name])
    out.append(
        "Pooled over cells: "
        + "; ".join(f"{s} {fmt(comp.gain[s])}" for s in selectors(result))
        + " points of gain over no steering."
    )
    for cell in result.cells:
        run = next((r for r in cell.concepts if r.concept == name), None)
        if run is None:
            continue
        base = run.base("eval")
        out += [
            "",
            f"### layer {cell.layer}, seed {cell.seed}",
            "",
            "| selector | alpha | eval success | vs unsteered (test, uncorrected p) | eval perplexity | "
            "eval distinct-2 | held-aside success by alpha | held-aside perplexity by alpha |",
            "|---|---|---|---|---|---|---|---|",
            f"| unsteered | 0 | {fmt(success_stat(base))} | | {fmt(base.ppl, 2)} | {fmt(base.distinct)} | "
            f"{run.base('heldout').success.mean:.0f} | {run.base('heldout').ppl.mean:.2f} |",
        ]
        for method in run.methods:
            point = run.evaluated(method)
            p, test = paired_p(point.success_per_prompt, base.success_per_prompt)
            sweep = [q for q in method.points if q.split == "heldout"]
            out.append(
                f"| {method.method} | {method.alpha:g} | {fmt(success_stat(point))} | {test} {p:.3g} | "
                f"{fmt(point.ppl, 2)} | {fmt(point.distinct)} | "
                + " / ".join(f"{q.success.mean:.0f}" for q in sweep)
                + " | "
                + " / ".join(f"{q.ppl.mean:.1f}" for q in sweep)
                + " |"
            )
        examples = [m for m in run.methods if m.alpha > 0][:3]
        for method in examples:
            point = run.evaluated(method)
            out.append(f"\n- {method.method}, alpha {method.alpha:g}: {point.texts[0].strip()!r}")
    out.append("")
    return out


# -- plot -------------------------------------------------------------------------------------------------------
def curve(result: SteerResult, name: str, selector: str) -> list[tuple[float, float, float]]:
    """``(alpha, perplexity, success)`` on the held-aside prompts, mean over cells (and random draws)."""
    rows = []
    for alpha in result.config.alphas:
        points: list[Point] = []
        for cell in result.cells:
            for run in cell.concepts:
                if run.concept == name:
                    points += [p for m in runs_of(run, selector) if (p := m.point(alpha, "heldout")) is not None]
        if points:
            rows.append(
                (alpha, float(np.mean([p.ppl.mean for p in points])), float(np.mean([p.success.mean for p in points])))
            )
    return rows


def plot(result: SteerResult, path: str | Path) -> Path:
    """One panel per concept: success vs perplexity over alpha, every selector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(result.concepts), 1)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax, concept in zip(axes.flat, result.concepts, strict=False):
        _panel(ax, result, concept.name)
    for ax in list(axes.flat)[len(result.concepts) :]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    with _files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def _panel(ax: Any, result: SteerResult, name: str) -> None:
    bases = [r.base("heldout") for c in result.cells for r in c.concepts if r.concept == name]
    base_ppl = float(np.mean([b.ppl.mean for b in bases])) if bases else 1.0
    base_success = float(np.mean([b.success.mean for b in bases])) if bases else 0.0
    for selector in selectors(result):
        rows = curve(result, name, selector)
        if not rows:
            continue
        ax.plot([r[1] for r in rows], [r[2] for r in rows], "-o", ms=4, color=COLORS.get(selector), label=selector)
        for alpha, x, y in rows:
            ax.annotate(f"{alpha:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.plot([base_ppl], [base_success], "k*", ms=12, label="unsteered")
    ax.axvline(result.config.max_ppl_ratio * base_ppl, color="k", ls=":", lw=1, label="fluency budget")
    ax.set_xscale("log")
    ax.set_ylim(-5, 105)
    ax.set_xlabel("held-aside perplexity under the unsteered model (log)")
    ax.set_ylabel("held-aside success (%)")
    ax.set_title(f"{name}: success vs fluency over alpha (mean over cells)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def render(result: SteerResult, folder: str | Path, *, report: str | Path | None = None) -> list[Path]:
    """Write ``steering.json``, the markdown (``report``, default ``folder/steering.md``) and ``steering.png``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = Path(report) if report is not None else folder / "steering.md"
    png = plot(result, folder / "steering.png")
    link = os.path.relpath(png, report.parent)
    return [result.save(folder / "steering.json"), _files.write_text(report, markdown(result, plot_path=link)), png]
