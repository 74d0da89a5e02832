"""Turn experiment results into what a person reads: ``table.md`` and PNG plots.

Table layout follows the paper: rows are ranking x {TopK, BottomK}, columns are K in
increasing order of the K actually used (``50%`` is half the latents active at the last
token: 16 for every example with a k = 32 TopK SAE, so it sits between 10 and 20); each
header gives that K. Each cell is the share of kept examples answered right (100 =
unperturbed) with its exact 95% Clopper-Pearson interval (:mod:`.stats`; a percentile
bootstrap returns ``[0, 0]`` for 0 of 22). Steering cells are the share of examples whose
answer matches the donor's gold answer. The random ranking's "BottomK" is a second random
draw and is labelled so.

Paired rows (GradSAE - activation, swap - zero-only, swap - inject-only) give the mean
paired difference in points with its bootstrap interval *and* the exact McNemar p on the
same pairs. :func:`summary_lines` writes the sentences a reader quotes from the numbers:
cells resolved after Holm over the cells summarised, reversals named as reversals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradsae import _files
from gradsae.experiments.results import Condition, CurveResult, LayerResult, RunMeta, RunResults, from_data
from gradsae.experiments.stats import (
    ALPHA,
    McNemar,
    Stat,
    holm,
    is_binary,
    mcnemar,
    paired_difference,
    proportion,
    smallest_p,
)
from gradsae.report.curves import curves_markdown, plot_curves

SUMMARY = "summary.md"
"""The summary sentences of a run folder, written by :func:`render` beside ``table.md``."""
BOOTSTRAP = 1000
"""Resamples for the paired-difference intervals (seeded by the run's seed)."""
NAMES = {
    "gradsae": "GradSAE",
    "activation": "activation",
    "random": "random",
    "ablation": "exact ablation",
    "activation_answer": "activation (answer position)",
    "activation_nosink": "activation (sink-excluded)",
}


def fmt(stat: Stat) -> str:
    """``mean [low, high]`` with one decimal."""
    if stat.n == 0 or math.isnan(stat.mean):
        return "n/a"
    return f"{stat.mean:.1f} [{stat.low:.1f}, {stat.high:.1f}]"


def fmt_prop(stat: Stat) -> str:
    """A 0/1 outcome's share: ``mean [low, high]`` with the exact Clopper-Pearson interval."""
    return fmt(proportion(stat))


def cell(c: Condition, squad: bool) -> str:
    """Exact match (Clopper-Pearson) and, for SQuAD-style tasks, F1 (bootstrap)."""
    return f"{fmt_prop(c.exact)} / {fmt(c.f1)}" if squad else fmt_prop(c.exact)


def fmt_p(p: float) -> str:
    """An exact p-value, short."""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}" if p < 0.1 else f"p={p:.2f}"


# -- K as used ----------------------------------------------------------------------------------------
def _top_at(conditions: Sequence[Condition], k: str) -> list[Condition]:
    return [c for c in conditions if c.set == "top" and c.k == k and c.edit in ("zero", "swap")]


def actual_k(conditions: Sequence[Condition], k: str) -> tuple[float, int | None, int | None]:
    """Mean, fewest and most latents edited per example in the TopK conditions of column ``k``
    (the range is ``None`` in files that did not record it)."""
    top = _top_at(conditions, k)
    if not top:
        return math.nan, None, None
    mean = float(sum(c.mean_k for c in top) / len(top))
    lows, highs = [c.k_min for c in top], [c.k_max for c in top]
    if any(v is None for v in lows + highs):
        return mean, None, None
    return mean, min(v for v in lows if v is not None), max(v for v in highs if v is not None)


def ordered_ks(conditions: Sequence[Condition], ks: Sequence[str]) -> list[str]:
    """``ks`` in increasing order of the K actually used (columns without a measurement keep their place)."""
    means = {k: actual_k(conditions, k)[0] for k in ks}
    known = sorted((k for k in ks if not math.isnan(means[k])), key=lambda k: means[k])
    it = iter(known)
    return [next(it) if not math.isnan(means[k]) else k for k in ks]


