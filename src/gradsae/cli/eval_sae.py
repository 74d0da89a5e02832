"""``gradsae eval-sae``: each SAE on three held-out sets (news, chat prompts, generated text) and the task
accuracy with it spliced in; writes ``OUT/eval_sae.json`` and ``OUT/eval_sae.md``.

The sets are :mod:`gradsae.experiments.eval_sets`, the figures and the accuracy
:mod:`gradsae.experiments.eval_sae`. Every argument, the tasks' data and the news
corpus are checked before the model loads. Each finished unit is journaled in
``OUT/journal/``: after Ctrl-C or ``kill -9`` the same command continues and writes the
same ``eval_sae.json`` (``--restart`` discards the journal).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from gradsae import _files
from gradsae.cli import options, validate
from gradsae.cli.common import parse_count, parse_layers
from gradsae.errors import GradSAEError
from gradsae.experiments.eval_sae import (
    EvalSAEResults,
    SetFigures,
    card_section,
    journaled_set_figures,
    sae_digest,
    task_accuracy,
    with_card_section,
)
from gradsae.experiments.eval_sets import chat_set, context_limit, generated_set, news_set, task_variants
from gradsae.experiments.journal import FOLDER, Journal, count_units
from gradsae.models import LoadedModel, load_model
from gradsae.pretrained import (
    check_version_spec,
    is_version_spec,
    resolve_saes,
    sae_folder,
    shipped_folder,
    shipped_layers,
    shipped_sae_path,
)
from gradsae.sae import SAE
from gradsae.tasks import Task, check_prompt_lengths, load_task, with_prompt_format
from gradsae.tasks.generated import SPECS
from gradsae.training.activations import load_texts, split_heldout

log = logging.getLogger(__name__)

TASKS = "sst2,capitals,plural,past_tense,facts"
KNOWN_TASKS = ("sst2", "news", *SPECS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gradsae eval-sae``."""
    add = parser.add_argument
    options.model(parser)
    options.sae(
        parser,
        help="SAE folder with {layer} in it, or shipped:NAME, SAEs that shipped under that name, e.g. shipped:k32 "
        "(default: the shipped SAEs of the default model)",
    )
    options.layers(parser, default="6,15,24", help="comma-separated layers, one SAE each (default: 6,15,24)")
    options.out(parser, required=True, help="output folder: eval_sae.json and eval_sae.md")
    add("--tokens", type=parse_count, default=8_000, help="counted tokens per held-out set, e.g. 8k (0: skip the sets)")
    add("--n-task", type=int, default=64, help="examples per task for the accuracy (0: skip it)")
    add(
        "--tasks", default=TASKS, help=f"comma-separated tasks for the chat prompts and the accuracy (default: {TASKS})"
    )
    options.seed(parser, help="seed that draws the task examples and the bootstrap (default: 0)")
    add("--context", type=int, default=128, help="tokens per news sequence, BOS included (default: 128, as trained)")
    add("--new-tokens", type=int, default=48, help="greedy tokens per continuation in the generated set")
    add("--opening", type=int, default=16, help="tokens of each news opening the generated set continues")
    add("--batch-size", type=int, default=16, help="sequences per forward batch")
    options.device(parser)
    options.threads(parser)
    options.prompt_format(
        parser,
        help="render every task in this format (default: each task's own; plain for a model without a chat template)",
    )
    add(
        "--cards",
        action="store_true",
        help="also write each layer's figures into its SAE folder's README.md (needs --sae; replaces that section)",
    )
    options.restart(parser, help="discard an earlier run's journal in --out and measure everything anew")


