"""``estimators.md``: every estimator of a sweep's curves, per cell, and the count of cells that meet issue 23's bar,
checked against the per-example numbers stored in ``results.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradsae.cli import main
from gradsae.report.estimators import BAR, ESTIMATORS_PAGE, NAMES, costs_from
from tests.cli.test_sweep import _sweep_argv, files  # noqa: F401  (the module's fixture)


@pytest.fixture(scope="module")
def swept(files: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("sweep_estimators")
    argv = _sweep_argv(files, out)
    argv[argv.index("--curves-n") + 1] = "3"
    assert main([*argv, "--methods", "gradsae,activation,random,relp"]) == 0
    return out


def _cells(folder: Path) -> list[tuple[str, dict]]:
    cells = []
    for task in ("task", "other"):
        data = json.loads((folder / task / "results.json").read_text())
        cells += [(task, layer["curves"]) for layer in data["layers"] if layer["curves"]]
    return cells


def _meets(curves: dict, method: str) -> bool:
    """Issue 23's bar from the stored per-example values alone (an independent mean)."""
    examples = curves["examples"]
    recall = sum(ex["recall"][method] for ex in examples) / len(examples)
    top = sum(ex["spearman_top"][method] for ex in examples) / len(examples)
    return recall >= BAR["recall"] and top >= BAR["spearman_top"]


def test_the_sweep_writes_one_table_per_cell_and_counts_the_bar(swept: Path) -> None:
    page = (swept / ESTIMATORS_PAGE).read_text()
    cells = _cells(swept)
    assert cells and page.count("\n### ") == len(cells)
    for method in ("gradsae", "gradsae_sum", "relp", "activation", "random"):
        assert page.count(f"| {NAMES[method]} |") == len(cells)
    for method in ("gradsae", "gradsae_sum", "relp", "activation"):
        met = sum(_meets(curves, method) for _, curves in cells)
        assert f"- {NAMES[method]}: recall of the exact top-10 >= 0.9" in page
        assert f"in {met} of {len(cells)} cells" in page.split(f"- {NAMES[method]}:")[1].split("\n")[0]
    mean_recall = sum(ex["recall"]["relp"] for ex in cells[0][1]["examples"]) / len(cells[0][1]["examples"])
    assert f"| {NAMES['relp']} |" in page and f"{mean_recall:.2f}" in page


def test_report_rewrites_the_same_page_and_adds_measured_costs(swept: Path, tmp_path: Path) -> None:
    before = (swept / ESTIMATORS_PAGE).read_text()
    assert main(["report", str(swept)]) == 0
    assert (swept / ESTIMATORS_PAGE).read_text() == before
    bench = tmp_path / "results.json"
    bench.write_text(json.dumps({"figures": {"relp_cost": {"value": 1.8}, "ig_cost": {"value": 8.5}}}))
    assert main(["report", str(swept), "--bench", str(bench)]) == 0
    page = (swept / ESTIMATORS_PAGE).read_text()
    assert f"| {NAMES['relp']} |" in page and "| 1.80 |" in page and "RelP (sum) 1.80" in page
    assert costs_from(None) == {"gradsae": 1.0, "gradsae_sum": 1.0}


def test_a_missing_bench_file_is_one_line(swept: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(swept), "--bench", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --bench") and len(err.strip().splitlines()) == 1