def k_header(conditions: Sequence[Condition], k: str) -> str:
    """``K=50% (16)`` when every example used 16, ``K=50% (~15.2)`` for a mean, ``K=10`` when nominal."""
    mean, low, high = actual_k(conditions, k)
    if math.isnan(mean):
        return f"K={k}"
    if low is not None and low == high:
        return f"K={k}" if str(low) == k else f"K={k} ({low})"
    return f"K={k}" if f"{mean:g}" == k and low is None else f"K={k} (~{mean:.1f})"


def k_note(conditions: Sequence[Condition], ks: Sequence[str]) -> str:
    """One line: the K each column actually used (TopK rows), e.g. ``K = 50%: 16 for every example``."""
    parts = []
    for k in ks:
        mean, low, high = actual_k(conditions, k)
        if math.isnan(mean):
            continue
        if (low is not None and low == high) or (low is None and f"{mean:g}" == k):
            parts.append(f"K = {k}: {low if low is not None else k} for every example")
        elif low is not None:
            parts.append(f"K = {k}: mean {mean:.1f}, {low}-{high} per example")
        else:
            parts.append(f"K = {k}: mean {mean:.1f} per example (range not recorded)")
    if not parts:
        return ""
    return (
        "K actually used (latents edited per example in the TopK rows; a ranking edits fewer where fewer latents "
        "score above 0): " + "; ".join(parts) + "."
    )


# -- paired comparisons -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Paired:
    """``a - b`` over the same examples: the mean difference in points with its bootstrap interval, and the
    exact McNemar test (``None`` when the outcomes are not 0/1)."""

    diff: Stat
    test: McNemar | None


def paired(a: Condition | None, b: Condition | None, *, seed: int) -> Paired | None:
    """The paired comparison of two conditions on the same examples; ``None`` if not comparable."""
    if a is None or b is None or not a.per_example or len(a.per_example) != len(b.per_example):
        return None
    diff = paired_difference(a.per_example, b.per_example, seed=seed, resamples=BOOTSTRAP)
    binary = is_binary(a.per_example) and is_binary(b.per_example)
    return Paired(diff=diff, test=mcnemar(a.per_example, b.per_example) if binary else None)


def fmt_paired(pair: Paired | None) -> str:
    """``-26.7 [-46.7, -6.7], p=0.021`` (``-`` when not comparable)."""
    if pair is None:
        return "-"
    d = pair.diff
    text = f"{d.mean:+.1f} [{d.low:+.1f}, {d.high:+.1f}]"
    return text if pair.test is None else f"{text}, {fmt_p(pair.test.p)}"


POSITION_TITLES = {
    "last": "the last position of each pass, KV cache unedited (authors' final code)",
    "cumulative": "the newest token of each pass, kept in the KV cache (a cumulative variant, not the authors')",
    "all": "every position of every pass (authors' earlier code)",
}


def edit_names(donor_value: str = "activation") -> dict[str, str]:
    """Row suffix per steering edit; under ``--donor-value score`` the inject-only floor *sets* the donor's
    latents to their scores (~1e-3): a partial zeroing, named so."""
    inject = " set-to-score-only (partial zeroing)" if donor_value == "score" else " inject-only"
    return {"zero": " zero-only", "inject": inject}


def set_label(method: str, which: str) -> str:
    """``GradSAE TopK``; the random ranking's BottomK is a second random draw, named so."""
    if which == "top":
        return f"{NAMES.get(method, method)} TopK"
    return "random TopK, second draw" if method == "random" else f"{NAMES.get(method, method)} BottomK"


