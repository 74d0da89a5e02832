"""``gradsae steer``: steer generation toward concepts with latents each method picks; judge success, fluency, cost.

Writes to ``--out``: ``steering.json`` (every number and generation; loads with
:meth:`gradsae.experiments.concepts.SteerResult.load`), ``steering.md`` (the tables)
and ``steering.png`` (success vs perplexity over alpha, one curve per method).
``--render-only`` re-renders the markdown and the plot from ``steering.json``.

Concepts: built-in ones by name (``--concept weddings --concept positive``), or one
of your own from target words (``--words a,b,c``) with optional texts that express
it (``--text``), texts of its opposite (``--negative``) and, for a sentiment, the
label the model's own judge should give (``--judge positive``); or a JSON file
with the fields of :class:`gradsae.steer.Concept` (one object or a list).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from gradsae import _files
from gradsae.cli.common import add_model_arguments, dataclass_arguments
from gradsae.errors import GradSAEError
from gradsae.experiments.concepts import CONCEPTS, SteerConfig, SteerResult, run_steering
from gradsae.models import load_model, sae_device
from gradsae.pretrained import resolve_sae
from gradsae.report.concepts import render
from gradsae.steer import Concept

DEFAULT_CONCEPTS = ("weddings", "positive")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gradsae steer``."""
    add_model_arguments(parser)
    parser.add_argument("--out", default="runs/steer", help="output folder (default: runs/steer)")
    parser.add_argument(
        "--concept",
        action="append",
        default=[],
        help=f"a built-in concept, repeatable: {', '.join(CONCEPTS)} (default: {' and '.join(DEFAULT_CONCEPTS)} "
        "unless --words or --concept-file is given)",
    )
    parser.add_argument("--words", default=None, help="your own concept: comma-separated target words")
    parser.add_argument("--name", default=None, help="name of the --words concept (default: its first word)")
    parser.add_argument("--text", action="append", default=[], help="a text expressing the --words concept")
    parser.add_argument("--negative", action="append", default=[], help="a text of its opposite (a contrast)")
    parser.add_argument("--judge", default=None, choices=["positive", "negative"], help="sentiment label to judge")
    parser.add_argument("--concept-file", default=None, help="JSON: one concept object, or a list of them")
    parser.add_argument("--render-only", action="store_true", help="re-render --out/steering.json; run nothing")
    dataclass_arguments(parser, SteerConfig, skip=("layer",), types={"alphas": str, "methods": str})


def parse_alphas(text: str | tuple[float, ...]) -> tuple[float, ...]:
    """``"1,2,4"`` -> ``(1.0, 2.0, 4.0)``."""
    if not isinstance(text, str):
        return tuple(text)
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise GradSAEError(f"--alphas must be comma-separated numbers, got {text!r}") from None


def parse_methods(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """``"gradsae,random"`` -> ``("gradsae", "random")``; the config refuses unknown names."""
    if not isinstance(text, str):
        return tuple(text)
    return tuple(part.strip() for part in text.split(",") if part.strip())


def config_from(args: argparse.Namespace, layer: int) -> SteerConfig:
    """The :class:`SteerConfig` the options describe."""
    fields = {name: getattr(args, name) for name in SteerConfig.__dataclass_fields__ if name != "layer"}
    fields["alphas"] = parse_alphas(fields["alphas"])
    fields["methods"] = parse_methods(fields["methods"])
    return SteerConfig(layer=layer, **fields)


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
    if args.render_only:
        if not (out / "steering.json").exists():
            raise GradSAEError(f"{out / 'steering.json'} does not exist: run `gradsae steer --out {out}` first")
        paths = render(SteerResult.load(out / "steering.json"), out)
    else:
        paths = render(run_steer(args), out)
    sys.stdout.write("".join(f"wrote {p}\n" for p in paths))
    return 0


def run_steer(args: argparse.Namespace) -> SteerResult:
    """Load the model and SAE, then the whole sweep."""
    concepts = concepts_from(args)
    config_from(args, layer=0)  # refuse bad options before loading anything
    lm = load_model(args.model, device=args.device, device_map=args.device_map)
    sae, layer, label = resolve_sae(lm, args.sae, args.layer)
    cfg = config_from(args, layer)
    command = "gradsae " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "gradsae steer"
    return run_steering(
        lm, sae.to(sae_device(lm, layer, sae.cfg.hook_point)), concepts, cfg, sae_label=label, command=command
    )