def run(args: argparse.Namespace) -> int:
    """Check everything, load the data, then the model; measure; write the two files."""
    start = time.perf_counter()
    layers = check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = parse_tasks(args.tasks)
    tasks = [load_task(name, n=args.n_task, seed=args.seed) for name in names] if args.n_task else []
    variants = task_variants(names, seed=args.seed) if args.tokens else []
    if args.prompt_format:
        tasks = [with_prompt_format(t, args.prompt_format) for t in tasks]
        variants = [with_prompt_format(v, args.prompt_format) for v in variants if v.name in names]
    heldout = split_heldout(load_texts("news"))[1] if args.tokens else []
    out = Path(args.out)
    with _files.locked_folder(out, command="eval-sae"):
        lm = load_model(args.model, device=args.device)
        if not getattr(lm.tokenizer, "chat_template", None):  # a pretrained model: no chat renderings
            variants = [v for v in variants if v.prompt_format != "chat"]
        for task in tasks:
            check_prompt_lengths(lm, task)
        saes, labels = load_saes(lm, args, layers)
        config = run_config(args, lm, labels, tasks, [v.name for v in variants])
        journal = open_journal(out, config, saes, tasks, restart=args.restart)
        figures, sets, seconds = measure_sets(lm, saes, args, heldout, variants, journal)
        accuracy = []
        for task in tasks:
            accuracy += task_accuracy(lm, saes, task, batch_size=args.batch_size, seed=args.seed, journal=journal)
        seconds += sum(_unit_seconds(journal, task.name, list(saes)) for task in tasks)
        results = EvalSAEResults(
            config=config,
            sets=sets,
            figures=tuple(figures),
            accuracy=tuple(accuracy),
            versions=_files.versions(),
            seconds=round(seconds, 1),
        )
        results.save(out)
    took = time.perf_counter() - start
    if args.cards:
        write_cards(results, args.sae, layers)
    print(  # noqa: T201
        f"wrote {out}/eval_sae.json and eval_sae.md ({results.seconds:.0f} s measuring in all, {took:.0f} s this run)"
    )
    return 0


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves: the journaled units, and how to continue."""
    n = count_units(args.out)
    return f"{n} finished units are journaled in {Path(args.out) / FOLDER}; run the same command again to continue"


def open_journal(
    out: Path, config: dict[str, Any], saes: dict[int, SAE], tasks: list[Task], *, restart: bool
) -> Journal:
    """The run's journal (``--restart``: the old one discarded first); it refuses another run's units."""
    if restart:
        shutil.rmtree(out / FOLDER, ignore_errors=True)
    return Journal.open(out, journal_config(config, saes, tasks))


def journal_config(config: dict[str, Any], saes: dict[int, SAE], tasks: list[Task]) -> dict[str, Any]:
    """What must match for a rerun to reuse finished units: every setting, the examples, the SAEs' weights.

    The command line, the thread count and the versions are left out (they change no unit's value
    beyond float rounding the fingerprint cannot see anyway).
    """
    import dataclasses
    import hashlib

    kept = {k: v for k, v in config.items() if k not in ("command", "threads")}
    examples = {
        t.name: hashlib.sha256(repr([dataclasses.astuple(e) for e in t.examples]).encode()).hexdigest() for t in tasks
    }
    return {**kept, "examples": examples, "sae_weights": {str(layer): sae_digest(sae) for layer, sae in saes.items()}}


def _unit_seconds(journal: Journal, task: str, layers: list[int]) -> float:
    from gradsae.experiments.journal import unit_key

    keys = [unit_key("clean", task)] + [
        unit_key("acc", task, layer, mode) for layer in layers for mode in ("replace", "error")
    ]
    return sum(float((journal.get(key) or {}).get("seconds", 0.0)) for key in keys)


def check_arguments(args: argparse.Namespace) -> tuple[int, ...]:
    """Refuse any bad option, SAE folder or output folder before a model loads; return the layers."""
    layers = parse_layers(args.layers)
    parse_tasks(args.tasks)
    validate.at_least("--tokens", args.tokens, 0)
    validate.at_least("--n-task", args.n_task, 0)
    if not args.tokens and not args.n_task:
        raise GradSAEError("--tokens 0 and --n-task 0 leave nothing to measure: pass e.g. --tokens 8k --n-task 64")
    validate.at_least("--seed", args.seed, 0)
    validate.at_least("--context", args.context, 2)
    validate.at_least("--new-tokens", args.new_tokens, 1)
    validate.at_least("--opening", args.opening, 1)
    validate.at_least("--batch-size", args.batch_size, 1)
    validate.at_least("--threads", args.threads, 1)
    validate.model_and_device(args.model, args.device)
    validate.layers(layers, args.model, option="--layers")
    check_sae_option(args.sae, args.model, layers)
    if args.cards and (args.sae is None or is_version_spec(args.sae)):
        raise GradSAEError("--cards writes into the SAE folders: pass --sae FOLDER (with {layer} in it)")
    validate.out_folder(args.out)
    return layers


def check_sae_option(spec: str | None, model: str | None, layers: tuple[int, ...]) -> None:
    """``--sae`` names one folder per layer (``{layer}`` in it); without it, a shipped SAE must exist."""
    if spec is None:
        if shipped_folder(model) is None:
            raise GradSAEError("no SAEs ship for this model: pass --sae FOLDER (with {layer} in it)")
        missing = [layer for layer in layers if shipped_sae_path(layer, model) is None]
        if missing:
            shipped = ", ".join(str(layer) for layer in shipped_layers(model))
            raise GradSAEError(f"no shipped SAE at layer {missing[0]} (shipped: {shipped}): pass --sae FOLDER")
        return
    if spec.startswith("saelens:"):
        raise GradSAEError("--sae saelens:... is not supported here: pass a local SAE folder with {layer} in it")
    if is_version_spec(spec):
        check_version_spec(spec, list(layers), model)
        return
    if len(layers) > 1 and "{layer}" not in spec:
        raise GradSAEError(f"--sae {spec} names one folder for {len(layers)} layers: put {{layer}} in the path")
    validate.sae_folders(spec, list(layers))


def write_cards(results: EvalSAEResults, spec: str, layers: tuple[int, ...]) -> None:
    """Each SAE folder's ``README.md`` gets (or has replaced) its layer's eval-sae section."""
    for layer in layers:
        card = Path(str(sae_folder(spec, layer))) / "README.md"
        old = card.read_text() if card.exists() else f"# SAE at layer {layer}\n"
        _files.write_text(card, with_card_section(old, card_section(results, layer)))
        print(f"updated {card}")  # noqa: T201


def parse_tasks(text: str) -> list[str]:
    """``"sst2,capitals"`` -> ``["sst2", "capitals"]``: known task names, each once."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [name for name in names if name not in KNOWN_TASKS]
    if unknown:
        raise GradSAEError(f"--tasks: unknown task {unknown[0]!r}: use any of {', '.join(KNOWN_TASKS)}")
    if not names or len(set(names)) < len(names):
        raise GradSAEError(f"--tasks {text!r}: name each task once, e.g. --tasks {TASKS}")
    return names


