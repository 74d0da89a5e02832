"""Each shared option is defined once (:mod:`gradsae.cli.options`), and a config-backed one says what its field says."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from gradsae.cli import build_parser
from gradsae.cli.common import field_docs
from gradsae.experiments.config import ExperimentConfig, SpliceSpec

CLI = Path(__file__).resolve().parents[2] / "src" / "gradsae" / "cli"
SHARED = (
    "--model",
    "--sae",
    "--layer",
    "--layers",
    "--device",
    "--device-map",
    "--out",
    "--seed",
    "--n",
    "--ks",
    "--ig-steps",
    "--mode",
    "--max-new-tokens",
    "--curves",
    "--curves-n",
    "--paper",
    "--restart",
    "--threads",
    "--prompt-format",
    "--splice-first",
    "--keep-f1",
    "--steer-positions",
    "--donor-value",
    "--no-floors",
)
"""Flags that only :mod:`gradsae.cli.options` adds (``--batch-size`` and ``--methods`` mean other things in
``cards``, ``eval-sae`` and ``score``: sequences, estimators)."""
CONFIG_BACKED = {
    "reproduce": {
        "layer",
        "mode",
        "skip_first",
        "methods",
        "ig_steps",
        "ks",
        "steer_positions",
        "donor_value",
        "keep_f1",
        "floors",
        "batch_size",
        "seed",
        "curves",
        "curves_n",
    },
    "sweep": {"mode", "methods", "ig_steps", "ks", "batch_size", "seed", "curves_n"},
    "score": {"layer", "mode", "ig_steps"},
}
"""Each command's options that are :class:`ExperimentConfig` (or :class:`SpliceSpec`) fields."""
NOT_CONFIG = {"score": {"methods"}}
"""Options named like a field that mean something else (``score --methods``: the estimators' columns)."""


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", sorted(CONFIG_BACKED))
def test_config_backed_help_is_the_field_docstring(command: str) -> None:
    docs = {**field_docs(SpliceSpec), **field_docs(ExperimentConfig)}
    actions = {a.dest: a for a in _subparser(command)._actions if a.dest in docs}
    actions = {dest: a for dest, a in actions.items() if dest not in NOT_CONFIG.get(command, set())}
    assert set(actions) == CONFIG_BACKED[command]
    for dest, action in actions.items():
        shown = (action.help or "").replace("%%", "%")
        assert docs[dest].replace("``", "") in shown, f"{command} --{dest}: help is not the field's docstring"


def test_shared_flags_are_added_only_by_the_options_module() -> None:
    found = []
    for path in sorted(CLI.glob("*.py")):
        if path.name == "options.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if _adds_argument(node) and any(isinstance(a, ast.Constant) and a.value in SHARED for a in node.args):
                found.append(f"{path.name}:{node.lineno}")
    assert not found, f"a shared option defined outside gradsae.cli.options: {found}"


def _adds_argument(node: ast.AST) -> bool:
    """``parser.add_argument(...)``, or ``add(...)`` with ``add = parser.add_argument``."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Attribute) and func.attr == "add_argument") or (
        isinstance(func, ast.Name) and func.id == "add"
    )


def test_config_defaults_are_the_options_defaults() -> None:
    """An option left alone gives the field's default (no default written twice)."""
    from gradsae.cli.reproduce import config_of

    args = build_parser().parse_args(["reproduce", "--out", "x"])
    assert config_of(args) == ExperimentConfig(splice=SpliceSpec(layer=0))
