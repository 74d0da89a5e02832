"""``gradsae steer``: steer generation toward concepts with the latents each selector picks, all at the same strength.

Writes to ``--out``: ``steering.json`` (every number and generation; loads with
:meth:`gradsae.experiments.results.SteerResult.load`), ``steering.md`` (generated from
the JSON alone), ``steering.png`` (success vs perplexity per concept, every
selector) and ``timing.json`` (this session's wall time). ``--render-only``
re-renders the markdown and the plot from ``steering.json``.

Every finished unit is journaled under ``--out/journal``: the same command after
Ctrl-C or ``kill -9`` continues where it stopped and writes the same
``steering.json``; ``--restart`` discards an earlier run in ``--out``. Under
``torchrun --nproc_per_node N -m gradsae steer ...`` each rank computes its share of
the (layer, seed, concept) units into that journal, then rank 0 writes the same
files as one process would.

Concepts: built-in ones by name (``--concept weddings --concept positive``; default:
all six), or one of your own from target words (``--words a,b,c``, every inflection
that should count listed) with optional texts that express it (``--text``), texts of
its opposite (``--negative``) and, for a sentiment, the label the model's own judge
should give (``--judge positive``); or a JSON file with the fields of
:class:`gradsae.experiments.results.Concept` (one object or a list).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from gradsae import _files, distributed
from gradsae.cli import options
from gradsae.cli.common import dataclass_arguments, parse_layers
from gradsae.errors import GradSAEError
from gradsae.experiments.concepts import CONCEPTS, DEFAULT_CONCEPTS, journal_config, run_steering
from gradsae.experiments.journal import FOLDER, Journal, count_units
from gradsae.experiments.results import Concept, SteerConfig, SteerResult
from gradsae.models import load_model, sae_device
from gradsae.pretrained import resolve_sae
from gradsae.report.concepts import render

OUTPUTS = ("steering.json", "steering.md", "steering.png", "timing.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gradsae steer``."""
    options.model_arguments(parser)
    options.out(parser, default="runs/steer", help="output folder (default: runs/steer)")
    parser.add_argument(
        "--concept",
        action="append",
        default=[],
        help=f"a built-in concept, repeatable: {', '.join(CONCEPTS)} (default: all of them unless --words or "
        "--concept-file is given)",
    )
    parser.add_argument("--words", default=None, help="your own concept: comma-separated whole words (inflections too)")
    parser.add_argument("--name", default=None, help="name of the --words concept (default: its first word)")
    parser.add_argument("--text", action="append", default=[], help="a text expressing the --words concept")
    parser.add_argument("--negative", action="append", default=[], help="a text of its opposite (a contrast)")
    parser.add_argument("--judge", default=None, choices=["positive", "negative"], help="sentiment label to judge")
    parser.add_argument("--concept-file", default=None, help="JSON: one concept object, or a list of them")
    parser.add_argument("--render-only", action="store_true", help="re-render --out/steering.json; run nothing")
    parser.add_argument("--report", default=None, help="where the markdown goes (default: --out/steering.md)")
    options.restart(parser, help="discard an earlier run in --out and start fresh")
    dataclass_arguments(parser, SteerConfig, types={"alphas": str, "methods": str, "layers": str, "seeds": str})


def parse_floats(text: str | tuple[float, ...], option: str) -> tuple[float, ...]:
    """``"1,2,4"`` -> ``(1.0, 2.0, 4.0)``."""
    if not isinstance(text, str):
        return tuple(text)
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise GradSAEError(f"{option} must be comma-separated numbers, got {text!r}") from None


def parse_ints(text: str | tuple[int, ...], option: str) -> tuple[int, ...]:
    """``"0,1"`` -> ``(0, 1)``."""
    if not isinstance(text, str):
        return tuple(text)
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise GradSAEError(f"{option} must be comma-separated integers, got {text!r}") from None


