"""``gradsae reproduce``: both experiments of the paper, at one or more layers, to a folder.

Writes to ``--out``: ``results.json`` (every number, the config, the seed, the
versions; identical for a rerun with the same seed), ``table.md`` (the
paper-style tables), ``exp1_layer{l}.png`` and ``exp2_layer{l}.png``, and
``timing.json`` (wall times, kept apart so ``results.json`` is reproducible).
Every file is written to a temporary name and renamed, ``results.json`` last, so
an interrupted run never leaves a half-written result.
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from pathlib import Path

import torch

from gradsae import _files, distributed
from gradsae.cli.common import add_model_arguments, parse_layers
from gradsae.errors import GradSAEError
from gradsae.experiments.config import DEFAULT_KS, DONOR_VALUES, STEER_POSITIONS, ExperimentConfig, KSpec
from gradsae.experiments.report import render
from gradsae.experiments.run import LayerResult, RunMeta, RunResults, run_layer
from gradsae.experiments.tasks import Task, check_prompt_lengths, load_task
from gradsae.models import DEFAULT_NAMES, LoadedModel, load_model, sae_device
from gradsae.pretrained import resolve_sae

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gradsae reproduce``."""
    add_model_arguments(parser)
    parser.add_argument(
        "--task",
        default="sst2",
        help="sst2, news, squad (with --squad FILE), or a .jsonl/.csv file with prompt/answer columns",
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
        choices=["replace", "error"],
        help="splice mode: error (default: the model stays exact, masked latents lose their decoder share) or "
        "replace (the paper's: the residual becomes the reconstruction; on SmolLM2 it drops SST-2 accuracy to ~25%% "
        "and the kept examples may all share one label, leaving experiment 2 without donors)",
    )
    parser.add_argument(
        "--ablation", action="store_true", help="add the exact-ablation ranking (one forward per active latent: slow)"
    )
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


def run(args: argparse.Namespace) -> int:
    """Run, then write the folder; print where it went."""
    start = time.perf_counter()
    ks = parse_ks(args.ks)
    lm = load_model(args.model, device=args.device, device_map=args.device_map)
    task = load_task(
        args.task,
        n=args.n,
        seed=args.seed,
        squad_path=args.squad,
        prompt_column=args.prompt_column,
        answer_column=args.answer_column,
        max_new_tokens=args.max_new_tokens,
    )
    check_prompt_lengths(lm, task)
    layers = layers_to_run(args.layers, args.layer)
    methods = ("gradsae", "activation", "random") + (("ablation",) if args.ablation else ())
    apply_preset(args)
    positions = tuple(p.strip() for p in args.steer_positions.split(",") if p.strip())
    if not positions or any(p not in STEER_POSITIONS for p in positions):
        raise GradSAEError(
            f"--steer-positions {args.steer_positions!r}: use a comma list of {', '.join(STEER_POSITIONS)}"
        )
    results: list[LayerResult] = []
    labels: dict[str, str] = {}
    timing: dict[str, float] = {}
    for layer in layers:
        folder = args.sae.replace("{layer}", str(layer)) if args.sae else None
        sae, used, label = resolve_sae(lm, folder, layer, default_model=args.model in DEFAULT_NAMES)
        cfg = ExperimentConfig(
            layer=used,
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
        )
        began = time.perf_counter()
        results.append(run_layer(lm, sae.to(sae_device(lm, used, sae.cfg.hook_point)), task, cfg))
        labels[str(used)] = label
        timing[f"layer_{used}_s"] = round(time.perf_counter() - began, 1)
    meta = run_meta(args, lm, task, ks, methods, positions, labels)
    timing["total_s"] = round(time.perf_counter() - start, 1)
    if distributed.is_main():  # under torchrun every rank holds the same results; one writes them
        write_outputs(Path(args.out), RunResults(config=meta, layers=tuple(results)), timing)
        print(f"wrote {args.out}/results.json, table.md and plots in {timing['total_s']:.0f} s")  # noqa: T201
    return 0


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


def parse_ks(text: str) -> tuple[KSpec, ...]:
    out: list[KSpec] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.endswith("%") and part[:-1].replace(".", "", 1).isdigit():
            out.append(part)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise GradSAEError(f"--ks: {part!r} is neither a positive integer nor a percentage like 50%")
    return tuple(out) or DEFAULT_KS


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
    import transformers

    from gradsae import __version__

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
        objective="p(greedy token) at the answer step",
        paper=bool(args.paper),
        skip_first=not args.splice_first,
        keep_f1=args.keep_f1,
        donor_value=args.donor_value,
        floors=not args.no_floors,
        aggregation="paper (mean over positions of relu)",
        versions={
            "gradsae": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    )


def write_outputs(folder: Path, results: RunResults, timing: dict[str, float]) -> None:
    """Plots and table first, ``results.json`` last; each via a temporary file and a rename."""
    render(folder, results)
    _files.write_json(folder / "timing.json", timing, sort_keys=False)
    results.save(folder)
