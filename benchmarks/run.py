"""Benchmark of ``gradsae`` (issues 5, 13 and 21): every figure measured side by side, in one run, on the same inputs.

Every figure is printed as ``name: value | floor: ... | target: ... | met: ...``: the
floor is what the value is measured against, timed in the same run (a ratio's
denominator). The same table goes to ``--out`` with ``.md`` (``benchmarks/results.md``).

* ``score_overhead_vs_floor`` (``_131k``, ``_1m``): GradSAE scoring / its floor, the
  plain model's forward + backward to the SAE layer plus the SAE's dense encode (every
  pre-activation and TopK, :func:`benchmarks.core.dense_encode`) timed alone on the same
  batch's residuals. Target <= 1.10. Beside it ``score_overhead`` (vs the plain forward +
  backward alone; target 1.15 for the shipped SAE only: a wide SAE's encoder costs more
  than SmolLM2 itself) and the random TopK SAEs of 131,072 and 1,048,576 latents.
* ``speedup_vs_reference``: the authors' pipeline (uncached greedy decoding with
  the SAE spliced, dense latent gradient at the last step) / ours (cached
  decoding under a grad splice and one backward through the decode's own passes),
  32 new tokens; ``reference_check`` says whether both gave the same tokens and
  scores. Target >= 10.
* ``answer_overhead_vs_floor``: ours (``generate_and_score``) / the plain model's own
  cached decode of the same tokens with the graph kept and one backward
  (:func:`benchmarks.reference.plain_decode_with_graph`). Target <= 1.15.
* ``speedup_vs_ablation``: exact ablation of every active latent / GradSAE, with
  ``spearman_vs_ablation`` (first-order estimate vs exact effect). Target >= 50.
* ``peak_memory_overhead_shipped`` / ``_131k`` / ``_1m``: peak working memory of
  scoring / of the plain forward + backward, each in a fresh process. Target <= 1.2.
* ``oracle_cost``: one exact single-latent ablation (the curves' oracle) / one plain
  forward of the same prompt (facts prompts; :mod:`benchmarks.oracle`). Target <= 0.5.
* ``perturb_condition_cost``: experiment 1's conditions decoded as one batch
  (examples x conditions, each row stopped once its answer is final), per
  condition / one plain forward of the same prompts. Target <= (L - l) / L + 0.1.
  ``_single``: one condition decoded alone, as before.
* ``scaling_length`` / ``scaling_width``: the scaling table (time and peak memory
  of scoring and of the plain forward + backward against 64..8192 tokens and
  4.6k..1M latents), summarised by the worst time ratio on each axis.
* ``long_prompt_time`` / ``long_prompt_memory``: the table's 8192-token row (SmolLM2's
  context): GradSAE / the plain forward + backward of the same prompt. Targets 1.15 / 1.3.
* ``plan_error_time`` / ``plan_error_memory``: ``--plan``'s costs fitted without the
  longest prompts predict them (:mod:`benchmarks.planning`); relative error, target 0.25.
  The fit to every row is written to ``src/gradsae/costs.json`` (what ``--plan`` reads).
  ``plan_error_reproduce`` (with ``--demo``): ``reproduce --plan`` against the demo.
* ``demo_wall_s``: wall time of ``gradsae reproduce --task sst2`` (``--demo``
  runs it; otherwise it is read from ``runs/demo/timing.json``).
* ``speedup_vs_nnsight`` / ``_131k``: the same scoring written with nnsight
  (dense latent gradient) / ours, with the benchmark's SAE and a 131k-latent one.
* ``multilayer_cost``, ``ig_cost``, ``relp_cost``: :mod:`benchmarks.estimators` (issue 23).
* ``dp_efficiency``: ``gradsae score --prompts`` under ``torchrun --nproc_per_node 2``
  (one thread per rank) against one process with one thread, the same JSON required:
  ``t(one) / (2 t(two))``. Target >= 0.8.

Times are medians of ``--repeats`` runs after a warm-up (the slow baselines:
``--slow-repeats`` runs, no warm-up). Everything goes to ``--out`` as JSON, with
the machine's CPU, cores, threads and library versions.

    python benchmarks/run.py [--model M] [--sae DIR] [--layer 6] [--batch 8] [--seq 64]
                             [--repeats 5] [--out benchmarks/results.json] [--quick] [--demo]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks import core  # noqa: E402
from benchmarks.common import (  # noqa: E402
    SHORT_PROMPTS,
    WIDE,
    WIDEST,
    Figure,
    load_sae,
    machine_info,
    set_threads,
    text_batch,
    wide_sae,
)
from benchmarks.dp import N_PROMPTS, dp_efficiency  # noqa: E402
from benchmarks.estimators import estimator_costs, multilayer_cost, shipped_saes  # noqa: E402
from benchmarks.memory import peak_memory_overhead  # noqa: E402
from benchmarks.oracle import facts_prompts, oracle_cost  # noqa: E402
from benchmarks.planning import plan_figures, reproduce_plan_figure  # noqa: E402
from benchmarks.scaling import scaling_figures  # noqa: E402
from benchmarks.table import markdown  # noqa: E402
from benchmarks.with_nnsight import speedup_vs_nnsight  # noqa: E402
from gradsae.generate import encode_prompts  # noqa: E402
from gradsae.models import LoadedModel, load_model  # noqa: E402
from gradsae.sae import SAE  # noqa: E402

QUICK = {
    "batch": 2,
    "seq": 32,
    "repeats": 2,
    "slow_repeats": 1,
    "new_tokens": 8,
    "gen_batch": 2,
    "short_prompts": 1,
    "dp_prompts": 4,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark gradsae (issue 5).")
    parser.add_argument("--model", default=None, help="model folder, hub id or .gguf (default: the embedded one)")
    parser.add_argument("--sae", default=None, help="SAE folder (default: the shipped SAE for --layer)")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="rows of the timing batch")
    parser.add_argument("--seq", type=int, default=64, help="tokens per row of the timing batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--slow-repeats", type=int, default=2, help="timed runs of the slow baselines")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens in speedup_vs_reference")
    parser.add_argument(
        "--gen-batch", type=int, default=None, help="prompts in speedup_vs_reference (default: --batch)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the available cores)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    parser.add_argument("--quick", action="store_true", help=f"small sizes for a smoke run: {QUICK}")
    parser.add_argument("--demo", action="store_true", help="also time `gradsae reproduce --task sst2` (minutes)")
    parser.add_argument(
        "--skip",
        default="",
        help="groups to leave out: score,score131k,score1m,reference,ablation,oracle,perturb,memory,scaling,demo,"
        "nnsight,multilayer,estimators,dp",
    )
    parser.add_argument("--dp-prompts", type=int, default=N_PROMPTS, help="prompts in the dp_efficiency file")
    parser.set_defaults(short_prompts=len(SHORT_PROMPTS))
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def perturb_figures(args: argparse.Namespace, lm: LoadedModel, sae: SAE) -> list[Figure]:
    """Experiment 1's condition cost on ``--batch`` SST-2 prompts (its default task)."""
    from gradsae.errors import GradSAEError
    from gradsae.tasks import load_task

    try:
        task = load_task("sst2", n=args.batch, seed=0)
    except GradSAEError as exc:
        return [Figure("perturb_condition_cost", None, detail=f"no SST-2 prompts: {exc}")]
    return core.perturb_condition_cost(lm, sae, task, args.layer, repeats=args.repeats)


