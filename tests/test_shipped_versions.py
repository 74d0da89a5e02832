"""Named shipped SAEs (``--sae shipped:k32``): pinned by digest, found where they were moved, refused when absent."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gradsae import pretrained
from gradsae.cli import main
from gradsae.errors import GradSAEError
from gradsae.pretrained import SHIPPED_FOLDER, SHIPPED_VERSIONS, resolve_sae, shipped_sae_path, shipped_version_path
from gradsae.sae_formats import load_sae, save_sae
from tests.helpers import tiny_sae


def _fake_lm() -> object:
    return SimpleNamespace(name="smollm2", n_layers=30, d_model=576)


MODEL_OF = {SHIPPED_FOLDER: None, "gemma3-270m": "gemma3-270m"}
"""``saes/`` folder -> the ``--model`` name that selects it."""


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "sae_weights.safetensors").read_bytes()).hexdigest()


def test_every_pinned_version_is_installed_with_its_digest() -> None:
    """Each name of :data:`SHIPPED_VERSIONS` loads, at each of its layers, weights with the pinned digest."""
    assert set(SHIPPED_VERSIONS) == set(MODEL_OF)
    for folder, versions in SHIPPED_VERSIONS.items():
        for name, by_layer in versions.items():
            for layer, digest in by_layer.items():
                assert _digest(shipped_version_path(name, layer, MODEL_OF[folder])) == digest, (folder, name, layer)
    for layer in SHIPPED_VERSIONS[SHIPPED_FOLDER]["k32"]:
        assert load_sae(shipped_version_path("k32", layer)).cfg.k == 32


def test_the_default_saes_are_a_pinned_version() -> None:
    """Whatever ships at the default path is pinned under a name, so a later release can still load it."""
    for folder, model in MODEL_OF.items():
        for layer in pretrained.shipped_layers(model):
            pinned = {by_layer.get(layer) for by_layer in SHIPPED_VERSIONS[folder].values()}
            assert _digest(shipped_sae_path(layer, model)) in pinned, (folder, layer)  # type: ignore[arg-type]


def _current(layer: int) -> str:
    """The version name pinned to the default SAE at ``layer`` of the default model."""
    digest = _digest(shipped_sae_path(layer))  # type: ignore[arg-type]
    return next(n for n, by_layer in SHIPPED_VERSIONS[SHIPPED_FOLDER].items() if by_layer.get(layer) == digest)


def test_resolve_sae_loads_a_named_version_and_says_so() -> None:
    default = resolve_sae(_fake_lm(), None, 15)  # type: ignore[arg-type]
    current = resolve_sae(_fake_lm(), f"shipped:{_current(15)}", 15)  # type: ignore[arg-type]
    assert current.layer == 15 and current.label.endswith(f", shipped:{_current(15)}")
    assert current.label.startswith(default.label)
    assert all(
        torch.equal(a, b) for a, b in zip(current.sae.state().values(), default.sae.state().values(), strict=True)
    )
    k32 = resolve_sae(_fake_lm(), "shipped:k32", 15)  # type: ignore[arg-type]
    assert k32.label.endswith(", shipped:k32") and k32.sae.cfg.k == 32


def test_a_replaced_version_is_found_in_its_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once newer SAEs ship at the default path and k32 moves to ``k32/``, shipped:k32 still loads k32."""
    root = tmp_path / SHIPPED_FOLDER
    shutil.copytree(shipped_version_path("k32", 6), root / "k32" / "layer_6")  # wherever this install keeps it
    save_sae(tiny_sae("topk", d_sae=48, layer=6), root / "layer_6")  # the newer one at the default path
    monkeypatch.setattr(pretrained, "_root", lambda model: root)
    assert shipped_version_path("k32", 6) == root / "k32" / "layer_6"
    shutil.rmtree(root / "k32")
    with pytest.raises(GradSAEError, match="shipped:k32 at layer 6 is not in this install"):
        shipped_version_path("k32", 6)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["score", "--sae", "shipped:k99", "--prompt", "hi"], "no shipped SAEs of that name"),
        (["eval-sae", "--sae", "shipped:k32", "--layers", "9", "--out", "o"], "has no SAE at layer 9"),
        (["eval-sae", "--sae", "shipped:k32", "--out", "o", "--cards"], "--cards writes into the SAE folders"),
        (
            ["eval-sae", "--model", "gemma3-270m", "--sae", "shipped:k32", "--layers", "9", "--out", "o"],
            "no shipped SAEs of that name",
        ),
    ],
)
def test_bad_names_are_refused_in_one_line(argv: list[str], message: str, capsys, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
