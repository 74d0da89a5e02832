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
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from gradsae import _files, distributed
from gradsae.cli import validate
from gradsae.cli.common import add_model_arguments, parse_layers
from gradsae.cli.plan import add_plan_argument, reproduce_plan
from gradsae.errors import GradSAEError
from gradsae.estimators import ESTIMATORS, IG_STEPS
from gradsae.experiments.config import DONOR_VALUES, STEER_POSITIONS, ExperimentConfig, KSpec
from gradsae.experiments.controls import CONTROLS
from gradsae.experiments.journal import FOLDER, Journal, count_units
from gradsae.experiments.rank import objective_description
from gradsae.experiments.record import ExampleRecorder
from gradsae.experiments.results import RESULTS, LayerResult, RunMeta, RunResults
from gradsae.experiments.run import run_layer
from gradsae.models import LoadedModel, load_model, sae_device
from gradsae.pretrained import ResolvedSAE, resolve_saes
from gradsae.report.tables import render
from gradsae.splice import MODES
from gradsae.tasks import Task, check_prompt_lengths, load_task

log = logging.getLogger(__name__)

OUTPUTS = (RESULTS, "table.md", "timing.json", "exp1_layer*.png", "exp2_layer*.png")
"""What a run writes to ``--out`` (``--restart`` removes these and the journal)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gradsae reproduce``."""
    add_model_arguments(parser)
    parser.add_argument(
        "--task",
        default="sst2",
        help="sst2, news, squad (with --squad FILE), capitals, plural, past_tense, facts, "
        "or a .jsonl/.csv file with prompt/answer columns",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--n",
        "--examples",
        dest="n",
        type=int,
        default=48,
        help="examples to draw before keeping the correct ones (under torchrun write --examples: torchrun "
        "takes --n for one of its own options)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling, donors, random ranking, bootstrap")
    parser.add_argument(
        "--layers", default=None, help="comma-separated layers for a sweep, e.g. 6,15,24 (default: --layer, else 6)"
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="the paper-exact preset (each part also a flag; a flag given explicitly wins): "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in PAPER.items())
        + "; see docs/deviations.md",
    )
    parser.add_argument(
        "--mode",
        default=None,
        choices=MODES,
        help="splice mode: error (default: the model stays exact, masked latents lose their decoder share) or "
        "replace (the paper's: the residual becomes the reconstruction; on SmolLM2 it drops SST-2 accuracy to ~25%% "
        "and the kept examples may all share one label, leaving experiment 2 without donors)",
    )
    parser.add_argument(
        "--ablation", action="store_true", help="add the exact-ablation ranking (one forward per active latent: slow)"
    )
    parser.add_argument(
        "--activation-controls",
        action="store_true",
        help="add two activation rankings as controls: at the answer position only, and over the positions whose "
        "residual norm is below 10x the median (sink-excluded)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(RANK_METHODS[:3]),
        help=f"comma list of ranking methods, any of {', '.join(RANK_METHODS)} (ig: integrated gradients; relp: "
        "RelP propagation; see gradsae.estimators); each also gets a faithfulness curve under --curves",
    )
    parser.add_argument("--ig-steps", type=int, default=IG_STEPS, help="integrated-gradients steps (method ig)")
    parser.add_argument(
        "--ks", default="1,10,20,30,50%", help="values of K; 50%% = half the latents active at the last token"
    )
    parser.add_argument(
        "--steer-positions",
        default=None,
        help="comma list of steering edit positions (default: last): last = the authors' final code (each pass "
        "edits only its last position, the KV cache stays unedited); cumulative = each token edited while newest, "
        "kept in the cache; all = every position",
    )
    parser.add_argument(
        "--donor-value",
        default=None,
        choices=list(DONOR_VALUES),
        help="value injected for a donor latent: activation (default: its activation at the donor's last token) "
        "or score (its ranking score, as the authors' code does)",
    )
    parser.add_argument(
        "--splice-first",
        default=None,
        action="store_true",
        help="also splice (and mask) each prompt's first token, as the authors' code does (default: leave the "
        "attention sink unspliced; SAEs trained without position 0 reconstruct it badly)",
    )
    parser.add_argument(
        "--keep-f1",
        type=float,
        default=None,
        help="keep examples whose F1 with the SAE is at least this (the authors' 0.9; default: exact match)",
    )
    parser.add_argument(
        "--no-floors",
        action="store_true",
        help="skip the steering floors (no edit, zero-only, inject-only) that sit next to each swap",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="examples per forward batch")
    parser.add_argument("--squad", default=None, help="SQuAD v1.1 JSON file for --task squad")
    parser.add_argument("--prompt-column", default="prompt", help="prompt column of a user task file")
    parser.add_argument("--answer-column", default="answer", help="answer column of a user task file")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation limit (default: the task's)")
    parser.add_argument(
        "--restart", action="store_true", help="discard an earlier run's journal and results in --out and start fresh"
    )
    parser.add_argument(
        "--metric", default=None, choices=["accuracy", "squad"], help="user file: labels or QA (default squad)"
    )
    parser.add_argument(
        "--prompt-format", default=None, choices=["chat", "plain"], help="chat template or plain text (default: task's)"
    )
    parser.add_argument("--curves", action="store_true", help="add faithfulness curves (deletion / sufficiency)")
    parser.add_argument(
        "--curves-n",
        type=int,
        default=None,
        help="curves on the first N kept examples only (default: all; each costs one forward per active latent)",
    )
    add_plan_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Check everything, run (resuming from the journal), then write the folder; print where it went."""
    start = time.perf_counter()
    ks, layers, positions = check_arguments(args)
    task = load_task(
        args.task,
        n=args.n,
        seed=args.seed,
        squad_path=args.squad,
        prompt_column=args.prompt_column,
        answer_column=args.answer_column,
        max_new_tokens=args.max_new_tokens,
        metric=args.metric,
        prompt_format=args.prompt_format,
    )
    methods = parse_methods(args.methods) + (("ablation",) if args.ablation else ())
    methods += CONTROLS if getattr(args, "activation_controls", False) else ()
    if getattr(args, "plan", False):
        if distributed.is_main():
            cfg = ExperimentConfig(
                layer=0,
                methods=methods,
                ks=ks,
                steer_positions=positions,
                batch_size=args.batch_size,
                floors=not args.no_floors,
                mode=args.mode,
                skip_first=not args.splice_first,
                curves=args.curves,
                curves_n=args.curves_n,
                ig_steps=args.ig_steps,
            )
            sys.stdout.write(reproduce_plan(args, task, cfg, lambda lm: resolve_all(lm, args, layers)))
        return 0
    out = Path(args.out)
    with ExitStack() as held:
        # under torchrun rank 0 holds the lock and writes; a refusal there is raised on every rank
        distributed.on_main(lambda: held.enter_context(_files.locked_folder(out, command="reproduce")))
        lm = load_model(args.model, device=args.device, device_map=args.device_map)
        check_prompt_lengths(lm, task)
        saes = resolve_all(lm, args, layers)
        labels = {str(found.layer): found.label for found in saes}
        meta = run_meta(args, lm, task, ks, methods, positions, labels)
        journal = distributed.on_main(lambda: open_journal(out, meta, task, saes, restart=args.restart))
        if journal is None:  # the other ranks read rank 0's journal, never write it
            journal = Journal.open(out, journal_config(meta, task, saes), writes=False)
        results: list[LayerResult] = []
        timing: dict[str, float] = {}
        recorder = ExampleRecorder(lm.tokenizer)
        for found in saes:
            cfg = ExperimentConfig(
                layer=found.layer,
                mode=args.mode,
                methods=methods,
                ks=ks,
                steer_positions=positions,
                batch_size=args.batch_size,
                seed=args.seed,
                donor_value=args.donor_value,
                floors=not args.no_floors,
                skip_first=not args.splice_first,
                keep_f1=args.keep_f1,
                curves=args.curves,
                curves_n=args.curves_n,
                ig_steps=args.ig_steps,
            )
            began = time.perf_counter()
            sae = found.sae.to(sae_device(lm, found.layer, found.sae.cfg.hook_point))
            results.append(run_layer(lm, sae, task, cfg, journal, recorder=recorder))
            timing[f"layer_{found.layer}_s"] = round(time.perf_counter() - began, 1)
        timing["session_s"] = round(time.perf_counter() - start, 1)
        timing["total_s"] = round(earlier_seconds(out, restart=args.restart) + timing["session_s"], 1)
        if distributed.is_main():  # under torchrun every rank holds the same results; one writes them
            recorder.dump().merged(out, [r.layer for r in results]).save(out)
            write_outputs(out, RunResults(config=meta, layers=tuple(results)), timing)
            print(f"wrote {args.out}/results.json, table.md and plots in {timing['session_s']:.0f} s")  # noqa: T201
    return 0


RANK_METHODS = ("gradsae", "activation", "random", *ESTIMATORS)
"""Ranking methods ``--methods`` accepts (``ablation`` is ``--ablation``)."""
PAPER = {"mode": "replace", "splice_first": True, "keep_f1": 0.9, "steer_positions": "last", "donor_value": "score"}
"""The paper-exact preset: the authors' code's choices (docs/deviations.md lists each with our default)."""
DEFAULTS = {
    "mode": "error",
    "splice_first": False,
    "keep_f1": None,
    "steer_positions": "last",
    "donor_value": "activation",
}


def apply_preset(args: argparse.Namespace) -> None:
    """Fill each option left unset (``None``) from ``--paper`` when given, else from the defaults."""
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, PAPER[key] if args.paper else default)


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves: the journaled units, and how to continue."""
    done = count_units(args.out)
    if not done:
        return "no unit of work had finished, so nothing is saved; run the same command again to start over"
    return (
        f"{done} finished unit(s) (layers, masking and steering conditions) are saved in {Path(args.out) / FOLDER}; "
        "run the same command again to continue from there"
    )


def check_arguments(args: argparse.Namespace) -> tuple[tuple[KSpec, ...], list[int | None], tuple[str, ...]]:
    """Refuse any bad argument, input path or output folder before a model loads; return K, layers, positions."""
    apply_preset(args)
    if args.keep_f1 is not None and not 0.0 < args.keep_f1 <= 1.0:
        raise GradSAEError(f"--keep-f1 {args.keep_f1}: use an F1 threshold in (0, 1], e.g. 0.9")
    ks = parse_ks(args.ks)
    layers = layers_to_run(args.layers, args.layer)
    positions = parse_positions(args.steer_positions)
    validate.at_least("--n", args.n, 1)
    validate.at_least("--batch-size", args.batch_size, 1)
    validate.at_least("--curves-n", args.curves_n, 1)
    validate.at_least("--ig-steps", args.ig_steps, 1)
    parse_methods(args.methods)
    validate.at_least("--max-new-tokens", args.max_new_tokens, 1)
    validate.at_least("--seed", args.seed, 0)
    validate.model_and_device(args.model, args.device, args.device_map)
    validate.layers(layers, args.model, option="--layers" if args.layers else "--layer")
    validate.sae_folders(args.sae, layers)
    validate.out_folder(args.out)
    return ks, layers, positions


def parse_ks(text: str) -> tuple[KSpec, ...]:
    """``"1,10,50%"`` -> ``(1, 10, "50%")``: counts >= 1 and percentages in (0, 100], each once."""
    out: list[KSpec] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        out.append(_one_k(part))
        if out.count(out[-1]) > 1:
            raise GradSAEError(f"--ks names {part} twice: list each K once")
    if not out:
        raise GradSAEError(f"--ks {text!r} names no K: pass e.g. --ks 1,10,50%")
    return tuple(out)


def _one_k(part: str) -> KSpec:
    if part.endswith("%") and part[:-1].replace(".", "", 1).isdigit():
        if not 0 < float(part[:-1]) <= 100:
            raise GradSAEError(f"--ks: {part} is not a share of the active latents: use a percentage in (0%, 100%]")
        return part
    if part.isdigit() and int(part) > 0:
        return int(part)
    raise GradSAEError(f"--ks: {part!r} is neither a positive integer nor a percentage like 50%")


def parse_methods(text: str) -> tuple[str, ...]:
    """``--methods``: a comma list of :data:`RANK_METHODS`, each once."""
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = not methods or any(m not in RANK_METHODS for m in methods)
    if bad or len(set(methods)) < len(methods):
        raise GradSAEError(f"--methods {text!r}: use a comma list of {', '.join(RANK_METHODS)}, each once")
    return methods


def parse_positions(text: str) -> tuple[str, ...]:
    """``--steer-positions``: a comma list of :data:`STEER_POSITIONS`, each once."""
    positions = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = not positions or any(p not in STEER_POSITIONS for p in positions)
    if bad or len(set(positions)) < len(positions):
        raise GradSAEError(f"--steer-positions {text!r}: use a comma list of {', '.join(STEER_POSITIONS)}, each once")
    return positions


def resolve_all(lm: LoadedModel, args: argparse.Namespace, layers: list[int | None]) -> list[ResolvedSAE]:
    """The SAE of each layer, checked against the model before any computing."""
    return resolve_saes(lm, args.sae, layers)


def open_journal(out: Path, meta: RunMeta, task: Task, saes: list[ResolvedSAE], *, restart: bool) -> Journal:
    """The run's journal; refuse to mix with another run's results unless ``restart``."""
    if restart:
        discard(out)
    elif (out / RESULTS).is_file() and not (out / FOLDER).is_dir():
        raise GradSAEError(
            f"{out} already holds a {RESULTS} that this run did not write: add --restart to replace it, "
            "or choose another --out"
        )
    return Journal.open(out, journal_config(meta, task, saes))


def journal_config(meta: RunMeta, task: Task, saes: list[ResolvedSAE]) -> dict[str, Any]:
    """What must match for a rerun to reuse finished units: the config, the examples, the SAEs' weights."""
    import dataclasses

    examples = hashlib.sha256(repr([dataclasses.astuple(e) for e in task.examples]).encode()).hexdigest()
    weights = {str(found.layer): _digest(found.sae.state()) for found in saes}
    return {**dataclasses.asdict(meta), "examples": examples, "sae_weights": weights}


def _digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def discard(out: Path) -> None:
    """Remove an earlier run's journal and outputs from ``out`` (``--restart``)."""
    shutil.rmtree(out / FOLDER, ignore_errors=True)
    for pattern in OUTPUTS:
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)


