"""Which shipped SAE serves which embedded model's name."""

from __future__ import annotations

import pytest

from gradsae.pretrained import SHIPPED_FOLDER, shipped_folder, shipped_label, shipped_layers, shipped_sae_path
from gradsae.sae_formats import save_sae


@pytest.mark.parametrize(
    ("model", "folder"),
    [(None, SHIPPED_FOLDER), ("smollm2", SHIPPED_FOLDER), ("gemma3-270m", "gemma3-270m"), ("gemma3", "gemma3-270m")],
)
def test_embedded_names_have_a_folder(model: str | None, folder: str) -> None:
    assert shipped_folder(model) == folder


def test_other_models_have_none(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert shipped_folder(str(tmp_path)) is None and shipped_folder("Qwen/Qwen2.5-0.5B") is None
    assert shipped_sae_path(6, str(tmp_path)) is None and shipped_layers(str(tmp_path)) == ()


def test_the_default_model_s_layers() -> None:
    assert shipped_layers() == (6, 15, 24)
    assert shipped_sae_path(6) is not None and shipped_sae_path(6).parent.name == SHIPPED_FOLDER  # type: ignore[union-attr]


def test_a_layer_of_one_model_does_not_serve_another() -> None:
    assert shipped_sae_path(6, "gemma3-270m") is None, "SmolLM2's layer-6 SAE is not Gemma's"
    assert 6 not in shipped_layers("gemma3-270m")


def test_the_label_says_which_sae_shipped_there() -> None:
    import hashlib

    path = shipped_sae_path(6)
    assert path is not None
    digest = hashlib.sha256((path / "sae_weights.safetensors").read_bytes()).hexdigest()[:12]
    label = shipped_label(path)
    assert label.startswith(f"shipped SAE {SHIPPED_FOLDER}/layer_6 (") and f"sha256 {digest})" in label


def test_resolve_saes_fills_the_layer_template_and_checks_each_sae(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gradsae.errors import GradSAEError
    from gradsae.pretrained import resolve_saes, sae_folder
    from tests.helpers import tiny_lm, tiny_sae

    assert sae_folder("saes/l{layer}", 3) == "saes/l3" and sae_folder("saes/l{layer}", None) == "saes/l{layer}"
    assert sae_folder(None, 3) is None
    lm = tiny_lm()
    for layer in (0, 1):
        save_sae(tiny_sae(layer=layer, seed=layer), tmp_path / f"l{layer}")
    found = resolve_saes(lm, str(tmp_path / "l{layer}"), [1, 0])
    assert [f.layer for f in found] == [1, 0] and found[0].label != found[1].label
    with pytest.raises(GradSAEError):
        resolve_saes(lm, str(tmp_path / "l{layer}"), [0, 99])
