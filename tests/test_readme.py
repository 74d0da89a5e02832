"""The README's library example runs as written (on the real embedded model)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_a_library_example() -> None:
    blocks = python_blocks()
    assert blocks and "from gradsae import" in blocks[0]


@pytest.mark.slow
def test_readme_library_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {}
    exec(compile(python_blocks()[0], str(README), "exec"), namespace)
    assert len(namespace["top"]) == 10  # type: ignore[arg-type]
    assert "capital of France" in capsys.readouterr().out


def _sync_readme() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_readme", README.parent / "scripts" / "sync_readme.py")
    assert spec is not None and spec.loader is not None
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    return sync


def test_the_readme_result_blocks_are_their_files() -> None:
    """Every number in the README's result blocks comes from a committed results file (scripts/sync_readme.py)."""
    sync = _sync_readme()
    for path, (text, new) in sync.synced_pages().items():  # every block in exactly one page, or it exits
        assert new == text, f"a result block of {path} is stale: run python scripts/sync_readme.py"
    readme = README.read_text(encoding="utf-8")
    assert all(f"<!-- {name}:start -->" in readme for name in ("demo", "sweep", "estimators", "bench_summary"))


def test_the_benchmark_line_counts_the_targets_and_names_each_miss(tmp_path: Path, monkeypatch: Any) -> None:
    sync = _sync_readme()
    (tmp_path / "benchmarks").mkdir()
    figures = {
        "a": {"value": 1.0, "target": 1.1, "better": "<=", "met": True},
        "b": {"value": 239.4, "target": 120.0, "better": "<=", "met": False},
        "c": {"value": 3.0, "target": None, "better": None, "met": None},  # printed beside, no target
    }
    (tmp_path / "benchmarks" / "results.json").write_text(
        json.dumps({"figures": figures, "total_s": 10.4, "finished_utc": "T"}), encoding="utf-8"
    )
    monkeypatch.setattr(sync, "ROOT", tmp_path)
    line = "The committed run (finished T, 10 s) meets 1 of 2 targets; missed: `b` 239 (target <= 120)."
    assert sync.bench_summary() == line


def test_the_sweep_block_names_the_saes_its_page_ran_with(tmp_path: Path) -> None:
    """The README's sweep line is written from the page: command, and each layer's SAE once (two if tasks differ)."""
    page = tmp_path / "sweep.md"
    page.write_text(
        "# s\n\nCommand (paths relative to this folder): `gradsae sweep --layers 6,15 --out .`\n\n"
        "- `sst2`: 32 examples drawn, metric accuracy; SAEs: layer 15: SAE b (sha256 22); layer 6: SAE a (sha256 11)\n"
        "- `facts`: 32 examples drawn, metric squad; SAEs: layer 15: SAE b (sha256 22); layer 6: SAE c (sha256 33)\n",
        encoding="utf-8",
    )
    assert _sync_readme().run_line(page) == (
        "Run: `gradsae sweep --layers 6,15 --out .`; "
        "SAEs: layer 6: SAE a (sha256 11) / SAE c (sha256 33); layer 15: SAE b (sha256 22)."
    )
