"""The house rules, read from the source with ``ast`` (also run by ``make lint``).

* No import cycles among ``gradsae`` modules, nor among ``benchmarks`` modules
  (imports inside functions count; ``if TYPE_CHECKING:`` blocks do not).
* Floors: the core (``gradsae/*.py``) imports none of ``experiments``, ``training``,
  ``cli``; ``experiments`` and ``training`` do not import ``cli``.
* Only ``gradsae.cli`` imports ``argparse``.
* ``import gradsae`` does not load ``transformers``, and ``gradsae.splice`` is the function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("gradsae.experiments", "gradsae.training", "gradsae.report", "gradsae.cli")


def module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: str) -> dict[str, Path]:
    base = ROOT / "src" if package == "gradsae" else ROOT
    return {module_name(p, base): p for p in sorted((base / package).rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of ``known`` (and outside names like ``argparse``) that ``path`` imports."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return found


def graph(package: str) -> dict[str, set[str]]:
    mods = modules(package)
    known = set(mods)
    return {name: {m for m in imports(path, name, known) if m in known and m != name} for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.parametrize("package", ["gradsae", "benchmarks"])
def test_no_import_cycles(package: str) -> None:
    cycle = find_cycle(graph(package))
    assert cycle is None, " -> ".join(cycle or [])


def test_find_cycle_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lower_floors_do_not_import_higher_ones() -> None:
    wrong = []
    for name, deps in graph("gradsae").items():
        if name == "gradsae.__main__":  # the entry point sits above everything
            continue
        if name == "gradsae" or not name.startswith(UPPER):
            wrong += [(name, d) for d in deps if d.startswith(UPPER)]
        elif name.startswith(("gradsae.experiments", "gradsae.training", "gradsae.report")):
            wrong += [(name, d) for d in deps if d.startswith("gradsae.cli")]
    assert not wrong


def test_only_the_cli_parses_arguments() -> None:
    mods = modules("gradsae")
    users = [n for n, p in mods.items() if "argparse" in imports(p, n, set(mods)) and not n.startswith("gradsae.cli")]
    assert not users


def test_import_gradsae_is_light() -> None:
    code = (
        "import sys, gradsae, gradsae.splice, gradsae.scores; "
        "print('transformers' in sys.modules, callable(gradsae.splice) and gradsae.splice.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "splice"]