def layers_to_run(text: str | None, layer: int | None) -> list[int | None]:
    """``--layers`` (a sweep) if given, else the single ``--layer`` (``None``: the SAE's own)."""
    return list(parse_layers(text)) if text else [layer]


def run_meta(
    args: argparse.Namespace,
    lm: LoadedModel,
    task: Task,
    ks: tuple[KSpec, ...],
    methods: tuple[str, ...],
    positions: tuple[str, ...],
    labels: dict[str, str],
) -> RunMeta:
    return RunMeta(
        task=task.name,
        metric=task.metric,
        model=lm.name,
        n=len(task.examples),
        seed=args.seed,
        mode=args.mode,
        methods=methods,
        ks=tuple(str(k) for k in ks),
        steer_positions=positions,
        sae_labels=labels,
        batch_size=args.batch_size,
        max_new_tokens=task.max_new_tokens,
        objective=objective_description(task.answer_marker),
        paper=bool(args.paper),
        skip_first=not args.splice_first,
        keep_f1=args.keep_f1,
        donor_value=args.donor_value,
        floors=not args.no_floors,
        curves=bool(args.curves),
        curves_n=args.curves_n if args.curves else None,
        aggregation="paper (mean over positions of relu)",
        versions=_files.versions(),
    )


def earlier_seconds(out: Path, *, restart: bool) -> float:
    """Wall time of the earlier completed invocations into ``out`` (``timing.json``), 0 after ``--restart``."""
    path = out / "timing.json"
    if restart or not path.is_file():
        return 0.0
    try:
        return float(_files.read_json(path).get("total_s", 0.0))
    except (ValueError, TypeError, AttributeError):
        return 0.0


def write_outputs(folder: Path, results: RunResults, timing: dict[str, float]) -> None:
    """Plots and table first, ``results.json`` last; each via a temporary file and a rename."""
    render(folder, results)
    _files.write_json(folder / "timing.json", timing, sort_keys=False)
    results.save(folder)
