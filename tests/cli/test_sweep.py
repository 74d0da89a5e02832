"""``gradsae sweep``: each task's run equals a plain ``reproduce``; the table reads those files; bad input first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gradsae.cli import main
from gradsae.experiments.results import RunResults
from gradsae.experiments.stats import paired_difference
from gradsae.report.sweep import load_runs, sweep_markdown
from tests.tiny_files import tiny_run_files


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tiny_run_files(tmp_path_factory.mktemp("tiny"))
    shutil.copy(folder / "task.jsonl", folder / "other.jsonl")
    return folder


def _common(files: Path) -> list[str]:
    return ["--model", str(files / "model"), "--sae", str(files / "sae"), "--ks", "1,50%", "--max-new-tokens", "3"]


def _sweep_argv(files: Path, out: Path) -> list[str]:
    tasks = f"{files / 'task.jsonl'},{files / 'other.jsonl'}"
    return [
        "sweep",
        "--tasks",
        tasks,
        "--layers",
        "0",
        "--n",
        "8",
        "--curves-n",
        "2",
        "--out",
        str(out),
        *_common(files),
    ]


@pytest.fixture(scope="module")
def swept(files: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    assert main(_sweep_argv(files, out)) == 0
    return out


def test_each_task_equals_a_plain_reproduce(files: Path, swept: Path, tmp_path: Path) -> None:
    argv = [
        "reproduce",
        "--task",
        str(files / "task.jsonl"),
        "--layers",
        "0",
        "--n",
        "8",
        "--curves",
        "--curves-n",
        "2",
    ]
    assert main([*argv, "--out", str(tmp_path), *_common(files)]) == 0
    plain = json.loads((tmp_path / "results.json").read_text())
    assert json.loads((swept / "task" / "results.json").read_text()) == plain
    assert plain["layers"][0]["n_kept"] > 2
    assert len(plain["layers"][0]["curves"]["examples"]) == 2, "curves on the first --curves-n kept examples"


def test_table_reads_the_runs(swept: Path) -> None:
    text = (swept / "sweep.md").read_text()
    results = RunResults.load(swept / "task")
    layer = results.layers[0]
    by = {(c.method, c.k): c for c in layer.perturbation if c.set == "top" and c.edit == "zero"}
    diff = paired_difference(
        by[("gradsae", "1")].per_example, by[("activation", "1")].per_example, seed=0, resamples=1000
    )
    row = next(line for line in text.splitlines() if line.startswith("| task | 0 |"))
    assert f"| {layer.n_kept} |" in row
    assert f"{diff.mean:+.1f} [{diff.low:+.1f}, {diff.high:+.1f}]" in row
    assert "| other | 0 |" in text
    assert "## Faithfulness" in text and "## Wall time" in text
    assert str(swept) not in text and str(swept.parent) not in text, "no directory of this machine in the page"
    assert "--out ." in text and "## Summary" in text


def test_rerun_resumes_and_rewrites_the_same_tables(files: Path, swept: Path) -> None:
    before = (swept / "sweep.md").read_text()
    first = json.loads((swept / "task" / "timing.json").read_text())
    assert main(_sweep_argv(files, swept)) == 0
    after = (swept / "sweep.md").read_text()
    assert before.split("## Wall time")[0] == after.split("## Wall time")[0]
    second = json.loads((swept / "task" / "timing.json").read_text())
    assert second["total_s"] == pytest.approx(first["total_s"] + second["session_s"], abs=0.11)


def test_markdown_without_curves_has_no_curve_section(swept: Path) -> None:
    runs = load_runs(swept, ["task"])
    bare = [type(r)(task=r.task, results=_without_curves(r.results), wall_s=None) for r in runs]
    text = sweep_markdown(bare, command="gradsae sweep")
    assert "## Faithfulness" not in text and "| task | - |" in text


def _without_curves(results: RunResults) -> RunResults:
    import dataclasses

    layers = tuple(dataclasses.replace(layer, curves={}) for layer in results.layers)
    return dataclasses.replace(results, layers=layers)


@pytest.mark.parametrize(
    ("tasks", "message"),
    [("TASK,nope", "unknown task 'nope'"), ("TASK,TASK", "name each task once")],
)
def test_bad_task_refused_before_any_work(files: Path, tmp_path: Path, capsys, tasks: str, message: str) -> None:
    out = tmp_path / "out"
    argv = ["sweep", "--tasks", tasks.replace("TASK", str(files / "task.jsonl")), "--out", str(out), "--layers", "0"]
    assert main([*argv, *_common(files)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_report_rerenders_a_finished_sweep_from_its_files(swept: Path) -> None:
    before = (swept / "sweep.md").read_text()
    assert main(["report", str(swept)]) == 0
    assert (swept / "sweep.md").read_text() == before  # the same files give the same page, command included
    summary = (swept / "summary.md").read_text()
    assert "after Holm correction" in summary and "--out ." in summary
    assert (swept / "task" / "summary.md").is_file()


class _SeenError(Exception):
    """Raised by a spy once it has seen what it needs."""


@pytest.mark.parametrize(
    ("sweep_flags", "reproduce_flags", "run"),
    [
        ([], ["--curves", "--curves-n", "2"], True),
        (["--paper", "--no-curves", "--mode", "error"], ["--paper", "--mode", "error"], False),
        (["--activation-controls", "--no-curves"], ["--activation-controls"], False),
    ],
)
def test_sweep_hands_each_task_to_run_task_as_reproduce_would(
    files: Path, swept: Path, tmp_path: Path, monkeypatch, sweep_flags, reproduce_flags, run
) -> None:
    """No argv round trip and no ``reproduce.run``: the sweep builds each task's :class:`TaskRun`, equal to the
    one ``gradsae reproduce`` builds from the same settings, and hands it to ``run_task``."""
    from gradsae.cli import build_parser, reproduce, sweep

    specs = []
    real = sweep.run_task

    def spy(spec, **kw):
        specs.append(spec)
        if not run:
            raise _SeenError
        return real(spec, **kw)

    def refuse(_args):
        raise AssertionError("sweep called reproduce.run")

    monkeypatch.setattr(sweep, "run_task", spy)
    monkeypatch.setattr(reproduce, "run", refuse)
    task = str(files / "task.jsonl")
    argv = ["sweep", "--tasks", task, "--layers", "0", "--n", "8", "--curves-n", "2", "--out", str(tmp_path)]
    if run:
        assert main([*argv, *_common(files), *sweep_flags]) == 0
    else:
        with pytest.raises(_SeenError):
            sweep.run(build_parser().parse_args([*argv, *_common(files), *sweep_flags]))
    (spec,) = specs
    argv = ["reproduce", "--task", task, "--layers", "0", "--n", "8", "--out", str(tmp_path / "task")]
    plain = build_parser().parse_args([*argv, *_common(files), *reproduce_flags])
    assert spec == reproduce.task_run(plain, task=plain.task, out=plain.out)
    if run:  # the same file as the sweep fixture's, which equals a plain reproduce's (test above)
        assert (tmp_path / "task" / "results.json").read_text() == (swept / "task" / "results.json").read_text()