def condition_table(
    conditions: Sequence[Condition],
    ks: Sequence[str],
    squad: bool,
    *,
    edits: Sequence[str] = ("zero",),
    donor_value: str = "activation",
) -> list[str]:
    """Markdown rows: ranking x set (x edit) by K; the no-edit row and paired differences are separate."""
    heads = [k_header(conditions, k) for k in ks]
    lines = ["| ranking / edited set | " + " | ".join(heads) + " |", "|---|" + "---|" * len(ks)]
    methods = list(dict.fromkeys(c.method for c in conditions if c.method != "none"))
    suffix = edit_names(donor_value)
    for method in methods:
        for which in ("top", "bottom"):
            for edit in edits:
                row = {c.k: c for c in conditions if (c.method, c.set, c.edit) == (method, which, edit)}
                if not row:
                    continue
                label = set_label(method, which) + (suffix.get(edit, "") if len(edits) > 1 else "")
                cells = [cell(row[k], squad) if k in row else "-" for k in ks]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def paired_cell(a: Condition | None, b: Condition | None, *, seed: int) -> str:
    """``a - b`` over the same examples: points, bootstrap interval and exact McNemar p; ``-`` if not comparable."""
    return fmt_paired(paired(a, b, seed=seed))


def _find_top(conditions: Sequence[Condition], method: str, edit: str, k: str) -> Condition | None:
    return next((c for c in conditions if (c.method, c.set, c.edit, c.k) == (method, "top", edit, k)), None)


def paired_row(
    conditions: Sequence[Condition], ks: Sequence[str], meta: RunMeta, *, edit: str, a: str = "gradsae"
) -> list[str]:
    """``GradSAE - b`` TopK per K for each other non-random ranking ``b`` (activation first)."""
    others = [m for m in dict.fromkeys(c.method for c in conditions) if m not in ("none", "random", a)]
    lines = []
    for b in others:
        cells = [
            paired_cell(_find_top(conditions, a, edit, k), _find_top(conditions, b, edit, k), seed=meta.seed)
            for k in ks
        ]
        lines.append(f"| {NAMES.get(a, a)} - {NAMES.get(b, b)} TopK, paired | " + " | ".join(cells) + " |")
    return lines


def floor_rows(conditions: Sequence[Condition], ks: Sequence[str], meta: RunMeta) -> list[str]:
    """Per ranking: ``swap - zero-only`` and ``swap - inject-only`` (TopK, paired, with McNemar p)."""
    lines = []
    suffix = edit_names(meta.donor_value)
    for method in dict.fromkeys(c.method for c in conditions if c.method != "none"):
        for floor in ("zero", "inject"):
            cells = [
                paired_cell(
                    _find_top(conditions, method, "swap", k), _find_top(conditions, method, floor, k), seed=meta.seed
                )
                for k in ks
            ]
            if all(c == "-" for c in cells):
                continue
            label = f"{NAMES.get(method, method)} swap -{suffix[floor]}, paired"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def removed_norm_rows(conditions: Sequence[Condition], ks: Sequence[str]) -> list[str]:
    """Mean residual norm each TopK masking removes (``sum_c H_c ||W_dec[c]||``), when the run recorded it."""
    rows = []
    for method in dict.fromkeys(c.method for c in conditions if c.method != "none"):
        by = {c.k: c for c in conditions if (c.method, c.set, c.edit) == (method, "top", "zero")}
        values = [by[k].removed_norm if k in by else None for k in ks]
        if all(v is None for v in values):
            continue
        cells = ["-" if v is None else f"{v:.1f}" for v in values]
        rows.append(f"| {NAMES.get(method, method)} TopK | " + " | ".join(cells) + " |")
    if not rows:
        return []
    head = "| residual norm removed | " + " | ".join(f"K={k}" for k in ks) + " |"
    return [
        "",
        "Residual norm each TopK masking removes (mean over examples of the sum over masked latents of "
        'H_c ||W_dec[c]||, H_c the mean activation over the spliced positions): "hurts more" is read next to '
        '"removes more".',
        "",
        head,
        "|---|" + "---|" * len(ks),
        *rows,
    ]


