"""scripts/ship_saes.py: the replaced SAEs move to their named folder (pinned digest checked), the run's take
their place, and ``shipped:<old name>`` still finds the old ones there."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from gradsae import pretrained
from gradsae.sae_formats import save_sae
from tests.helpers import tiny_sae

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ship_saes.py"


def _script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("ship_saes", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _folder(path: Path, seed: int, layer: int) -> Path:
    save_sae(tiny_sae("topk", d_sae=48, seed=seed, layer=layer), path)
    (path / "README.md").write_text(f"# seed {seed}\n")
    return path


def test_ship_moves_the_old_and_copies_the_new(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ship = _script()
    saes, run = tmp_path / "saes" / "smollm2-135m-instruct", tmp_path / "run"
    old = {layer: ship.digest(_folder(saes / f"layer_{layer}", layer, layer)) for layer in (6, 15)}
    new = {layer: ship.digest(_folder(run / f"layer_{layer}", 10 + layer, layer)) for layer in (6, 15)}
    assert ship.ship(run, saes, {"k32": old}) == new
    assert {layer: ship.digest(saes / "k32" / f"layer_{layer}") for layer in (6, 15)} == old
    assert (saes / "layer_6" / "README.md").read_text() == "# seed 16\n"
    monkeypatch.setattr(pretrained, "_root", lambda model: saes)
    monkeypatch.setitem(pretrained.SHIPPED_VERSIONS, "smollm2-135m-instruct", {"k32": old, "k64": new})
    assert pretrained.shipped_version_path("k32", 15) == saes / "k32" / "layer_15"
    assert pretrained.shipped_version_path("k64", 15) == saes / "layer_15"


def test_ship_refuses_an_unfinished_run_or_an_unpinned_sae(tmp_path: Path) -> None:
    ship = _script()
    saes, run = tmp_path / "saes", tmp_path / "run"
    _folder(saes / "layer_6", 1, 6)
    (run / "layer_6").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"lacks cfg\.json"):
        ship.ship(run, saes, {})
    _folder(run / "layer_6", 2, 6)
    with pytest.raises(SystemExit, match="no pinned version"):
        ship.ship(run, saes, {"k32": {6: "0" * 64}})
    assert (saes / "layer_6").is_dir() and not (saes / "k32").exists(), "nothing moved"
