"""No directory of the machine that ran a command is written into a committed document."""

from __future__ import annotations

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
    results = EvalSAEResults.load(ROOT / "docs/results/eval_sae_shipped")
    assert "/work/" in results.config["command"]  # the committed JSON has them
    page = render_markdown(results)
    assert "/work/" not in page
    assert "layer 6: ../saes/chatmix/layer_6" in page
