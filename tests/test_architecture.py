"""The house rules, read from the source with ``ast`` (also run by ``make lint``), written as data.

* :data:`FLOORS`, top to bottom: a module imports only from its own floor or a lower one
  (``gradsae/*.py`` is the core, the bottom floor; ``gradsae.__main__`` sits above all).
* No import cycles among ``gradsae`` modules, nor among ``benchmarks`` modules; imports inside
  functions and under ``if TYPE_CHECKING:`` count.
* Only :data:`PARSERS` import ``argparse``.
* :data:`LIGHT`: modules that load neither torch nor transformers (checked in a fresh interpreter).
* :data:`KEPT_OUT`: what a module must not import (the maths of an SAE apart from its files).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FLOORS = ("cli", "report", "experiments", "training", "tasks", "core")
"""Top to bottom: ``gradsae.<floor>`` for each but the last; the core is every other module."""
PARSERS = ("gradsae.cli",)
"""The only package that may import ``argparse``."""
HEAVY = ("torch", "transformers")
LIGHT = ("gradsae", "gradsae.cli.report", "gradsae.report")
"""These modules, and every module inside a package among them (``gradsae.report``; ``gradsae`` itself counts
as one module), load none of :data:`HEAVY`: ``import gradsae``, the ``report`` command, the report package."""
KEPT_OUT = {"gradsae.sae": ("gradsae.sae_formats", "gradsae._files", "safetensors", "numpy", "json")}
"""``sae`` is the SAE's maths (config, encode, decode); every file format lives in the core module ``sae_formats``."""


def module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: str) -> dict[str, Path]:
    base = ROOT / "src" if package == "gradsae" else ROOT
    return {module_name(p, base): p for p in sorted((base / package).rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of ``known`` (and outside names like ``argparse``) that ``path`` imports, anywhere in it."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
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


def floor(module: str) -> int:
    """Height of ``module``'s floor (0 = the core); ``gradsae.__main__`` is above every floor."""
    if module == "gradsae.__main__":
        return len(FLOORS)
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else ""
    return len(FLOORS) - 1 - FLOORS.index(name) if name in FLOORS[:-1] else 0


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


def test_type_checking_imports_count(tmp_path: Path) -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n"
    (tmp_path / "a.py").write_text(source)
    assert imports(tmp_path / "a.py", "pkg.a", {"pkg.b"}) == {"typing", "pkg.b"}


def test_floor_of_each_package() -> None:
    assert [floor(f"gradsae.{name}.x") for name in FLOORS[:-1]] == [5, 4, 3, 2, 1]
    assert floor("gradsae.splice") == floor("gradsae") == 0 and floor("gradsae.__main__") == 6


def test_no_module_imports_a_higher_floor() -> None:
    wrong = [(name, dep) for name, deps in graph("gradsae").items() for dep in deps if floor(dep) > floor(name)]
    assert not wrong


def test_only_the_cli_parses_arguments() -> None:
    mods = modules("gradsae")
    users = [n for n, p in mods.items() if "argparse" in imports(p, n, set(mods)) and not n.startswith(PARSERS)]
    assert not users


def test_kept_out_imports() -> None:
    mods = modules("gradsae")
    found = {name: imports(mods[name], name, set(mods)) for name in KEPT_OUT}
    wrong = {
        name: sorted(m for m in found[name] if m.split(".")[0] in banned or m in banned)
        for name, banned in KEPT_OUT.items()
    }
    assert not any(wrong.values()), wrong


def test_light_modules_load_no_torch() -> None:
    light = [n for n in modules("gradsae") if n in LIGHT or n.startswith(tuple(f"{m}." for m in LIGHT[1:]))]
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {light!r}]; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{light} load {out.strip()}"


def test_gradsae_splice_is_the_function() -> None:
    code = "import gradsae, gradsae.splice, gradsae.scores; print(callable(gradsae.splice) and gradsae.splice.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["splice"]