def jobs(args: argparse.Namespace, lm: LoadedModel, sae: SAE, label: str) -> dict[str, Callable[[], Any]]:
    """Each figure group (a name for ``--skip``) and how to measure it."""
    ids, mask = text_batch(lm.tokenizer, args.batch, args.seq)
    rows = args.gen_batch or args.batch
    short_ids, short_mask = encode_prompts(lm.tokenizer, list(SHORT_PROMPTS[: args.short_prompts]))
    timing = {"repeats": args.repeats, "slow_repeats": args.slow_repeats}
    child = {"model": args.model, "sae": args.sae, "layer": args.layer, "batch": args.batch, "seq": args.seq}
    child["threads"] = args.threads
    return {
        "score": lambda: core.score_overhead(lm, sae, ids, mask, args.layer, args.repeats),
        "score131k": lambda: core.score_overhead(
            lm, wide_sae(lm.d_model, args.layer), ids, mask, args.layer, args.repeats, name="score_overhead_131k"
        ),
        "score1m": lambda: core.score_overhead(
            lm,
            wide_sae(lm.d_model, args.layer, WIDEST),
            ids,
            mask,
            args.layer,
            args.repeats,
            name="score_overhead_1m",
        ),
        "reference": lambda: core.speedup_vs_reference(
            lm, sae, ids[:rows], mask[:rows], args.layer, n_new=args.new_tokens, **timing
        ),
        "ablation": lambda: core.speedup_vs_ablation(lm, sae, short_ids, short_mask, args.layer, **timing),
        "oracle": lambda: oracle_cost(lm, sae, facts_prompts(lm, args.short_prompts), args.layer, **timing),
        "perturb": lambda: perturb_figures(args, lm, sae),
        "memory": lambda: [peak_memory_overhead(ROOT, d_sae=d, label=label, **child) for d in (0, WIDE, WIDEST)],
        "scaling": lambda: scaling_figures(ROOT, repeats=min(args.repeats, 2), quick=args.quick, **child),
        "demo": lambda: core.demo_wall(args.demo, ROOT),
        "nnsight": lambda: [speedup_vs_nnsight(ROOT, wide=w, repeats=args.repeats, **child) for w in (False, True)],
        "multilayer": lambda: multilayer_cost(lm, shipped_saes(lm, args.model), ids, mask, args.repeats),
        "estimators": lambda: estimator_costs(lm, sae, ids, mask, args.layer, args.repeats),
        "dp": lambda: dp_efficiency(
            ROOT, model=args.model, layer=args.layer, repeats=args.slow_repeats, n_prompts=args.dp_prompts
        ),
    }


