"""``kill -9`` at seeded random moments: reruns finish with the outputs of an uninterrupted run.

Each test runs the real command in a subprocess on a tiny random model saved as
files (:mod:`tests.tiny_files`), first once uninterrupted (the reference), then
again into a fresh folder, killed with ``SIGKILL`` after a random delay and
rerun, several times. After every kill no file that a reader would take for a
result is torn: each JSON parses (journal entries match their checksums), each
PNG ends with its ``IEND`` chunk, each checkpoint and SAE loads; temporary files
are hidden (``.<name>.tmp<pid>``) or end in ``.tmp``. The last run's outputs
equal the reference's (``results.json`` byte for byte; SAE weights and
evaluations exactly). Also: a second ``reproduce`` into a folder in use is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gradsae
from gradsae.experiments.journal import canonical
from gradsae.experiments.results import RunResults
from tests.tiny_files import tiny_run_files

pytestmark = pytest.mark.slow

SRC = Path(gradsae.__file__).resolve().parents[1]
TMP = re.compile(r"\..+\.tmp\d+")
PNG = b"\x89PNG\r\n\x1a\n"
IEND = b"IEND\xaeB`\x82"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gradsae", *args]


def _reproduce(files: Path, out: Path) -> list[str]:
    return _command(
        "reproduce",
        *("--model", str(files / "model"), "--sae", str(files / "sae"), "--task", str(files / "task.jsonl")),
        *("--out", str(out), "--n", "8", "--ks", "1,3,50%", "--batch-size", "4", "--max-new-tokens", "3"),
    )


def _train(files: Path, out: Path) -> list[str]:
    return _command(
        "train-sae",
        *("--model", str(files / "model"), "--corpus", str(files / "corpus.txt"), "--layers", "0,1"),
        *("--width", "32", "--k", "4", "--tokens", "2400", "--sae-batch", "64", "--context", "16", "--batch", "4"),
        *("--buffer", "8", "--checkpoint-seconds", "0", "--warmup-tokens", "100", "--dead-tokens", "500"),
        *("--eval-tokens", "30", "--eval-batch", "4", "--no-progress", "--threads", "1", "--out", str(out)),
    )


def _run(cmd: list[str]) -> float:
    began = time.monotonic()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return time.monotonic() - began


def _kill_and_rerun(
    cmd: list[str], progress: Callable[[], float], top: float, seed: int, check: Callable[[], str]
) -> list[str]:
    """Run ``cmd`` until ``progress()`` passes a seeded random target, then a random instant more; SIGKILL it.

    Check the folder after each kill; rerun (at most 5 kills); finally let it finish. Returns a log.
    """
    rng, log = random.Random(seed), []
    for _ in range(6):
        now = progress()
        target = now + rng.uniform(0.0, 0.6) * (top - now)
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
            while proc.poll() is None and progress() < target:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))  # anywhere in the next unit of work, writes included
            if proc.poll() is None and len(log) < 5:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                log.append(f"killed past {target:.0f}: {check()}")
                continue
            code = proc.wait(timeout=300)
            err.seek(0)
            assert code == 0, err.read().decode()[-3000:]
        log.append("finished")
        break
    assert sum(entry.startswith("killed") for entry in log) >= 3 and log[-1] == "finished", log
    print(f"{cmd[3]}: " + "; ".join(log))
    return log


# -- reproduce --------------------------------------------------------------------------------------------------
def _check_run_folder(out: Path) -> str:
    """No file a reader would take for a result is torn; say what is there."""
    for path in out.rglob("*"):
        if path.is_dir() or path.name == ".lock" or TMP.fullmatch(path.name):
            continue
        assert not path.name.startswith("."), f"unexpected hidden file {path}"
        data = path.read_bytes()
        if path.suffix == ".json":
            value = json.loads(data)
            if path.parent.name == "journal" and path.name != "run.json":
                assert hashlib.sha256(canonical(value["value"]).encode()).hexdigest() == value["sha256"], path
        elif path.suffix == ".png":
            assert data.startswith(PNG) and data.endswith(IEND), f"torn plot {path}"
        elif path.suffix == ".md":
            assert data.endswith(b"\n"), f"torn table {path}"
    if (out / "results.json").exists():
        RunResults.load(out)
    units = len([p for p in out.glob("journal/*.json") if p.name != "run.json"])
    return f"{units} units journaled" + (", results.json written" if (out / "results.json").exists() else "")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run_files(tmp_path_factory.mktemp("files"))


def _units(out: Path) -> int:
    """Journaled units, plus one once ``results.json`` is written."""
    return len([p for p in out.glob("journal/*.json") if p.name != "run.json"]) + (out / "results.json").exists()


def test_reproduce_survives_kill_9(files: Path, tmp_path: Path) -> None:
    _run(_reproduce(files, tmp_path / "reference"))
    out, top = tmp_path / "killed", _units(tmp_path / "reference")
    log = _kill_and_rerun(
        _reproduce(files, out), lambda: _units(out), top, seed=7, check=lambda: _check_run_folder(out)
    )
    _check_run_folder(out)
    reference = (tmp_path / "reference" / "results.json").read_bytes()
    assert (out / "results.json").read_bytes() == reference, log
    assert (out / "table.md").read_bytes() == (tmp_path / "reference" / "table.md").read_bytes()
    assert json.loads(reference)["layers"][0]["steering"], "the tiny run must exercise steering"
    assert not [p for p in out.rglob("*") if TMP.fullmatch(p.name)], "temporary files were swept"


def test_second_reproduce_into_the_same_folder_is_refused(files: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    first = subprocess.Popen(_reproduce(files, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".lock").exists() or not (out / ".lock").read_text().strip():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        second = subprocess.run(_reproduce(files, out), env=_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1 and f"(pid {first.pid})" in second.stderr, second.stderr
        assert "in use by another `gradsae reproduce`" in second.stderr and "choose another --out" in second.stderr
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
    assert (out / "results.json").exists()


# -- train-sae --------------------------------------------------------------------------------------------------
def _check_train_folder(out: Path) -> str:
    """No checkpoint, SAE file or card is torn; say what is there."""
    tokens = 0
    for path in out.rglob("*"):
        if path.is_dir() or path.name == ".lock" or TMP.fullmatch(path.name) or path.suffix == ".tmp":
            continue
        if path.name == "checkpoint.pt":
            tokens = torch.load(path, weights_only=True)["tokens"]
        elif path.suffix == ".json":
            json.loads(path.read_bytes())
        elif path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".md":
            assert path.read_bytes().endswith(b"\n"), f"torn model card {path}"
    return f"checkpoint at {tokens} tokens, {len(list(out.glob('layer_*/cfg.json')))} SAEs saved"


def _sae_outputs(out: Path) -> dict[str, object]:
    """What must match an uninterrupted run: the weights, the evaluations, the config without wall times."""
    found: dict[str, object] = {}
    for layer in sorted(out.glob("layer_*")):
        cfg = json.loads((layer / "cfg.json").read_text())
        cfg["metadata"]["gradsae"]["training"].pop("train_seconds")
        found[layer.name] = {
            "weights": {k: v.tolist() for k, v in load_file(str(layer / "sae_weights.safetensors")).items()},
            "eval": json.loads((layer / "eval.json").read_text()),
            "cfg": cfg,
        }
    return found


_SEEN: dict[tuple[int, int], int] = {}


def _train_progress(out: Path) -> float:
    """Tokens in the checkpoint (read again only when it changed), then 100 per SAE file saved."""
    try:
        stat = (out / "checkpoint.pt").stat()
        key = (stat.st_ino, stat.st_mtime_ns)
        if key not in _SEEN:
            _SEEN[key] = int(torch.load(out / "checkpoint.pt", weights_only=True)["tokens"])
        tokens = _SEEN[key]
    except (OSError, RuntimeError, EOFError):
        tokens = 0
    return tokens + 100 * len(list(out.glob("layer_*/*")))


def test_train_sae_survives_kill_9(files: Path, tmp_path: Path) -> None:
    _run(_train(files, tmp_path / "reference"))
    out = tmp_path / "killed"
    log = _kill_and_rerun(
        _train(files, out), lambda: _train_progress(out), 3200, seed=3, check=lambda: _check_train_folder(out)
    )
    _check_train_folder(out)
    reference = _sae_outputs(tmp_path / "reference")
    assert set(reference) == {"layer_0", "layer_1"}
    assert _sae_outputs(out) == reference, log
