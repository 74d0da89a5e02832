"""``gradsae sweep``: ``gradsae reproduce`` over tasks x layers, and one consolidated ``sweep.md``.

Each task runs as ``gradsae reproduce --task T --layers ... --out OUT/T`` would
(:func:`gradsae.experiments.run.run_task`, same defaults, same journal: an interrupted
sweep continues where it stopped, a finished task is read back, not rerun), then
:mod:`gradsae.report.sweep` writes ``OUT/sweep.md`` from the runs'
``results.json`` and ``timing.json``. Every task's arguments are checked, and
every task loaded, before the first model forward.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from gradsae import _files
from gradsae.cli import options, reproduce
from gradsae.errors import GradSAEError
from gradsae.experiments.run import run_task
from gradsae.report.estimators import write_estimators
from gradsae.report.sweep import load_runs, write_sweep
from gradsae.report.tables import render

TASKS = "sst2,facts,capitals,past_tense"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gradsae sweep``."""
    parser.add_argument("--tasks", default=TASKS, help=f"comma-separated task names or files (default: {TASKS})")
    options.layers(parser, default="6,15,24", help="comma-separated layers (default: 6,15,24)")
    options.ks(parser, default="10,50%")
    options.n(parser, default=32, help="examples drawn per task before keeping the correct ones")
    options.out(parser, required=True, help="output folder: one sub-folder per task, and sweep.md")
    options.seed(parser)
    options.model(parser)
    options.sae(parser, help="SAE folder with {layer} in it (default: shipped)")
    options.device(parser)
    options.mode(parser)
    options.batch_size(parser)
    options.max_new_tokens(parser, help="generation limit (default: each task's)")
    options.paper(parser)
    parser.add_argument("--no-curves", action="store_true", help="skip the faithfulness curves (exact ablation)")
    options.curves_n(parser, default=8)
    options.methods(parser, default=None)
    parser.add_argument(
        "--activation-controls",
        action="store_true",
        help="add reproduce's two activation controls (answer position only; sink-excluded) to every task",
    )
    options.ig_steps(parser)
    options.restart(parser, help="discard earlier runs in OUT/<task> and start fresh")


def run(args: argparse.Namespace) -> int:
    """Check every task and load it, then run each (resuming), then write ``sweep.md``."""
    tasks = parse_tasks(args.tasks)
    curves = {"curves": not args.no_curves, "curves_n": None if args.no_curves else args.curves_n}
    specs = [reproduce.task_run(args, task=task, out=Path(args.out) / Path(task).stem, **curves) for task in tasks]
    for task, spec in zip(tasks, specs, strict=True):
        sys.stdout.write(f"sweep: task {task} -> {spec.out}\n")
        run_task(spec, render=render)
    command = _files.relative_paths(command_line(args), args.out)  # no directory of this machine in the page
    swept = load_runs(args.out, [Path(t).stem for t in tasks])
    path = write_sweep(args.out, swept, command=command, origin=str(Path(args.out).resolve()))
    write_estimators(args.out, swept, command=command)
    sys.stdout.write(f"wrote {path}\n")
    return 0


def parse_tasks(text: str) -> list[str]:
    """``"sst2,facts"`` -> ``["sst2", "facts"]``, each once."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    stems = {Path(t).stem for t in tasks}
    if not tasks or len(stems) < len(tasks):
        raise GradSAEError(f"--tasks {text!r}: name each task once (files by distinct names), e.g. --tasks {TASKS}")
    return tasks


def command_line(args: argparse.Namespace) -> str:
    """The command as a person would type it (for the table's header)."""
    parts = ["gradsae", "sweep", "--tasks", args.tasks, "--layers", args.layers, "--ks", args.ks, "--n", str(args.n)]
    parts += [] if args.no_curves else ["--curves-n", str(args.curves_n)]
    parts += ["--out", str(args.out)]
    named = ("model", "sae", "mode", "methods", "ig_steps")
    parts += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in named if getattr(args, k)]
    flags = {"--paper": args.paper, "--no-curves": args.no_curves, "--activation-controls": args.activation_controls}
    parts += [flag for flag, on in flags.items() if on]
    return shlex.join(parts)


def interrupted(args: argparse.Namespace) -> str:
    """Each task's journal keeps its finished units."""
    return (
        f"finished units of each task are saved under {args.out}/<task>/journal; "
        "run the same command again to continue from there"
    )
