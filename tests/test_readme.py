"""The README's library example runs as written (on the real embedded model)."""

from __future__ import annotations

import re
from pathlib import Path

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


def test_the_readme_result_blocks_are_their_files() -> None:
    """Every number in the README's result blocks comes from a committed results file (scripts/sync_readme.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_readme", README.parent / "scripts" / "sync_readme.py")
    assert spec is not None and spec.loader is not None
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    text = README.read_text(encoding="utf-8")
    assert all(f"<!-- {name}:start -->" in text for name in sync.BLOCKS)
    assert sync.synced(text) == text, "a README result block is stale: run python scripts/sync_readme.py"
