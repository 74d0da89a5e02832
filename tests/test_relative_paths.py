"""No directory of the machine that ran a command is written into a committed document."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from gradsae import _files
from gradsae.experiments.eval_sae import EvalSAEResults, render_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_relative_paths_by_hand():
    text = "gradsae sweep --out /work/runs/sweep --sae '/work/runs/saes/x/layer_{layer}' EM / F1 https://a.org/b"
    out = _files.relative_paths(text, "/work/runs/sweep")
    assert out == "gradsae sweep --out . --sae '../saes/x/layer_{layer}' EM / F1 https://a.org/b"
    assert _files.command_out(text) == "/work/runs/sweep"
    assert _files.command_out("gradsae x --out=a/b") == "a/b" and _files.command_out("gradsae x") is None


def test_committed_eval_sae_page_renders_without_absolute_paths():
    committed = EvalSAEResults.load(ROOT / "docs/results/eval_sae_shipped")
    assert "/work/" not in committed.config["command"]  # the committed JSON names no machine path
    machine = {  # the committed config as a run with absolute paths writes it (as files written before did)
        **committed.config,
        "command": "gradsae eval-sae --layers 6,15,24 --out /work/runs/eval_x --sae '/work/runs/saes/x/layer_{layer}'",
        "saes": {str(layer): f"/work/runs/saes/x/layer_{layer}" for layer in (6, 15, 24)},
    }
    results = dataclasses.replace(committed, config=machine)
    page = render_markdown(results)
    assert "/work/" not in page
    assert re.search(r"layer 6: \.\./saes/[\w.-]+/layer_6", page), "the SAE folders, relative to the page's run"


def test_no_committed_result_or_card_names_a_directory_of_the_machine_that_ran_it():
    """Every file under docs/ and every shipped model card: no ``/work/`` path (older files were rewritten to
    paths relative to the repository, ``runs/...``)."""
    files = [
        *(ROOT / "docs").rglob("*.md"),
        *(ROOT / "docs").rglob("*.json"),
        *(ROOT / "src/gradsae/saes").rglob("*.md"),
    ]
    found = [str(f.relative_to(ROOT)) for f in files if "/work/" in f.read_text(errors="ignore")]
    assert not found, found
