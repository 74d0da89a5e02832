"""A rerun that recalls every layer from the journal keeps examples.json (it used to write ``{"layers": []}``)."""

from __future__ import annotations

import json
from pathlib import Path

from gradsae.cli import main
from gradsae.experiments.results import EXAMPLES
from tests.tiny_files import tiny_run_files


def _argv(files: Path, out: Path) -> list[str]:
    return [
        "reproduce",
        "--task",
        str(files / "task.jsonl"),
        "--layers",
        "0",
        "--n",
        "6",
        "--ks",
        "1",
        "--max-new-tokens",
        "3",
        "--model",
        str(files / "model"),
        "--sae",
        str(files / "sae"),
        "--out",
        str(out),
    ]


def test_examples_json_survives_a_rerun_that_recalls_every_layer(tmp_path: Path) -> None:
    files = tiny_run_files(tmp_path / "files")
    out = tmp_path / "run"
    assert main(_argv(files, out)) == 0
    first = json.loads((out / EXAMPLES).read_text())
    assert [part["layer"] for part in first["layers"]] == [0] and first["layers"][0]["examples"]
    assert main(_argv(files, out)) == 0  # every layer recalled from the journal
    assert json.loads((out / EXAMPLES).read_text()) == first
    (out / EXAMPLES).unlink()  # an older run's journal: no examples unit, no file to keep either
    for unit in (out / "journal").glob("*examples*"):
        unit.unlink()
    assert main(_argv(files, out)) == 0
    assert json.loads((out / EXAMPLES).read_text()) == {"layers": []}
