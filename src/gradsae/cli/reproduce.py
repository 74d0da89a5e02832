"""``gradsae reproduce``: both experiments of the paper, at one or more layers, to a folder.

Writes to ``--out``: ``results.json`` (every number, the config, the seed, the
versions; identical for a rerun with the same seed), ``table.md`` (the
paper-style tables), ``exp1_layer{l}.png`` and ``exp2_layer{l}.png``, and
``timing.json`` (wall times: per layer, this invocation's ``session_s`` and ``total_s`` summed over
the completed invocations into the folder; kept apart so ``results.json`` is reproducible), and
``examples.json`` (per kept example: tokens, TopK sets, per-token activation and
influence, answers under masking; read by ``gradsae report --html`` and ``gradsae cards``).
Every file is written to a temporary name and renamed, ``results.json`` last, so
an interrupted run never leaves a half-written result.

Every argument, input file and the output folder are checked before the model
loads. While it runs, the command holds ``<out>/.lock`` (a second run into the
same folder is refused) and commits each finished unit (a layer, a masking or
steering condition) to ``<out>/journal/`` (:mod:`gradsae.experiments.journal`):
after Ctrl-C or ``kill -9`` the same command skips what is done and ends with
the same ``results.json`` as an uninterrupted run. A different configuration
into the same folder is refused; ``--restart`` discards the old run.

This module parses; :func:`gradsae.experiments.run.run_task` does the run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from gradsae import distributed
from gradsae.cli import options, validate
from gradsae.cli.common import parse_layers
from gradsae.cli.plan import add_plan_argument, reproduce_plan
from gradsae.errors import GradSAEError
from gradsae.experiments import run as experiment
from gradsae.experiments.config import ExperimentConfig, field_default
from gradsae.experiments.controls import CONTROLS
from gradsae.experiments.journal import FOLDER, count_units
from gradsae.experiments.results import RunResults
from gradsae.experiments.run import TaskRun, run_task
from gradsae.pretrained import resolve_saes
from gradsae.report.tables import render
from gradsae.tasks import load_task

MODE_NOTE = (
    "On SmolLM2 replace drops SST-2 accuracy to ~25% and the kept examples may all share one label, "
    "leaving experiment 2 without donors."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gradsae reproduce``."""
    options.model_arguments(parser)
    parser.add_argument(
        "--task",
        default="sst2",
        help="sst2, news, squad (with --squad FILE), capitals, plural, past_tense, facts, "
        "or a .jsonl/.csv file with prompt/answer columns",
    )
    options.out(parser, required=True, help="output folder")
    options.n(
        parser,
        default=48,
        aliases=("--examples",),
        help="examples to draw before keeping the correct ones (under torchrun write --examples: torchrun "
        "takes --n for one of its own options)",
    )
    options.seed(parser)
    options.layers(
        parser, default=None, help="comma-separated layers for a sweep, e.g. 6,15,24 (default: --layer, else 6)"
    )
    options.paper(parser)
    options.mode(parser, after=MODE_NOTE)
    parser.add_argument(
        "--ablation", action="store_true", help="add the exact-ablation ranking (one forward per active latent: slow)"
    )
    parser.add_argument(
        "--activation-controls",
        action="store_true",
        help="add two activation rankings as controls: at the answer position only, and over the positions whose "
        "residual norm is below 10x the median (sink-excluded)",
    )
    options.methods(parser, default=options.DEFAULT_METHODS)
    options.ig_steps(parser, default=field_default("ig_steps"))
    options.ks(parser, default="1,10,20,30,50%")
    options.steer_positions(parser)
    options.donor_value(parser)
    options.splice_first(parser)
    options.keep_f1(parser)
    options.no_floors(parser)
    options.batch_size(parser)
    parser.add_argument("--squad", default=None, help="SQuAD v1.1 JSON file for --task squad")
    parser.add_argument("--prompt-column", default="prompt", help="prompt column of a user task file")
    parser.add_argument("--answer-column", default="answer", help="answer column of a user task file")
    options.max_new_tokens(parser)
    options.restart(parser, help="discard an earlier run's journal and results in --out and start fresh")
    parser.add_argument(
        "--metric", default=None, choices=["accuracy", "squad"], help="user file: labels or QA (default squad)"
    )
    options.prompt_format(parser, help="chat template or plain text (default: task's)")
    options.curves(parser)
    options.curves_n(parser)
    add_plan_argument(parser, pilot=True)


