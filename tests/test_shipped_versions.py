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


def test_k32_pins_the_sae_shipped_today_at_every_layer() -> None:
    for layer, digest in SHIPPED_VERSIONS[SHIPPED_FOLDER]["k32"].items():
        path = shipped_version_path("k32", layer)
        assert path == shipped_sae_path(layer), "while k32 is current, it is the default folder"
        assert hashlib.sha256((path / "sae_weights.safetensors").read_bytes()).hexdigest() == digest
        assert load_sae(path).cfg.k == 32
    assert shipped_version_path("news", 9, "gemma3-270m") == shipped_sae_path(9, "gemma3-270m")


def test_resolve_sae_loads_a_named_version_and_says_so() -> None:
    found = resolve_sae(_fake_lm(), "shipped:k32", 15)  # type: ignore[arg-type]
    default = resolve_sae(_fake_lm(), None, 15)  # type: ignore[arg-type]
    assert found.layer == 15 and found.label.endswith(", shipped:k32") and found.label.startswith(default.label)
    assert all(torch.equal(a, b) for a, b in zip(found.sae.state().values(), default.sae.state().values(), strict=True))


def test_a_replaced_version_is_found_in_its_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once newer SAEs ship at the default path and k32 moves to ``k32/``, shipped:k32 still loads k32."""
    root = tmp_path / SHIPPED_FOLDER
    shutil.copytree(shipped_sae_path(6), root / "k32" / "layer_6")  # type: ignore[arg-type]
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
