"""Every command's ``--help`` prints (a ``%`` in a field docstring once broke ``train-sae --help``)."""

from __future__ import annotations

import pytest

from gradsae.cli import main

COMMANDS = ("score", "train-sae", "eval-sae", "reproduce", "sweep", "report", "cards", "steer")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_prints(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_train_sae_help_shows_the_percent_sign(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train-sae", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "up to 80% of its tokens" in out and "taskmix" in out