def layer_section(result: LayerResult, meta: RunMeta) -> list[str]:
    squad = meta.metric == "squad"
    unit = "EM / F1" if squad else "accuracy"
    ks = ordered_ks(result.perturbation, [str(k) for k in meta.ks])
    note = k_note(result.perturbation, ks)
    out = [
        f"## Layer {result.layer}",
        "",
        f"- SAE: {meta.sae_labels[str(result.layer)]}",
        f"- task score on all {result.n_examples} examples: without the SAE {fmt_prop(result.clean_baseline)}, "
        f"with the SAE spliced ({meta.mode} mode) {fmt_prop(result.baseline)}",
        f"- kept (answered correctly with the SAE): {result.n_kept}; donor pairs for steering: {result.n_donor_pairs}",
        "",
        f"### Experiment 1: mask the selected latents ({unit} vs the gold answer)",
        "",
        *_unperturbed(result.perturbation, squad),
        "",
        *([note, ""] if note else []),
        *condition_table(result.perturbation, ks, squad),
        *paired_row(result.perturbation, ks, meta, edit="zero"),
        *removed_norm_rows(result.perturbation, ks),
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
        f"Unperturbed (K = 0, the same batches, measured): {cell(none[0], squad)}. Cells: share of kept examples "
        "[exact 95% Clopper-Pearson interval]. Paired rows: GradSAE minus the other ranking on the same examples, "
        "in points, 95% bootstrap interval, and the exact two-sided McNemar p on the same pairs."
    ]


