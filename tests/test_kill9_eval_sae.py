"""``gradsae eval-sae`` killed with ``SIGKILL`` at seeded random moments: the reruns of the same command finish
with the ``eval_sae.json`` and ``eval_sae.md`` of an uninterrupted run (all but the measuring time), and no file
a reader would take for a result is ever torn (see :mod:`tests.test_kill9`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gradsae.experiments.eval_sae import EvalSAEResults
from gradsae.sae_formats import save_sae
from tests.helpers import tiny_sae
from tests.test_kill9 import TMP, _check_run_folder, _command, _kill_and_rerun, _run
from tests.tiny_files import tiny_run_files

pytestmark = pytest.mark.slow


def _eval_sae(files: Path, out: Path) -> list[str]:
    return _command(
        "eval-sae",
        *("--model", str(files / "model"), "--sae", str(files / "saes" / "layer_{layer}"), "--layers", "0,1"),
        *("--out", str(out), "--tokens", "90", "--n-task", "6", "--tasks", "capitals,plural,past_tense"),
        *("--new-tokens", "4", "--context", "16", "--batch-size", "2", "--threads", "1"),
    )


def _units(out: Path) -> int:
    """Journaled units, plus one once ``eval_sae.json`` is written."""
    return len([p for p in out.glob("journal/*.json") if p.name != "run.json"]) + (out / "eval_sae.json").exists()


def _check(out: Path) -> str:
    said = _check_run_folder(out)
    if (out / "eval_sae.json").exists():
        EvalSAEResults.load(out)
    return said


def _outputs(out: Path) -> tuple[dict[str, object], str]:
    data = json.loads((out / "eval_sae.json").read_text())
    data.pop("seconds"), data["config"].pop("command")
    md = "\n".join(line for line in (out / "eval_sae.md").read_text().splitlines() if not line.startswith("Command:"))
    return data, md


def test_eval_sae_survives_kill_9(tmp_path: Path) -> None:
    files = tiny_run_files(tmp_path / "files")
    shutil.copytree(files / "sae", files / "saes" / "layer_0")
    save_sae(tiny_sae("topk", d_sae=48, seed=4, layer=1), files / "saes" / "layer_1")
    _run(_eval_sae(files, tmp_path / "reference"))
    out, top = tmp_path / "killed", _units(tmp_path / "reference")
    assert top == 3 + 3 * 2 + 3 * (1 + 2 * 2) + 1
    log = _kill_and_rerun(_eval_sae(files, out), lambda: _units(out), top, seed=11, check=lambda: _check(out))
    _check(out)
    assert _outputs(out) == _outputs(tmp_path / "reference"), log
    assert not [p for p in out.rglob("*") if TMP.fullmatch(p.name)], "temporary files were swept"
