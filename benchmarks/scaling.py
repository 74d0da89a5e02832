"""Scaling table: GradSAE scoring's time and peak memory against prompt length and SAE width.

Each point times GradSAE scoring (``score_latents``, error mode) and the plain
forward + backward to the SAE layer on the same batch, interleaved (median of
``repeats`` runs after a warm-up), then measures the peak resident memory of one
run of each above the loaded baseline. Everything runs in one child process with
glibc's fixed mmap threshold (see :mod:`benchmarks.memory`), so that the peaks
follow live tensors.

* length: one row of 64 .. 8192 tokens (SmolLM2's context), the shipped SAE. Both costs should grow
  linearly in tokens (attention adds a quadratic term, small at d_model 576);
* width: the benchmark's batch, the shipped SAE (4608 latents) and random TopK SAEs
  of 16k, 131k and 1M latents (:func:`benchmarks.common.wide_sae`). The plain
  forward + backward does not depend on the width; scoring adds the encoder matmul,
  ``2 d_model d_sae`` flops per token, which grows linearly with the width (no
  sparsity avoids it: TopK needs every pre-activation), plus ``budget`` floats of
  pre-activations at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import WIDE, WIDEST, Figure, child_parser, compare, load_sae, set_threads, text_batch, wide_sae
from benchmarks.memory import FIXED_MMAP, peak_above_baseline

LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
"""One row each; 8192 is SmolLM2's context (the ``long_prompt`` figures read that row)."""
WIDTHS = (0, 16384, WIDE, WIDEST)
"""``0``: the shipped SAE (4608 latents)."""
TARGET = 1.15
LONG = 4096
"""From this many tokens a point runs once (timed and measured together) instead of ``repeats`` times."""
LONG_TIME_TARGET = 1.15
LONG_MEMORY_TARGET = 1.3
"""``long_prompt_time`` / ``long_prompt_memory``: GradSAE / plain fwd+bwd on the longest prompt (issue 21)."""


def point(lm: Any, sae: Any, ids: Any, mask: Any, layer: int, repeats: int) -> dict[str, Any]:
    """Time and peak memory of scoring and of the plain forward + backward on one batch.

    From :data:`LONG` tokens on, each runs once, timed and measured in the same run
    (no warm-up: the shorter rows before it warmed up; one run lasts minutes).
    """
    from benchmarks.core import gradsae_scores, plain_forward_backward

    work = {
        "gradsae": lambda: gradsae_scores(lm, sae, ids, mask, layer),
        "plain": lambda: plain_forward_backward(lm, ids, mask, layer),
    }
    measured: dict[str, tuple[int, int]] = {}
    if ids.numel() >= LONG:
        seconds = {}
        for name, fn in work.items():
            start = time.perf_counter()
            measured[name] = peak_above_baseline(fn)
            seconds[name] = time.perf_counter() - start
    else:
        times = compare(work, repeats)
        seconds = {name: times[name].median for name in work}
        measured = {name: peak_above_baseline(fn) for name, fn in work.items()}
    peaks = {name: peak for name, (_base, peak) in measured.items()}
    return {
        "baseline_mib": measured["gradsae"][0] / 1024,
        "tokens": int(mask.sum()),
        "d_sae": sae.cfg.d_sae,
        "gradsae_s": seconds["gradsae"],
        "plain_s": seconds["plain"],
        "gradsae_peak_mib": peaks["gradsae"] / 1024,
        "plain_peak_mib": peaks["plain"] / 1024,
    }


