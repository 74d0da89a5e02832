"""Model parallel: a model loaded through accelerate's device map scores as the plain load; SAE placement."""

from __future__ import annotations

import json

import torch

from gradsae.cli import main
from gradsae.models import load_model, sae_device
from gradsae.objectives import NextTokenProb
from gradsae.sae_formats import save_sae
from gradsae.scores import ScoreOptions, score_latents
from tests.helpers import save_tiny_hf, tiny_lm, tiny_sae


def test_device_map_load_scores_as_the_plain_load(tmp_path):
    folder = save_tiny_hf(tmp_path / "model", seed=1)
    plain, mapped = load_model(folder), load_model(folder, device_map="auto")  # one CPU: everything on it
    ids, mask = plain.tokenizer(["hello there"], return_tensors="pt").values()
    sae = tiny_sae("topk", layer=1)
    a = score_latents(
        plain, sae, {"input_ids": ids, "attention_mask": mask}, NextTokenProb(), options=ScoreOptions(layer=1)
    )
    b = score_latents(
        mapped,
        sae.to(sae_device(mapped, 1)),
        {"input_ids": ids.to(mapped.device), "attention_mask": mask},
        NextTokenProb(),
        options=ScoreOptions(layer=1),
    )
    assert torch.allclose(a.per_latent, b.per_latent, rtol=1e-5, atol=1e-9)
    out = tmp_path / "out.json"
    save_sae(tiny_sae("topk", layer=1), tmp_path / "sae")
    argv = ["score", "--model", str(folder), "--sae", str(tmp_path / "sae"), "--prompt", "hi", "--no-chat"]
    assert main([*argv, "--device-map", "auto", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"]


def test_sae_goes_where_its_residual_is():
    lm = tiny_lm(layers=3)
    lm.layers[1].to("meta")  # a block on another device
    meta, cpu = torch.device("meta"), torch.device("cpu")
    assert sae_device(lm, 1) == meta  # resid_post: the block's output
    assert sae_device(lm, 2, "resid_pre") == meta  # resid_pre: the previous block's output
    assert sae_device(lm, 1, "resid_pre") == cpu
    assert sae_device(lm, 0, "resid_pre") == lm.device == cpu  # the embeddings
    assert sae_device(lm, 2) == cpu