def load_saes(
    lm: LoadedModel, args: argparse.Namespace, layers: tuple[int, ...]
) -> tuple[dict[int, SAE], dict[str, str]]:
    """The SAE of each layer (checked against the model) and what each is."""
    saes, labels = {}, {}
    for found in resolve_saes(lm, args.sae, layers):
        saes[found.layer] = found.sae.to(lm.device)
        labels[str(found.layer)] = found.label
    return saes, labels


def measure_sets(
    lm: LoadedModel,
    saes: dict[int, SAE],
    args: argparse.Namespace,
    heldout: list[str],
    variants: list[Task],
    journal: Journal,
) -> tuple[list[SetFigures], dict[str, dict[str, object]], float]:
    """Build each set, then measure every SAE on it (journaled units reused); also the units' seconds."""
    if not args.tokens:
        return [], {}, 0.0
    builders = {
        "news": lambda: news_set(lm.tokenizer, heldout, tokens=args.tokens, context=args.context),
        "chat": lambda: chat_set(lm.tokenizer, variants, tokens=args.tokens, limit=context_limit(lm)),
        "generated": lambda: generated_set(
            lm,
            heldout,
            variants,
            tokens=args.tokens,
            new_tokens=args.new_tokens,
            opening=args.opening,
            batch=args.batch_size,
        ),
    }
    figures: list[SetFigures] = []
    sets: dict[str, dict[str, object]] = {}
    total = 0.0
    for name, make in builders.items():
        found, sets[name], seconds = journaled_set_figures(lm, saes, name, make, batch=args.batch_size, journal=journal)
        figures += found
        total += seconds
        log.info("set %s: %d tokens, %.0f s of measuring", name, sets[name]["tokens"], seconds)
    return figures, sets, total


def run_config(
    args: argparse.Namespace, lm: LoadedModel, labels: dict[str, str], tasks: list[Task], variants: list[str]
) -> dict[str, object]:
    """The command and every setting, as JSON-able data."""
    return {
        "command": _files.relative_paths(command_line(args), args.out),
        "model": lm.name,
        "saes": {layer: _files.relative_paths(label, args.out) for layer, label in labels.items()},
        "layers": [int(layer) for layer in labels],
        "tokens": args.tokens,
        "n_task": args.n_task,
        "tasks": parse_tasks(args.tasks),
        "metrics": {task.name: task.metric for task in tasks},
        "prompt_formats": {task.name: task.prompt_format for task in tasks},
        "prompt_format": args.prompt_format,
        "variants": variants,
        "seed": args.seed,
        "context": args.context,
        "new_tokens": args.new_tokens,
        "opening": args.opening,
        "batch_size": args.batch_size,
        "device": str(args.device),
        "threads": torch.get_num_threads(),
    }


def command_line(args: argparse.Namespace) -> str:
    """The command as a person would type it."""
    parts = ["gradsae", "eval-sae", "--layers", args.layers, "--out", str(args.out)]
    parts += ["--tokens", str(args.tokens), "--n-task", str(args.n_task), "--tasks", args.tasks]
    defaults = {"seed": 0, "context": 128, "new_tokens": 48, "opening": 16, "batch_size": 16, "device": "cpu"}
    for key, default in defaults.items():
        if getattr(args, key) != default:
            parts += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for key in ("model", "sae", "prompt_format", "threads"):
        if getattr(args, key) is not None:
            parts += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return shlex.join(parts + (["--cards"] if args.cards else []))