def parse_methods(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """``"gradsae,random"`` -> ``("gradsae", "random")``; the config refuses unknown names."""
    if not isinstance(text, str):
        return tuple(text)
    return tuple(part.strip() for part in text.split(",") if part.strip())


def config_from(args: argparse.Namespace, layers: tuple[int, ...] | None = None) -> SteerConfig:
    """The :class:`SteerConfig` the options describe (``layers``: as resolved)."""
    fields = {name: getattr(args, name) for name in SteerConfig.__dataclass_fields__}
    fields["alphas"] = parse_floats(fields["alphas"], "--alphas")
    fields["seeds"] = parse_ints(fields["seeds"], "--seeds")
    fields["methods"] = parse_methods(fields["methods"])
    given = fields["layers"]
    if layers is not None:
        fields["layers"] = layers
    elif isinstance(given, str):
        fields["layers"] = parse_layers(given) if given.strip() else ()
    return SteerConfig(**fields)


def wanted_layers(args: argparse.Namespace) -> tuple[int | None, ...]:
    """``--layers``, else ``--layer``, else the SAE's own (``None``)."""
    if isinstance(args.layers, str) and args.layers.strip():
        return parse_layers(args.layers)
    if isinstance(args.layers, tuple) and args.layers:
        return args.layers
    return (args.layer,)


def concepts_from(args: argparse.Namespace) -> list[Concept]:
    """The concepts the arguments name, in order: built-in, --words, --concept-file."""
    unknown = [name for name in args.concept if name not in CONCEPTS]
    if unknown:
        raise GradSAEError(f"unknown concept {unknown[0]!r}: use one of {', '.join(CONCEPTS)}, or --words")
    out = [CONCEPTS[name] for name in args.concept]
    if args.words:
        words = tuple(w.strip() for w in args.words.split(",") if w.strip())
        name = args.name or (words[0] if words else "concept")
        out.append(Concept(name, words, tuple(args.text), tuple(args.negative), args.judge))
    elif args.text or args.negative or args.judge:
        raise GradSAEError("--text, --negative and --judge describe a --words concept: pass --words too")
    if args.concept_file:
        out += _concept_file(Path(args.concept_file))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise GradSAEError(f"concept names repeat ({', '.join(names)}): give each concept once")
    return out or [CONCEPTS[name] for name in DEFAULT_CONCEPTS]


def _concept_file(path: Path) -> list[Concept]:
    if not path.exists():
        raise GradSAEError(f"concept file {path} does not exist")
    data: Any = _files.read_json(path)
    items = data if isinstance(data, list) else [data]
    try:
        return [
            Concept(
                name=str(item["name"]),
                words=tuple(item["words"]),
                texts=tuple(item.get("texts", ())),
                negatives=tuple(item.get("negatives", ())),
                judge=item.get("judge"),
            )
            for item in items
        ]
    except (KeyError, TypeError) as exc:
        raise GradSAEError(
            f"{path}: each concept needs name and words (and may have texts, negatives, judge): {exc}"
        ) from None


def run(args: argparse.Namespace) -> int:
    """Run (or re-render) and print where the files went."""
    out = Path(args.out)
    report = Path(args.report) if args.report else None
    if args.render_only:
        if not (out / "steering.json").exists():
            raise GradSAEError(f"{out / 'steering.json'} does not exist: run `gradsae steer --out {out}` first")
        paths = render(SteerResult.load(out / "steering.json"), out, report=report)
    else:
        concepts = concepts_from(args)
        wanted_layers(args)
        config_from(args, layers=())  # refuse bad options before loading anything
        main = distributed.is_main()  # under torchrun rank 0 holds the folder and writes the files
        with _files.locked_folder(out, command="steer") if main else contextlib.nullcontext(out):
            start = time.perf_counter()
            result = run_steer(args, concepts, out)
            if not main:
                return 0
            paths = render(result, out, report=report)
            seconds = round(time.perf_counter() - start, 1)
            paths.append(_files.write_text(out / "timing.json", json.dumps({"session_s": seconds}) + "\n"))
    sys.stdout.write("".join(f"wrote {p}\n" for p in paths))
    return 0


def run_steer(args: argparse.Namespace, concepts: list[Concept], out: Path) -> SteerResult:
    """Load the model and each layer's SAE, open the journal, then the whole sweep."""
    lm = load_model(args.model, device=args.device, device_map=args.device_map)
    saes = {}
    for wanted in wanted_layers(args):
        sae, layer, label = resolve_sae(lm, args.sae, wanted)
        saes[layer] = (sae.to(sae_device(lm, layer, sae.cfg.hook_point)), label)
    cfg = config_from(args, layers=tuple(saes))
    config = journal_config(cfg, lm.name, {k: v[1] for k, v in saes.items()}, concepts)

    def open_fresh() -> Journal:
        if args.restart:
            shutil.rmtree(out / FOLDER, ignore_errors=True)
            for name in OUTPUTS:
                (out / name).unlink(missing_ok=True)
        return Journal.open(out, config)

    opened = distributed.on_main(open_fresh)  # rank 0 first: the others then read the same run.json
    distributed.barrier()
    journal = opened if opened is not None else Journal.open(out, config)  # (an empty Journal is falsy: len 0)
    command = "gradsae " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "gradsae steer"
    return run_steering(lm, saes, concepts, cfg, command=command, journal=journal)


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves in ``--out``: the journaled units; the same command continues."""
    if args.render_only:
        return "nothing was written"
    units = count_units(args.out)
    return (
        f"{units} finished units are journaled in {Path(args.out) / FOLDER}; rerun the same command to continue "
        "(it writes the same steering.json as an uninterrupted run)"
    )
