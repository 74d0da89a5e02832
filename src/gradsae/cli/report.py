"""``gradsae report RUN_DIR``: re-render ``table.md``, ``summary.md`` and the plots from ``results.json`` alone.

On a finished ``gradsae sweep`` folder (task sub-folders with ``results.json``) it re-renders every task's
pages, then ``sweep.md``, ``summary.md`` and ``estimators.md`` (the command line as ``sweep.md`` recorded it,
paths relative; ``--bench benchmarks/results.json`` adds the estimators' measured costs).

``--html`` also writes ``report.html``: one self-contained page (overview, examples
coloured by influence or activation, latents with their feature cards) from the
folder's ``results.json``, ``examples.json`` and ``cards_layer{l}.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradsae import _files
from gradsae.cli import validate
from gradsae.errors import GradSAEError
from gradsae.experiments.results import RESULTS, RunResults
from gradsae.report.estimators import write_estimators
from gradsae.report.html import write_run_page
from gradsae.report.sweep import load_runs, recorded_command, recorded_origin, sweep_tasks, write_sweep
from gradsae.report.tables import render


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gradsae report``."""
    parser.add_argument("run_dir", help="a folder written by `gradsae reproduce` (it holds results.json)")
    parser.add_argument("--html", action="store_true", help="also write RUN_DIR/report.html, one self-contained page")
    parser.add_argument(
        "--bench",
        default=None,
        help="a sweep folder only: a benchmarks/results.json whose ig_cost / relp_cost go into estimators.md",
    )


def run(args: argparse.Namespace) -> int:
    """Read ``results.json``, write ``table.md`` and the PNG plots next to it."""
    folder = Path(args.run_dir)
    if args.bench and not Path(args.bench).is_file():
        raise GradSAEError(f"--bench {args.bench} does not exist: pass a benchmarks/results.json or leave --bench out")
    if not (folder / RESULTS).is_file() and sweep_tasks(folder):
        return _sweep(folder, args)
    if not (folder / RESULTS).is_file():
        raise GradSAEError(
            f"{folder / RESULTS} does not exist: pass a folder written by `gradsae reproduce` or `gradsae sweep`"
        )
    try:
        results = RunResults.load(folder)
    except (ValueError, KeyError, TypeError) as exc:
        raise GradSAEError(
            f"{folder / RESULTS} is not a gradsae results file ({exc}): rerun `gradsae reproduce`"
        ) from None
    validate.out_folder(folder, option="RUN_DIR")
    paths = render(folder, results)
    if args.html:
        paths.append(write_run_page(folder, results, images=[p for p in paths if p.suffix == ".png"]))
    sys.stdout.write(f"wrote {', '.join(p.name for p in paths)} in {folder}\n")
    return 0


def _sweep(folder: Path, args: argparse.Namespace) -> int:
    """A finished sweep: each task's pages, then ``sweep.md`` and ``summary.md``, all from the stored files."""
    validate.out_folder(folder, option="RUN_DIR")
    tasks = sweep_tasks(folder)
    for task in tasks:
        try:
            results = RunResults.load(folder / task)
        except (ValueError, KeyError, TypeError) as exc:
            raise GradSAEError(
                f"{folder / task / RESULTS} is not a gradsae results file ({exc}): rerun the sweep"
            ) from None
        paths = render(folder / task, results)
        if args.html:
            write_run_page(folder / task, results, images=[p for p in paths if p.suffix == ".png"])
    origin = recorded_origin(folder) or str(folder.resolve())
    runs = load_runs(folder, tasks)
    path = write_sweep(folder, runs, command=recorded_command(folder), origin=origin)
    bench = _files.read_json(Path(args.bench)) if args.bench else None
    write_estimators(folder, runs, command=recorded_command(folder), bench=bench)
    sys.stdout.write(f"wrote the pages of {', '.join(tasks)}, {path.name}, summary.md and estimators.md in {folder}\n")
    return 0


def interrupted(args: argparse.Namespace) -> str:
    """Each file is replaced whole or not at all; results.json is only read."""
    return f"{Path(args.run_dir) / RESULTS} is untouched and each file written is whole; run the command again"
