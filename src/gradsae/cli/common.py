"""Argument helpers shared by the commands: layer lists, counts, and dataclass-driven options.

The options several commands share are in :mod:`gradsae.cli.options`, one helper each.

:func:`dataclass_arguments` turns a frozen config dataclass into ``--options``: one
per field, the field's default as the default, the docstring under the field as
the ``--help`` text, so each option is written once (the dataclass is the source).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import math
import textwrap
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gradsae.errors import GradSAEError


def parse_layers(text: str, *, option: str = "--layers") -> tuple[int, ...]:
    """``"6,15,24"`` -> ``(6, 15, 24)`` (sorted); refuse repeats and negative layers."""
    try:
        given = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise GradSAEError(f"{option} must be comma-separated integers, got {text!r}: e.g. {option} 6,15,24") from None
    if not given:
        raise GradSAEError(f"pass at least one layer with {option}")
    twice = sorted({layer for layer in given if given.count(layer) > 1})
    if twice:
        raise GradSAEError(f"{option} {text} names layer {twice[0]} twice: list each layer once")
    if min(given) < 0:
        raise GradSAEError(f"{option} {text} has a negative layer: layers count from 0")
    return tuple(sorted(given))


def parse_count(text: str) -> int:
    """``2M``, ``500k``, ``1_000`` -> int (an ``argparse`` type)."""
    text = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}.get(text[-1:], 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (use e.g. 2M, 500k, 100000)") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (use a number >= 0, e.g. 2M, 500k, 100000)")
    return int(value)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (first sentence, one line)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in zip(body, [*body[1:], None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr):
            value = after.value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docs[node.target.id] = " ".join(value.value.split())
    return docs


def dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: Iterable[str] = (),
    types: Mapping[str, Callable[[str], Any]] | None = None,
) -> list[str]:
    """Add ``--field-name`` for each field of ``cls`` not in ``skip``; return the field names added."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        convert = (types or {}).get(f.name) or _scalar_type(hints[f.name])
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=convert,
            default=f.default,
            dest=f.name,
            help=(docs.get(f.name, "") + f" (default: {f.default})").strip().replace("%", "%%"),  # argparse %-formats
        )
        added.append(f.name)
    return added


def _scalar_type(hint: Any) -> Callable[[str], Any]:
    """``int``, ``float``, ``str`` (also inside ``X | None``)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if args[0] in (int, float, str):
        return typing.cast(Callable[[str], Any], args[0])
    raise TypeError(f"no command-line type for {hint!r}: pass one in types=")


def quiet_libraries(verbose: bool) -> None:
    """Library logs and progress bars only with ``--verbose``; gradsae's own INFO lines always."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("gradsae").setLevel(logging.INFO)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if not verbose:
            hf_logging.disable_progress_bar()
    except ImportError:
        pass