def run(args: argparse.Namespace) -> int:
    """Check everything, run (resuming from the journal), then write the folder; print where it went."""
    start = time.perf_counter()
    spec = task_run(args, task=args.task, out=args.out)
    if getattr(args, "plan", False):  # every rank: the pilot's decodes and ranking are sharded as the run's
        plan = reproduce_plan(args, spec.task, spec.config, lambda lm: resolve_saes(lm, spec.sae, spec.layers))
        if distributed.is_main():
            sys.stdout.write(plan)
        return 0
    _, timing = run_task(spec, render=render, started=start)
    if distributed.is_main():
        print(f"wrote {args.out}/results.json, table.md and plots in {timing['session_s']:.0f} s")  # noqa: T201
    return 0


def task_run(args: argparse.Namespace, *, task: str, out: str | Path, **fixed: Any) -> TaskRun:
    """Check the options (before any model loads), load ``task``: the run into ``out`` that they describe.

    ``args`` is ``reproduce``'s or ``sweep``'s namespace (an option the command lacks takes its default);
    ``fixed`` sets :class:`ExperimentConfig` fields outright.
    """
    cfg = config_of(args, **fixed)
    layers = layers_to_run(args.layers, getattr(args, "layer", None))
    check_arguments(args, cfg, layers, out)
    loaded = load_task(
        task,
        n=args.n,
        seed=args.seed,
        squad_path=getattr(args, "squad", None),
        prompt_column=getattr(args, "prompt_column", "prompt"),
        answer_column=getattr(args, "answer_column", "answer"),
        max_new_tokens=args.max_new_tokens,
        metric=getattr(args, "metric", None),
        prompt_format=getattr(args, "prompt_format", None),
    )
    return TaskRun(
        task=loaded,
        out=Path(out),
        config=cfg,
        layers=tuple(layers),
        model=args.model,
        sae=args.sae,
        device=args.device,
        device_map=getattr(args, "device_map", None),
        paper=bool(args.paper),
        restart=bool(args.restart),
    )


def config_of(args: argparse.Namespace, **fixed: Any) -> ExperimentConfig:
    """The options' :class:`ExperimentConfig`, with ``--ablation`` and ``--activation-controls`` in its methods."""
    ablation, controls = getattr(args, "ablation", False), getattr(args, "activation_controls", False)
    if ablation or controls:
        methods = options.parse_methods(args.methods or options.DEFAULT_METHODS)
        methods += (("ablation",) if ablation else ()) + (CONTROLS if controls else ())
        fixed = {"methods": methods, **fixed}
    return options.experiment_config(args, **fixed)


def check_arguments(args: argparse.Namespace, cfg: ExperimentConfig, layers: list[int | None], out: str | Path) -> None:
    """Refuse any bad argument, input path or output folder before a model loads."""
    if cfg.keep_f1 is not None and not 0.0 < cfg.keep_f1 <= 1.0:
        raise GradSAEError(f"--keep-f1 {cfg.keep_f1}: use an F1 threshold in (0, 1], e.g. 0.9")
    validate.at_least("--n", args.n, 1)
    validate.at_least("--batch-size", cfg.batch_size, 1)
    validate.at_least("--curves-n", cfg.curves_n, 1)
    validate.at_least("--ig-steps", cfg.ig_steps, 1)
    validate.at_least("--max-new-tokens", args.max_new_tokens, 1)
    validate.at_least("--seed", cfg.seed, 0)
    validate.model_and_device(args.model, args.device, getattr(args, "device_map", None))
    validate.layers(layers, args.model, option="--layers" if args.layers else "--layer")
    validate.sae_folders(args.sae, layers)
    validate.out_folder(out)


def layers_to_run(text: str | None, layer: int | None) -> list[int | None]:
    """``--layers`` (a sweep) if given, else the single ``--layer`` (``None``: the SAE's own)."""
    return list(parse_layers(text)) if text else [layer]


def write_outputs(folder: Path, results: RunResults, timing: dict[str, float]) -> None:
    """:func:`gradsae.experiments.run.write_outputs` with this command's tables and plots."""
    experiment.write_outputs(folder, results, timing, render=render)


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves: the journaled units, and how to continue."""
    done = count_units(args.out)
    if not done:
        return "no unit of work had finished, so nothing is saved; run the same command again to start over"
    return (
        f"{done} finished unit(s) (layers, masking and steering conditions) are saved in {Path(args.out) / FOLDER}; "
        "run the same command again to continue from there"
    )
