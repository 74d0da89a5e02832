"""One helper per option that several commands share: each flag's name, type, choices and dest written once.

An option whose meaning is a field of :class:`~gradsae.experiments.config.ExperimentConfig` (or of its
:class:`~gradsae.experiments.config.SpliceSpec`) takes that field's docstring as its ``--help`` text
(:func:`config_help`) and the field's name as its ``dest``, so :func:`experiment_config` reads the parsed
options without restating them. A config-backed option left unset is ``None``: the preset
(``--paper``, else the defaults) fills it, and an option given explicitly wins.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from gradsae.cli.common import field_docs
from gradsae.errors import GradSAEError
from gradsae.estimators import ESTIMATORS
from gradsae.experiments.config import (
    DEFAULT,
    DONOR_VALUES,
    PAPER,
    STEER_POSITIONS,
    ExperimentConfig,
    KSpec,
    Preset,
    SpliceSpec,
    field_default,
)
from gradsae.splice import MODES

Parser = argparse.ArgumentParser | argparse._ArgumentGroup

RANK_METHODS = ("gradsae", "activation", "random", *ESTIMATORS)
"""Ranking methods ``--methods`` accepts (``ablation`` is ``--ablation``)."""
CONFIG_FIELDS = {**field_docs(SpliceSpec), **field_docs(ExperimentConfig)}
"""Field name -> docstring, of :class:`SpliceSpec` and :class:`ExperimentConfig`."""


def config_help(name: str, *, before: str = "", after: str = "") -> str:
    """The ``--help`` text of a config-backed option: the field's docstring (``%`` escaped for argparse)."""
    text = " ".join(part for part in (before, CONFIG_FIELDS[name].replace("``", ""), after) if part)
    return text.replace("%", "%%")


DEFAULT_METHODS = ",".join(field_default("methods"))
"""``--methods`` of ``gradsae reproduce``: the field's default."""

# -- the model and where things go ----------------------------------------------------------------------------------


def model(parser: Parser, *, help: str | None = None) -> None:
    """``--model``."""
    text = "HF model folder or id, or a .gguf file (default: embedded SmolLM2-135M-Instruct)"
    parser.add_argument("--model", default=None, help=help or text)


def sae(parser: Parser, *, help: str | None = None) -> None:
    """``--sae``."""
    text = "SAE folder: SAELens, sparsify or Gemma Scope layout; {layer} in it becomes the layer (default: shipped)"
    parser.add_argument("--sae", default=None, help=help or text)


def device(parser: Parser) -> None:
    """``--device``."""
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def layer(parser: Parser) -> None:
    """``--layer``: one layer."""
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help=config_help("layer", after="(default: the SAE's own, else 6)"),
    )


def device_map(parser: Parser) -> None:
    """``--device-map``."""
    parser.add_argument(
        "--device-map",
        default=None,
        help="spread a model too large for one device over the visible ones (accelerate), e.g. auto",
    )


def model_arguments(parser: Parser) -> None:
    """``--model``, ``--sae``, ``--layer``, ``--device``, ``--device-map``: one model, one SAE."""
    model(parser)
    sae(parser)
    layer(parser)
    device(parser)
    device_map(parser)


def layers(parser: Parser, *, default: str | None, help: str) -> None:
    """``--layers``: a comma list, parsed by :func:`gradsae.cli.common.parse_layers`."""
    parser.add_argument("--layers", default=default, help=help)


def out(parser: Parser, *, help: str, default: str | None = None, required: bool = False) -> None:
    """``--out``."""
    parser.add_argument("--out", required=required, default=default, help=help)


def seed(parser: Parser, *, help: str | None = None) -> None:
    """``--seed`` (default help: :attr:`ExperimentConfig.seed`'s, which also draws the task's examples)."""
    text = help or config_help("seed", after="It also draws the task's examples.")
    parser.add_argument("--seed", type=int, default=field_default("seed"), help=text)


def restart(parser: Parser, *, help: str) -> None:
    """``--restart``."""
    parser.add_argument("--restart", action="store_true", help=help)


def threads(parser: Parser) -> None:
    """``--threads``."""
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy small machine)"
    )


def prompt_format(parser: Parser, *, help: str) -> None:
    """``--prompt-format``."""
    parser.add_argument("--prompt-format", default=None, choices=("chat", "plain"), help=help)


# -- the task -------------------------------------------------------------------------------------------------------


def n(parser: Parser, *, default: int, help: str, aliases: tuple[str, ...] = ()) -> None:
    """``--n``: examples drawn before keeping the correct ones."""
    parser.add_argument("--n", *aliases, dest="n", type=int, default=default, help=help)


def max_new_tokens(parser: Parser, *, help: str = "generation limit (default: the task's)") -> None:
    """``--max-new-tokens``."""
    parser.add_argument("--max-new-tokens", type=int, default=None, help=help)


# -- the experiment (ExperimentConfig fields) -----------------------------------------------------------------------


