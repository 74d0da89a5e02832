"""``gradsae eval-sae`` journals each finished unit: a rerun measures only what is missing and writes what an
uninterrupted run writes; another run's journal is refused; ``--restart`` starts over."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gradsae.cli import main
from gradsae.experiments import eval_sae
from gradsae.sae_formats import save_sae
from tests.helpers import tiny_sae
from tests.tiny_files import tiny_run_files


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tiny_run_files(tmp_path_factory.mktemp("files"))
    shutil.copytree(d / "sae", d / "saes" / "layer_0")
    save_sae(tiny_sae("topk", d_sae=48, seed=4, layer=1), d / "saes" / "layer_1")
    return d


def _argv(d: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("eval-sae", "--model", str(d / "model"), "--sae", str(d / "saes" / "layer_{layer}"), "--layers", "0,1"),
        *("--out", str(out), "--tokens", "60", "--n-task", "4", "--tasks", "capitals,plural"),
        *("--new-tokens", "4", "--context", "16", "--batch-size", "3", *extra),
    ]


def without_time(out: Path) -> tuple[dict[str, object], str]:
    """``eval_sae.json`` without ``seconds`` and the command (its ``--out`` differs), ``eval_sae.md`` without
    its command and time line: what must match."""
    data = json.loads((out / "eval_sae.json").read_text())
    data.pop("seconds"), data["config"].pop("command")
    md = "\n".join(line for line in (out / "eval_sae.md").read_text().splitlines() if not line.startswith("Command:"))
    return data, md


UNITS = 3 + 3 * 2 + 2 * (1 + 2 * 2)
"""3 sets, 3 x 2 figures, per task a clean unit and 2 layers x 2 modes."""


@pytest.fixture(scope="module")
def reference(files: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    assert main(_argv(files, out)) == 0
    return out


def test_every_unit_is_journaled(reference: Path) -> None:
    names = sorted(p.stem for p in (reference / "journal").glob("*.json") if p.name != "run.json")
    assert len(names) == UNITS
    assert {"set-generated", "figures-chat-1", "clean-capitals", "acc-plural-0-error"} <= set(names)
    data = json.loads((reference / "eval_sae.json").read_text())
    units = [json.loads(p.read_text())["value"] for p in (reference / "journal").glob("*-*.json")]
    assert data["seconds"] == pytest.approx(sum(u["seconds"] for u in units), abs=0.1)


@pytest.mark.parametrize("drop", ["figures-generated-1", "acc-capitals-1-replace", "clean-plural", "set-news"])
def test_a_rerun_measures_only_the_missing_units_and_writes_the_same(
    files: Path, reference: Path, tmp_path: Path, drop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path  # beside the reference run, so the SAE paths it records relative to --out read the same
    shutil.copytree(reference, out, dirs_exist_ok=True)
    (out / "journal" / f"{drop}.json").unlink()
    (out / "eval_sae.json").unlink()
    measured: list[int] = []
    real = eval_sae.set_figures
    monkeypatch.setattr(
        eval_sae, "set_figures", lambda lm, saes, s, **kw: measured.extend(saes) or real(lm, saes, s, **kw)
    )
    assert main(_argv(files, out)) == 0
    assert without_time(out) == without_time(reference)
    assert measured == ([1] if drop == "figures-generated-1" else [])


def test_a_damaged_entry_is_recomputed(files: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path  # beside the reference run, so the SAE paths it records relative to --out read the same
    shutil.copytree(reference, out, dirs_exist_ok=True)
    path = out / "journal" / "acc-plural-0-replace.json"
    entry = json.loads(path.read_text())
    entry["value"]["accuracy"]["exact"]["mean"] = 123.0  # checksum no longer matches
    path.write_text(json.dumps(entry))
    assert main(_argv(files, out)) == 0
    assert without_time(out) == without_time(reference)


def test_another_run_s_journal_is_refused_and_restart_starts_over(
    files: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    shutil.copytree(reference, out)
    assert main(_argv(files, out, "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another configuration" in err and "--restart" in err
    mine = tmp_path / "files"
    shutil.copytree(files, mine)
    argv = _argv(mine, tmp_path / "o2")
    assert main(argv) == 0
    capsys.readouterr()
    save_sae(tiny_sae("topk", d_sae=48, seed=9, layer=1), mine / "saes" / "layer_1")
    assert main(argv) == 2 and "sae_weights" in capsys.readouterr().err, "new weights in the same folder: refused"
    assert main([*argv, "--restart"]) == 0
    again = tmp_path / "o3"
    assert main(_argv(mine, again)) == 0
    assert without_time(tmp_path / "o2") == without_time(again), "--restart measured everything anew"


def test_no_journal_left_means_the_same_as_before(files: Path, reference: Path, tmp_path: Path) -> None:
    """Without the journal (all units gone) the command measures everything again: the same output."""
    out = tmp_path  # beside the reference run, so the SAE paths it records relative to --out read the same
    assert main(_argv(files, out)) == 0
    assert without_time(out) == without_time(reference)
