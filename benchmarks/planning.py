"""The per-token costs behind ``--plan`` (:mod:`gradsae.plan`), fitted to the scaling table, and their check.

``fit_costs`` turns the scaling table's rows into a :class:`gradsae.plan.Costs`: the plain
forward's per-token and per-token-squared time from the length axis (the plain forward +
backward divided by ``1 + B / L``), the encoder's time per token per weight from the widest
SAE of the width axis (GradSAE time beyond the plain one), the working memory per token
(and per token squared) per backward block from GradSAE's peaks on the length axis, and
the loaded process without the SAE from the measured baseline.

``plan_figures`` checks the arithmetic against measurement: costs fitted *without* the
longest prompts (those of :data:`benchmarks.scaling.LONG` tokens or more, else the
longest row) predict those prompts' GradSAE time and peak memory, which the table
measured; ``plan_error_time`` and ``plan_error_memory`` are the worst relative errors
(target 0.25). The costs fitted to every row are written to ``src/gradsae/costs.json``,
which ``gradsae score --plan`` and ``gradsae reproduce --plan`` read.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Figure
from benchmarks.scaling import LONG
from gradsae.plan import COSTS_ENV, Costs, fit_linear_quadratic, model_key, sae_mib, save_costs, score_seconds, work_mib

TARGET = 0.25
COSTS_PATH = Path("src") / "gradsae" / "costs.json"


def fit_costs(rows: list[dict[str, Any]], *, shipped_d_sae: int, **meta: Any) -> Costs:
    """:class:`Costs` from the scaling rows; ``meta``: model, device, threads, cpu, n_layers, layer, d_in, load_s."""
    n_layers, layer, d_in = meta["n_layers"], meta["layer"], meta["d_in"]
    back = n_layers - layer - 1
    length = [r for r in rows if r["axis"] == "length"]
    tokens = [r["tokens"] for r in length]
    a, b = fit_linear_quadratic(tokens, [r["plain_s"] / (1 + back / n_layers) for r in length])
    c, q = fit_linear_quadratic(tokens, [r["gradsae_peak_mib"] / back for r in length])
    width = [r for r in rows if r["axis"] == "width"]
    e = 0.0
    if width:
        widest = max(width, key=lambda r: r["d_sae"])
        e = max(0.0, widest["gradsae_s"] - widest["plain_s"]) / (widest["tokens"] * d_in * widest["d_sae"])
    base = min(r["baseline_mib"] for r in length) - sae_mib(d_in, shipped_d_sae)
    return Costs(
        model=model_key(meta["model"]),
        device=meta["device"],
        threads=meta["threads"],
        n_layers=n_layers,
        layer=layer,
        forward_s_per_token=a,
        forward_s_per_token2=b,
        encode_s_per_token_weight=e,
        work_mib_per_token_layer=c,
        work_mib_per_token2_layer=q,
        base_mib=base,
        load_s=meta["load_s"],
        cpu=meta.get("cpu", ""),
    )


def held_out(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows to fit, length rows to predict): the prompts of ``LONG`` tokens or more, else the longest one."""
    length = [r for r in rows if r["axis"] == "length"]
    test = [r for r in length if r["tokens"] >= LONG] or [max(length, key=lambda r: r["tokens"])]
    return [r for r in rows if r not in test], test


def plan_figures(rows: list[dict[str, Any]], *, root: Path, write: bool, **meta: Any) -> list[Figure]:
    """``plan_error_time`` / ``plan_error_memory`` on the held-out prompts; write the full fit to ``costs.json``."""
    fit_rows, test = held_out(rows)
    costs = fit_costs(fit_rows, **meta)
    layer, d_in, d_sae = meta["layer"], meta["d_in"], meta["shipped_d_sae"]
    time_err, mem_err, shown = [], [], []
    for r in test:
        seconds = score_seconds(costs, r["tokens"], layer=layer, d_in=d_in, d_sae=d_sae)
        peak = costs.base_mib + sae_mib(d_in, d_sae) + work_mib(costs, r["tokens"], layer=layer)
        measured_peak = r["baseline_mib"] + r["gradsae_peak_mib"]
        time_err.append(seconds / r["gradsae_s"] - 1)
        mem_err.append(peak / measured_peak - 1)
        shown.append(
            f"{r['tokens']} tokens: {seconds:.1f} s predicted / {r['gradsae_s']:.1f} s measured, "
            f"{peak:.0f} / {measured_peak:.0f} MiB"
        )
    fitted = sorted({r["tokens"] for r in fit_rows if r["axis"] == "length"})
    where = ""
    if write:
        full = fit_costs(rows, **meta)
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        source = f"benchmarks/run.py (planning.fit_costs on its scaling rows), {when}"
        written = save_costs(full, root / COSTS_PATH, source=source)
        where = f"; the fit to every row written to {written.relative_to(root)}"
    detail = f"costs fitted on {fitted[0]}..{fitted[-1]} tokens predict {'; '.join(shown)}{where}"
    extra = {"costs_held_out_fit": costs.__dict__, "time_errors": time_err, "memory_errors": mem_err}
    return [
        Figure(
            "plan_error_time",
            max(abs(x) for x in time_err),
            target=TARGET,
            floor="the measured GradSAE time of the held-out prompts",
            detail=detail,
            extra=extra,
        ),
        Figure(
            "plan_error_memory",
            max(abs(x) for x in mem_err),
            target=TARGET,
            floor="the measured peak RSS (baseline + GradSAE's peak) of the held-out prompts",
            detail=f"{len(test)} held-out prompt(s); see plan_error_time",
        ),
    ]


PREDICTED = re.compile(r"predicted wall time: ([0-9.]+) s")


def reproduce_plan_figure(root: Path, demo: Figure, rows: list[dict[str, Any]], **meta: Any) -> Figure:
    """``plan_error_reproduce``: ``gradsae reproduce --task sst2 --plan`` (these costs) against the demo timed now."""
    name = "plan_error_reproduce"
    costs = fit_costs(rows, **meta)
    with tempfile.TemporaryDirectory() as tmp:
        stored = save_costs(costs, Path(tmp) / "costs.json", source="this benchmark run")
        env = {**os.environ, COSTS_ENV: str(stored), "PYTHONPATH": str(root / "src")}
        cmd = [sys.executable, "-m", "gradsae", "reproduce", "--task", "sst2", "--out", str(Path(tmp) / "run")]
        done = subprocess.run([*cmd, "--plan"], cwd=root, env=env, capture_output=True, text=True, check=False)
    found = PREDICTED.search(done.stdout)
    if done.returncode != 0 or found is None or demo.value is None:
        why = (done.stderr.strip().splitlines() or ["no plan printed"])[-1] if found is None else "no demo timed"
        return Figure(name, None, target=TARGET, detail=why)
    predicted = float(found.group(1))
    return Figure(
        name,
        abs(predicted / demo.value - 1),
        target=TARGET,
        floor=f"the demo's measured wall time, {demo.value:.0f} s",
        detail=f"`gradsae reproduce --task sst2 --plan` predicts {predicted:.0f} s (the keep filter run as a pilot; "
        "masking costed over whole prompts)",
        extra={"predicted_s": predicted, "measured_s": demo.value},
    )