def child(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every point of the table, in this process."""
    from gradsae.models import load_model

    set_threads(args.threads)
    lm = load_model(args.model)
    shipped = load_sae(lm, args.sae, args.layer, args.model)[0]
    rows = []
    for length in args.lengths:
        ids, mask = text_batch(lm.tokenizer, 1, length)
        rows.append({"axis": "length", **point(lm, shipped, ids, mask, args.layer, args.repeats)})
    ids, mask = text_batch(lm.tokenizer, args.batch, args.seq)
    for width in args.widths:
        sae = wide_sae(lm.d_model, args.layer, width) if width else shipped
        rows.append({"axis": "width", **point(lm, sae, ids, mask, args.layer, args.repeats)})
        del sae
        gc.collect()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| axis | tokens | d_sae | gradsae s | plain s | ratio | gradsae ms/token | gradsae peak MiB "
        "| plain peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['axis']} | {r['tokens']} | {r['d_sae']} | {r['gradsae_s']:.3f} | {r['plain_s']:.3f} | "
            f"{r['gradsae_s'] / r['plain_s']:.2f} | {1000 * r['gradsae_s'] / r['tokens']:.2f} | "
            f"{r['gradsae_peak_mib']:.0f} | {r['plain_peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def scaling_figures(root: Path, *, repeats: int, quick: bool, **kwargs: Any) -> list[Figure]:
    """Run the child, print the table, and summarise each axis as a figure (the worst ratio)."""
    lengths = LENGTHS[:2] if quick else LENGTHS
    widths = WIDTHS[:2] if quick else WIDTHS
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--repeats", str(repeats)]
    cmd += ["--lengths", ",".join(map(str, lengths)), "--widths", ",".join(map(str, widths))]
    for key, value in kwargs.items():
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(cmd, cwd=root, env={**os.environ, **FIXED_MMAP}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [
            Figure(name, None, detail=f"scaling child failed: {reason}") for name in ("scaling_length", "scaling_width")
        ]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    print(table(rows), flush=True)
    return [_axis_figure(rows, "length"), _axis_figure(rows, "width"), *long_prompt_figures(rows)]


def long_prompt_figures(rows: list[dict[str, Any]]) -> list[Figure]:
    """``long_prompt_time`` and ``long_prompt_memory``: GradSAE / plain fwd+bwd on the longest prompt of the table."""
    longest = max((r for r in rows if r["axis"] == "length"), key=lambda r: r["tokens"])
    tokens, shape = longest["tokens"], f"one prompt of {longest['tokens']} tokens, d_sae={longest['d_sae']}"
    time_figure = Figure(
        "long_prompt_time",
        longest["gradsae_s"] / longest["plain_s"],
        target=LONG_TIME_TARGET,
        floor=f"plain fwd+bwd of the same {tokens}-token prompt: {longest['plain_s']:.1f} s",
        detail=f"gradsae {longest['gradsae_s']:.1f} s; {shape}; one run each",
        extra={"row": longest},
    )
    memory_figure = Figure(
        "long_prompt_memory",
        longest["gradsae_peak_mib"] / max(longest["plain_peak_mib"], 1e-9),
        target=LONG_MEMORY_TARGET,
        floor=f"plain fwd+bwd peak above the loaded baseline: {longest['plain_peak_mib']:.0f} MiB",
        detail=f"gradsae +{longest['gradsae_peak_mib']:.0f} MiB; {shape}; fixed mmap threshold",
        extra={"row": longest},
    )
    return [time_figure, memory_figure]


def _axis_figure(rows: list[dict[str, Any]], axis: str) -> Figure:
    part = [r for r in rows if r["axis"] == axis]
    ratios = [r["gradsae_s"] / r["plain_s"] for r in part]
    memory = [r["gradsae_peak_mib"] / max(r["plain_peak_mib"], 1e-9) for r in part]
    first, last = part[0], part[-1]
    per_token = (last["gradsae_s"] / last["tokens"]) / (first["gradsae_s"] / first["tokens"])
    plain_per_token = (last["plain_s"] / last["tokens"]) / (first["plain_s"] / first["tokens"])
    if axis == "length":
        detail = (
            f"worst gradsae / plain time over {first['tokens']}..{last['tokens']} tokens; time per token "
            f"x{per_token:.2f} from the shortest to the longest (plain x{plain_per_token:.2f}); "
            f"peak memory ratios {[round(m, 2) for m in memory]}"
        )
    else:
        detail = (
            f"worst gradsae / plain time over d_sae {first['d_sae']}..{last['d_sae']} at {first['tokens']} tokens: "
            f"ratios {[round(r, 2) for r in ratios]}; gradsae time x{last['gradsae_s'] / first['gradsae_s']:.2f} "
            f"(plain x{last['plain_s'] / first['plain_s']:.2f}); peak memory ratios {[round(m, 2) for m in memory]}"
        )
    return Figure(f"scaling_{axis}", max(ratios), target=TARGET, detail=detail, extra={"rows": part})


def main() -> None:
    parser = child_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lengths", type=lambda t: [int(x) for x in t.split(",")], default=list(LENGTHS))
    parser.add_argument("--widths", type=lambda t: [int(x) for x in t.split(",")], default=list(WIDTHS))
    print(json.dumps(child(parser.parse_args())))


if __name__ == "__main__":
    main()