def mode(parser: Parser, *, default: str | None = None, after: str = "") -> None:
    """``--mode``: :attr:`SpliceSpec.mode` (``None``: the preset's)."""
    parser.add_argument("--mode", default=default, choices=MODES, help=config_help("mode", after=after))


SPLICE_FIRST = "also splice (and mask) each prompt's first token: skip_first false (unset: the preset's). skip_first:"
NO_FLOORS = "skip the steering floors: floors false. floors:"


def splice_first(parser: Parser) -> None:
    """``--splice-first``: :attr:`SpliceSpec.skip_first` set to ``False`` (unset: the preset's)."""
    parser.add_argument(
        "--splice-first",
        dest="skip_first",
        action="store_const",
        const=False,
        default=None,
        help=config_help("skip_first", before=SPLICE_FIRST),
    )


def methods(parser: Parser, *, default: str | None) -> None:
    """``--methods``: :attr:`ExperimentConfig.methods` as a comma list of :data:`RANK_METHODS`."""
    after = f"A comma list of {', '.join(RANK_METHODS)} (ig: integrated gradients; relp: RelP propagation; see "
    after += "gradsae.estimators); each also gets a faithfulness curve under --curves."
    parser.add_argument("--methods", default=default, help=config_help("methods", after=after))


def ks(parser: Parser, *, default: str) -> None:
    """``--ks``: :attr:`ExperimentConfig.ks` as a comma list."""
    parser.add_argument("--ks", default=default, help=config_help("ks", after=f"(default: {default})"))


def ig_steps(parser: Parser, *, default: int | None = None) -> None:
    """``--ig-steps``: :attr:`ExperimentConfig.ig_steps`."""
    parser.add_argument("--ig-steps", type=int, default=default, help=config_help("ig_steps"))


def batch_size(parser: Parser) -> None:
    """``--batch-size``: :attr:`ExperimentConfig.batch_size`."""
    parser.add_argument("--batch-size", type=int, default=field_default("batch_size"), help=config_help("batch_size"))


def steer_positions(parser: Parser) -> None:
    """``--steer-positions``: :attr:`ExperimentConfig.steer_positions` as a comma list (unset: the preset's)."""
    parser.add_argument("--steer-positions", default=None, help=config_help("steer_positions"))


def donor_value(parser: Parser) -> None:
    """``--donor-value``: :attr:`ExperimentConfig.donor_value` (unset: the preset's)."""
    parser.add_argument("--donor-value", default=None, choices=list(DONOR_VALUES), help=config_help("donor_value"))


def keep_f1(parser: Parser) -> None:
    """``--keep-f1``: :attr:`ExperimentConfig.keep_f1` (unset: the preset's)."""
    parser.add_argument("--keep-f1", type=float, default=None, help=config_help("keep_f1"))


def no_floors(parser: Parser) -> None:
    """``--no-floors``: :attr:`ExperimentConfig.floors` set to ``False``."""
    parser.add_argument(
        "--no-floors",
        dest="floors",
        action="store_false",
        help=config_help("floors", before=NO_FLOORS),
    )


def curves(parser: Parser) -> None:
    """``--curves``: :attr:`ExperimentConfig.curves`."""
    parser.add_argument("--curves", action="store_true", help=config_help("curves"))


def curves_n(parser: Parser, *, default: int | None = None) -> None:
    """``--curves-n``: :attr:`ExperimentConfig.curves_n`."""
    parser.add_argument("--curves-n", type=int, default=default, help=config_help("curves_n"))


def paper(parser: Parser) -> None:
    """``--paper``: the :data:`PAPER` preset fills each option left unset."""
    named = {"mode": "--mode", "skip_first": "--splice-first", "keep_f1": "--keep-f1", "donor_value": "--donor-value"}
    parts = [f"{flag} {getattr(PAPER, name)}" if name != "skip_first" else flag for name, flag in named.items()]
    parts.append(f"--steer-positions {','.join(PAPER.steer_positions)}")
    parser.add_argument(
        "--paper",
        action="store_true",
        help="the paper-exact preset (each part also a flag; a flag given explicitly wins): "
        + ", ".join(parts)
        + "; see docs/deviations.md",
    )


# -- from the parsed options to the config ---------------------------------------------------------------------------


def preset(args: argparse.Namespace) -> Preset:
    """:data:`PAPER` under ``--paper``, else :data:`DEFAULT`."""
    return PAPER if getattr(args, "paper", False) else DEFAULT


def experiment_config(args: argparse.Namespace, **fixed: Any) -> ExperimentConfig:
    """The :class:`ExperimentConfig` (at layer 0) the parsed options name: each field from the option of its name
    when this command has one and it is set, else from the preset, else the field's default; ``fixed`` wins."""
    names = [f.name for f in (*dataclasses.fields(SpliceSpec), *dataclasses.fields(ExperimentConfig))]
    given = {name: getattr(args, name) for name in names if name not in ("layer", "splice") and hasattr(args, name)}
    for name, parse in (("ks", parse_ks), ("methods", parse_methods), ("steer_positions", parse_positions)):
        if given.get(name) is not None:
            given[name] = parse(given[name])
    return preset(args).config(0, **(given | fixed))


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
