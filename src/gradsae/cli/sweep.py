"""``gradsae sweep``: ``gradsae reproduce`` over tasks x layers, and one consolidated ``sweep.md``.

Each task runs as ``gradsae reproduce --task T --layers ... --out OUT/T`` (same
defaults, same journal: an interrupted sweep continues where it stopped, a
finished task is read back, not rerun), then
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
from gradsae.cli import reproduce
from gradsae.errors import GradSAEError
from gradsae.report.sweep import load_runs, write_sweep
from gradsae.splice import MODES
from gradsae.tasks import load_task

TASKS = "sst2,facts,capitals,past_tense"
PASSED = (
    "model",
    "sae",
    "device",
    "seed",
    "n",
    "layers",
    "ks",
    "mode",
    "batch_size",
    "max_new_tokens",
    "curves_n",
    "methods",
    "ig_steps",
)
"""Options handed to each task's ``reproduce`` unchanged (flags are handled apart)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gradsae sweep``."""
    parser.add_argument("--tasks", default=TASKS, help=f"comma-separated task names or files (default: {TASKS})")
    parser.add_argument("--layers", default="6,15,24", help="comma-separated layers (default: 6,15,24)")
    parser.add_argument("--ks", default="10,50%", help="values of K (default: 10,50%%)")
    parser.add_argument("--n", type=int, default=32, help="examples drawn per task before keeping the correct ones")
    parser.add_argument("--out", required=True, help="output folder: one sub-folder per task, and sweep.md")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling, donors, random ranking, bootstrap")
    parser.add_argument("--model", default=None, help="HF model folder or id, or a .gguf file (default: embedded)")
    parser.add_argument("--sae", default=None, help="SAE folder with {layer} in it (default: shipped)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--mode", default=None, choices=MODES, help="splice mode (default: error)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per forward batch")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation limit (default: each task's)")
    parser.add_argument("--paper", action="store_true", help="the paper-exact preset of `gradsae reproduce`")
    parser.add_argument("--no-curves", action="store_true", help="skip the faithfulness curves (exact ablation)")
    parser.add_argument(
        "--curves-n", type=int, default=8, help="curves on the first N kept examples of each task and layer (default 8)"
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="ranking methods of each run, e.g. gradsae,activation,random,ig,relp (default: reproduce's); "
        "each gets its rows in the faithfulness table",
    )
    parser.add_argument("--ig-steps", type=int, default=None, help="integrated-gradients steps (method ig)")
    parser.add_argument("--restart", action="store_true", help="discard earlier runs in OUT/<task> and start fresh")


def run(args: argparse.Namespace) -> int:
    """Check every task, run each (resuming), then write ``sweep.md``."""
    tasks = parse_tasks(args.tasks)
    runs = [task_arguments(args, task) for task in tasks]
    for one in runs:
        reproduce.check_arguments(one)
        load_task(one.task, n=one.n, seed=one.seed, max_new_tokens=one.max_new_tokens)
    for one in runs:
        sys.stdout.write(f"sweep: task {one.task} -> {one.out}\n")
        reproduce.run(one)
    command = _files.relative_paths(command_line(args), args.out)  # no directory of this machine in the page
    swept = load_runs(args.out, [Path(t).stem for t in tasks])
    path = write_sweep(args.out, swept, command=command, origin=str(Path(args.out).resolve()))
    sys.stdout.write(f"wrote {path}\n")
    return 0


def parse_tasks(text: str) -> list[str]:
    """``"sst2,facts"`` -> ``["sst2", "facts"]``, each once."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    stems = {Path(t).stem for t in tasks}
    if not tasks or len(stems) < len(tasks):
        raise GradSAEError(f"--tasks {text!r}: name each task once (files by distinct names), e.g. --tasks {TASKS}")
    return tasks


def task_arguments(args: argparse.Namespace, task: str) -> argparse.Namespace:
    """The ``reproduce`` arguments of one task: its parser's defaults, the sweep's options, ``OUT/<name>``."""
    from gradsae.cli import OneLineParser

    argv = ["--task", task, "--out", str(Path(args.out) / Path(task).stem)]
    for name in PASSED:
        value = None if name == "curves_n" and args.no_curves else getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    argv += [flag for flag, on in (("--paper", args.paper), ("--restart", args.restart)) if on]
    argv += [] if args.no_curves else ["--curves"]
    parser = OneLineParser(prog="gradsae sweep")
    reproduce.add_arguments(parser)
    return parser.parse_args(argv)


def command_line(args: argparse.Namespace) -> str:
    """The command as a person would type it (for the table's header)."""
    parts = ["gradsae", "sweep", "--tasks", args.tasks, "--layers", args.layers, "--ks", args.ks, "--n", str(args.n)]
    parts += [] if args.no_curves else ["--curves-n", str(args.curves_n)]
    parts += ["--out", str(args.out)]
    named = ("model", "sae", "mode", "methods", "ig_steps")
    parts += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in named if getattr(args, k)]
    parts += [f for f, on in (("--paper", args.paper), ("--no-curves", args.no_curves)) if on]
    return shlex.join(parts)


def interrupted(args: argparse.Namespace) -> str:
    """Each task's journal keeps its finished units."""
    return (
        f"finished units of each task are saved under {args.out}/<task>/journal; "
        "run the same command again to continue from there"
    )