def _fmt_own(condition: Condition | None) -> str:
    own = None if condition is None else condition.own
    return "-" if own is None else fmt_prop(own)


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
    inject = edit_names(meta.donor_value)["inject"].strip()
    out += [
        f"{floor}Cells: {unit} against the donor's gold answer over {result.n_donor_pairs} pairs. "
        f"`swap` zeroes the example's own TopK and sets the donor's (the paper's steering); `zero-only` and "
        f"`{inject}` are its two halves: steering is the swap's rate above the zero-only floor"
        + (
            " (under `--donor-value score` the donor's latents are *set* to their scores, ~1e-3: the second half "
            "is a partial zeroing, not an injection)."
            if meta.donor_value == "score"
            else "."
        ),
        "",
        *condition_table(part, ks, squad, edits=("swap", "zero", "inject"), donor_value=meta.donor_value),
        *paired_row(part, ks, meta, edit="swap"),
        *floor_rows(part, ks, meta),
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
        cells = [fmt_prop(row[m].exact) if m in row else "-" for m in ("activation", "gradsae", "random")]
        lines.append(f"| {result.layer} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def table_markdown(results: Sequence[LayerResult], meta: RunMeta) -> str:
    """The whole ``table.md``."""
    out = [
        f"# GradSAE reproduction: task `{meta.task}`, model `{meta.model}`",
        "",
        f"Examples: {meta.n} (seed {meta.seed}); splice mode: {meta.mode}; rankings: "
        f"{', '.join(NAMES.get(m, m) for m in meta.methods)}. Cells: share of kept examples "
        "[exact 95% Clopper-Pearson interval]; F1 and paired differences: [95% bootstrap interval].",
        "",
        *summary_lines(results, meta),
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
    paths.append(_files.write_text(folder / SUMMARY, summary_markdown(results)))
    return paths


def plot_layer(result: LayerResult, meta: RunMeta, folder: Path) -> list[Path]:
    """``exp1_layer{l}.png`` and ``exp2_layer{l}.png``: score vs K, one line per ranking and set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = ordered_ks(result.perturbation, [str(k) for k in meta.ks])
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
            stats = {k: proportion(row[k].exact) for k in row}
            ys = [stats[k].mean if k in stats else math.nan for k in ks]
            lo = [y - stats[k].low if k in stats else 0 for y, k in zip(ys, ks, strict=True)]
            hi = [stats[k].high - y if k in stats else 0 for y, k in zip(ys, ks, strict=True)]
            ax.errorbar(
                x,
                ys,
                yerr=[lo, hi],
                fmt=style,
                capsize=3,
                color=colors.get(method),
                label=set_label(method, which),
            )
    ax.set_xticks(x, [k_header(conditions, k).removeprefix("K=") for k in ks])
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


# -- summary sentences, written from the numbers --------------------------------------------------------
MAX_NAMED_TIES = 6
"""A summary names its tied cells up to this many (more: only their count)."""


@dataclass(frozen=True)
class Cell:
    """One paired comparison a summary counts: where it was measured and its result."""

    where: str
    """E.g. ``sst2 layer 6, K = 50% (16)``."""
    examples: str
    """Key of the example set it was measured on (cells sharing one are not independent)."""
    pair: Paired


def count_sentence(cells: Sequence[Cell], *, better: str, worse: str, sign: int = -1, alpha: float = ALPHA) -> str:
    """``a - b`` with the ``sign`` of ``better`` (e.g. below 0: "GradSAE's TopK hurts more"), the other sign
    ``worse``: the counts by point estimate and after Holm over these cells, the example sets behind them, and
    every reversal with its paired difference (``a - b`` as the tables print it) and whether Holm resolves it,
    and every tie (a difference of exactly 0), so that the three counts add up to the cells."""
    if not cells:
        return ""
    tested = [c for c in cells if c.pair.test is not None]
    adjusted = holm([c.pair.test.p if c.pair.test is not None else math.nan for c in cells])
    resolved = [c for c, q in zip(cells, adjusted, strict=True) if not math.isnan(q) and q <= alpha]
    good = [c for c in cells if sign * c.pair.diff.mean > 0]
    bad = [c for c in cells if sign * c.pair.diff.mean < 0]
    good_resolved = [c for c in resolved if c in good]
    sets = len({c.examples for c in cells})
    text = (
        f"{better} in {len(good)} of {len(cells)} cells by the point estimate and in {len(good_resolved)} of "
        f"{len(tested)} after Holm correction over those cells (exact McNemar, family-wise {alpha:g}); the cells "
        f"stand on {sets} independent example set{'s' if sets != 1 else ''}"
        + (f" ({len({c.examples for c in good_resolved})} with a resolved cell)." if good_resolved else ".")
    )
    if bad:
        parts = []
        for c in bad:
            status = "resolved after Holm" if c in resolved else "not resolved"
            parts.append(f"{c.where}: {fmt_paired(c.pair)} ({status})")
        text += f" Reversed ({worse}) in {len(bad)}: " + "; ".join(parts) + "."
    tied = [c.where for c in cells if c.pair.diff.mean == 0]  # (a nan difference is none of the three)
    if tied:
        named = ": " + "; ".join(tied) if len(tied) <= MAX_NAMED_TIES else " (each in the tables)"
        text += f" Tied (difference 0) in {len(tied)}{named}."
    return text + _power_note(tested, alpha)


def _power_note(tested: Sequence[Cell], alpha: float) -> str:
    """How many tested cells cannot reach ``p <= alpha`` at all: with ``n`` discordant pairs the smallest exact
    two-sided McNemar p is ``2 / 2^n`` (1 for none), so ``n <= 5`` never reaches 0.05, whatever the direction."""
    counts = [c.pair.test.a_only + c.pair.test.b_only for c in tested if c.pair.test is not None]
    weak = [n for n in counts if smallest_p(n) > alpha]
    if not weak:
        return ""
    return (
        f" {len(weak)} of the {len(counts)} tested cells {'has' if len(weak) == 1 else 'have'} at most {max(weak)} "
        f"discordant pair{'' if max(weak) == 1 else 's'}, too few for an "
        f"exact McNemar p <= {alpha:g} whatever the outcome."
    )


def layer_cells(
    result: LayerResult, meta: RunMeta, *, a: str, b: str, edit_a: str, edit_b: str, examples: str, prefix: str = ""
) -> list[Cell]:
    """The paired TopK cells ``a/edit_a - b/edit_b`` of one layer, one per K (and steering position)."""
    conditions = result.perturbation if edit_a == "zero" and edit_b == "zero" else result.steering
    ks = ordered_ks(result.perturbation, [str(k) for k in meta.ks])
    wheres = sorted({c.positions for c in conditions if c.edit != "none"}) or [""]
    out = []
    for where in wheres:
        part = [c for c in conditions if c.positions == where]
        for k in ks:
            pair = paired(_find_top(part, a, edit_a, k), _find_top(part, b, edit_b, k), seed=meta.seed)
            if pair is None:
                continue
            head = k_header(result.perturbation, k).replace("K=", "K = ")
            pos = f", {where} positions" if len(wheres) > 1 else ""
            out.append(Cell(where=f"{prefix}layer {result.layer}, {head}{pos}", examples=examples, pair=pair))
    return out


def experiment_sentences(layers: Sequence[tuple[str, LayerResult, RunMeta]], *, curves: bool = True) -> list[str]:
    """Bullet points for one run or a sweep: ``(task, layer result, meta)`` triples; cells are counted together."""

    def cells(a: str, b: str, edit_a: str, edit_b: str) -> list[Cell]:
        multi = len({task for task, _, _ in layers}) > 1
        return [
            c
            for task, layer, meta in layers
            for c in layer_cells(
                layer, meta, a=a, b=b, edit_a=edit_a, edit_b=edit_b, examples=task, prefix=f"{task} " if multi else ""
            )
        ]

    lines = []
    exp1 = count_sentence(
        cells("gradsae", "activation", "zero", "zero"),
        better="Experiment 1: zeroing GradSAE's TopK hurts the answer more than zeroing activation's",
        worse="GradSAE's TopK hurts less",
    )
    if exp1:
        lines.append(f"- {exp1}")
    for control in ("activation_answer", "activation_nosink", "ablation"):
        text = count_sentence(
            cells("gradsae", control, "zero", "zero"),
            better=f"Control: GradSAE's TopK hurts more than {NAMES[control]}'s",
            worse=f"{NAMES[control]}'s hurts more",
        )
        if text:
            lines.append(f"- {text}")
    randoms = [
        proportion(c.exact).mean
        for _, layer, _ in layers
        for c in layer.perturbation
        if (c.method, c.set, c.edit) == ("random", "top", "zero")
    ]
    if randoms:
        lines.append(f"- Random TopK keeps {min(randoms):.0f}-{max(randoms):.0f}% of the answers (every cell).")
    for method in ("gradsae", "activation", "random"):
        text = count_sentence(
            cells(method, method, "swap", "zero"),
            better=f"Experiment 2: the {NAMES[method]} swap moves more answers to the donor's than its zero-only "
            "floor (swap - zero-only > 0)",
            worse="the floor moves more",
            sign=+1,
        )
        if text:
            lines.append(f"- {text}")
    if curves:
        lines += [line for task, layer, _ in layers for line in _curve_sentences(task, layer, len(layers) > 1)]
    return lines


def _curve_sentences(task: str, layer: LayerResult, multi: bool) -> list[str]:
    if not layer.curves:
        return []
    from gradsae.report.curves import curve_summary_sentence  # report.curves imports this module's neighbours

    where = f"{task} layer {layer.layer}" if multi else f"layer {layer.layer}"
    return [f"- Faithfulness ({where}): {curve_summary_sentence(from_data(CurveResult, layer.curves))}"]


def summary_lines(results: Sequence[LayerResult], meta: RunMeta) -> list[str]:
    """``## Summary``: the sentences a reader quotes, each computed from the numbers below."""
    body = experiment_sentences([(meta.task, layer, meta) for layer in results])
    if not body:
        return []
    return ["## Summary (written from the numbers below)", "", *body, ""]


def summary_markdown(results: RunResults) -> str:
    """The summary alone, as a markdown page (``summary.md``)."""
    meta = results.config
    head = [f"# Summary: task `{meta.task}`, model `{meta.model}`, {meta.mode} mode", ""]
    return "\n".join([*head, *summary_lines(results.layers, meta)]) + "\n"
