"""``gradsae steer`` end to end on the tiny model (the loaders patched), and its one-line errors."""

from __future__ import annotations

import json

import pytest

from gradsae.cli import main
from gradsae.cli import steer as steer_cli
from gradsae.pretrained import ResolvedSAE
from tests.helpers import char_lm, tiny_sae

TINY = ["--k", "2", "--alphas", "1,4", "--n-seed", "1", "--n-heldout", "1", "--n-eval", "2", "--max-new-tokens", "4"]
TINY += ["--resamples", "20", "--methods", "gradsae,activation,logit-lens,random", "--random-draws", "2"]
TINY += ["--pool", "4", "--seeds", "0"]


@pytest.fixture
def patched(monkeypatch):
    lm = char_lm(hidden=32, intermediate=64, heads=4, kv_heads=2, max_positions=512, init_range=0.3)
    monkeypatch.setattr(steer_cli, "load_model", lambda *a, **k: lm)
    monkeypatch.setattr(steer_cli, "resolve_sae", lambda *a, **k: ResolvedSAE(tiny_sae(layer=1, d_in=32), 1, "tiny"))


def test_steer_writes_json_markdown_and_plot_and_rerenders(patched, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["steer", "--out", str(out), "--words", "ab,cd", "--text", "ab cd", *TINY]) == 0
    assert {p.name for p in out.iterdir()} >= {"steering.json", "steering.md", "steering.png", "timing.json", "journal"}
    data = json.loads((out / "steering.json").read_text())
    assert data["concepts"][0]["words"] == ["ab", "cd"] and data["config"]["alphas"] == [1.0, 4.0]
    assert "wall" not in json.dumps(data) and json.loads((out / "timing.json").read_text())["session_s"] > 0
    (out / "steering.md").unlink()
    assert main(["steer", "--out", str(out), "--render-only", "--report", str(tmp_path / "doc.md")]) == 0
    text = (tmp_path / "doc.md").read_text()
    assert "## `ab` (topic)" in text and "](run/steering.png)" in text


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--alphas", "1,big"], "--alphas"),
        (["--methods", "gradsae,magic"], "unknown steering methods"),
        (["--concept", "cats"], "unknown concept 'cats'"),
        (["--text", "a wedding"], "pass --words too"),
        (["--render-only"], "does not exist"),
        (["--seeds", "0,x"], "--seeds"),
        (["--pool", "1"], "--pool"),
        (["--layers", "6,6"], "twice"),
    ],
)
def test_bad_options_are_one_line_errors(patched, tmp_path, capsys, argv, needle):
    assert main(["steer", "--out", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err


def test_interrupted_says_what_is_kept(tmp_path):
    from argparse import Namespace

    (tmp_path / "journal").mkdir()
    (tmp_path / "journal" / "a.json").write_text("{}")
    text = steer_cli.interrupted(Namespace(out=str(tmp_path), render_only=False))
    assert "1 finished units" in text and "rerun the same command" in text