def plan_check(
    args: argparse.Namespace, lm: LoadedModel, sae: SAE, figures: dict[str, Figure], load_s: float
) -> list[Figure]:
    """``plan_error_*`` from the scaling table's rows; the costs behind ``--plan`` written (not in ``--quick``)."""
    rows = figures["scaling_length"].extra["rows"] + figures.get("scaling_width", Figure("", None)).extra.get(
        "rows", []
    )
    meta = {
        "model": lm.name,
        "device": lm.device.type,
        "threads": args.threads,
        "cpu": machine_info()["cpu"],
        "n_layers": lm.n_layers,
        "layer": args.layer,
        "d_in": lm.d_model,
        "load_s": round(load_s, 2),
        "shipped_d_sae": sae.cfg.d_sae,
    }
    out = plan_figures(rows, root=ROOT, write=not args.quick and args.sae is None, **meta)
    demo = figures.get("demo_wall_s")
    if demo is not None and demo.value is not None and "measured now" in demo.detail:
        out.append(reproduce_plan_figure(ROOT, demo, rows, **meta))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.threads = set_threads(args.threads)
    began, load = time.perf_counter(), os.getloadavg()
    lm = load_model(args.model)
    sae, label = load_sae(lm, args.sae, args.layer, args.model)
    load_s = time.perf_counter() - began
    print(f"model: {lm.name} ({lm.n_layers} layers); SAE: {label} (d_sae={sae.cfg.d_sae}, {sae.cfg.activation})")
    print(f"layer {args.layer}, batch {args.batch} x {args.seq} tokens, {args.threads} torch threads")
    figures: dict[str, Figure] = {}

    def emit(figure: Figure) -> None:
        figures[figure.name] = figure
        print(figure.line(), flush=True)

    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    for name, job in jobs(args, lm, sae, label).items():
        if name not in skip:
            result = job()
            for figure in result if isinstance(result, list) else [result]:
                emit(figure)
    if "scaling_length" in figures and figures["scaling_length"].value is not None:
        for figure in plan_check(args, lm, sae, figures, load_s):
            emit(figure)
    report = {
        "machine": machine_info(),
        "config": {**vars(args), "sae_label": label, "d_sae": sae.cfg.d_sae, "n_layers": lm.n_layers},
        "load_average_at_start": list(load),
        "figures": {name: figure.as_dict() for name, figure in figures.items()},
        "total_s": round(time.perf_counter() - began, 1),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = json.loads(out.read_text())
    out.with_suffix(".md").write_text(markdown(table))
    print(markdown(table))
    print(f"wrote {out} and {out.with_suffix('.md')} in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
