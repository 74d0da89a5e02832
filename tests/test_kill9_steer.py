"""``kill -9`` during ``gradsae steer`` at seeded random moments: the rerun writes the uninterrupted run's bytes.

As :mod:`tests.test_kill9` does for ``reproduce``: a tiny random model saved as files
(:mod:`tests.tiny_files`) is steered once uninterrupted (the reference), then again into
a fresh folder, killed with ``SIGKILL`` after a random delay and rerun with the same
command, several times. After every kill no result file is torn (each journal entry
matches its checksum); the last run's ``steering.json`` and ``steering.md`` equal the
reference's byte for byte, but for the ``--out`` folder in the stored command. Also: a
rerun into the same folder with another configuration is refused with one line.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from gradsae.experiments.journal import canonical
from gradsae.experiments.results import SteerResult
from tests.test_kill9 import IEND, PNG, TMP, _command, _env, _kill_and_rerun, _run
from tests.tiny_files import tiny_run_files

pytestmark = pytest.mark.slow

CONCEPTS = [
    {"name": "w3ish", "words": ["w3", "w7"], "texts": ["w3 w7 w3", "w7 w3"], "negatives": ["w9 w10"]},
    {"name": "w20ish", "words": ["w20", "w21"], "texts": ["w20 w21"]},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tiny_run_files(tmp_path_factory.mktemp("files"))
    (folder / "concepts.json").write_text(json.dumps(CONCEPTS))
    return folder


def _steer(files: Path, out: Path, *extra: str) -> list[str]:
    return _command(
        "steer",
        *("--model", str(files / "model"), "--sae", str(files / "sae"), "--concept-file", str(files / "concepts.json")),
        *("--out", str(out), "--k", "2", "--alphas", "0.5,2", "--n-seed", "1", "--n-heldout", "2", "--n-eval", "3"),
        *("--max-new-tokens", "3", "--pool", "4", "--random-draws", "2", "--resamples", "20", "--seeds", "0,1"),
        *extra,
    )


def _units(out: Path) -> int:
    """Journaled units, plus one once ``steering.json`` is written."""
    return len([p for p in out.glob("journal/*.json") if p.name != "run.json"]) + (out / "steering.json").exists()


def _check(out: Path) -> str:
    """No file a reader would take for a result is torn; say what is there."""
    for path in out.rglob("*"):
        if path.is_dir() or path.name == ".lock" or TMP.fullmatch(path.name):
            continue
        data = path.read_bytes()
        if path.suffix == ".json":
            value = json.loads(data)
            if path.parent.name == "journal" and path.name != "run.json":
                assert hashlib.sha256(canonical(value["value"]).encode()).hexdigest() == value["sha256"], path
        elif path.suffix == ".png":
            assert data.startswith(PNG) and data.endswith(IEND), f"torn plot {path}"
        elif path.suffix == ".md":
            assert data.endswith(b"\n"), f"torn report {path}"
    if (out / "steering.json").exists():
        SteerResult.load(out / "steering.json")
    return f"{_units(out)} units"


def test_steer_survives_kill_9(files: Path, tmp_path: Path) -> None:
    _run(_steer(files, tmp_path / "reference"))
    out, top = tmp_path / "killed", _units(tmp_path / "reference")
    assert top > 40, "the tiny run must have many units to be killed among"
    log = _kill_and_rerun(_steer(files, out), lambda: _units(out), top, seed=11, check=lambda: _check(out))
    _check(out)
    reference = tmp_path / "reference"
    for name in ("steering.json", "steering.md"):  # the same bytes but for the --out folder in the stored command
        got = (out / name).read_bytes().replace(str(out).encode(), b"OUT")
        assert got == (reference / name).read_bytes().replace(str(reference).encode(), b"OUT"), (name, log)
        assert got.count(b"--out OUT") == 1
    assert not [p for p in out.rglob("*") if TMP.fullmatch(p.name)], "temporary files were swept"


def test_steer_refuses_another_configuration_in_the_same_folder(files: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = subprocess.Popen(_steer(files, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert first.wait(timeout=600) == 0
    finally:
        if first.poll() is None:
            first.kill()
    other = subprocess.run(_steer(files, out, "--k", "3"), env=_env(), capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert "another configuration" in other.stderr and "--restart" in other.stderr
