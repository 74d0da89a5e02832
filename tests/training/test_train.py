"""SAE training, activation streaming and evaluation on a tiny random Llama."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import gradsae
from gradsae.cli.common import parse_count
from gradsae.cli.train_sae import add_arguments as add_train_sae_arguments
from gradsae.errors import GradSAEError
from gradsae.models import LoadedModel
from gradsae.sae import SAE, SAEConfig
from gradsae.sae_formats import load_sae
from gradsae.training.activations import StreamConfig, activation_blocks, load_texts, sequences, split_heldout
from gradsae.training.evaluate import evaluate_saes
from gradsae.training.export import finish_run
from gradsae.training.loop import kept_checkpoint, train_saes
from gradsae.training.trainer import LayerTrainer, TrainConfig, sae_loss
from tests.helpers import CharTokenizer, char_lm

D_MODEL = 32


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return char_lm(hidden=D_MODEL, intermediate=64, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    words = ["the cat", "a dog", "sat on", "the mat", "ran far", "and then", "slept", "news of the day"]
    gen = torch.Generator().manual_seed(1)
    return [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=gen)) for _ in range(40)]


def tiny_cfg(**kw: object) -> TrainConfig:
    base = TrainConfig(
        layers=(0, 1),
        width=64,
        k=4,
        tokens=4800,
        lr=3e-3,
        sae_batch=32,
        warmup_tokens=320,
        dead_tokens=2000,
        context=16,
        batch=8,
        buffer=16,
        model_name="tiny",
        checkpoint_seconds=1e9,
    )
    return replace(base, **kw)


@pytest.fixture(scope="module")
def trained(lm: LoadedModel, texts: list[str]):
    return train_saes(lm, texts, tiny_cfg(), progress=False)


def held_out_acts(lm: LoadedModel, texts: list[str]) -> dict[int, torch.Tensor]:
    block = next(activation_blocks(lm, texts, [0, 1], StreamConfig(context=16, batch=8, buffer=16, seed=99)))
    return block.acts


def test_training_reduces_loss(lm, texts, trained) -> None:
    acts = held_out_acts(lm, texts)
    none = torch.zeros(64, dtype=torch.bool)
    for layer in (0, 1):
        start = LayerTrainer.create(tiny_cfg(), layer, D_MODEL).sae
        with torch.no_grad():
            start.b_dec.copy_(acts[layer].mean(0))
            before = sae_loss(start, acts[layer], dead=none, aux_k=16, aux_coef=0).fvu
            after = sae_loss(trained.saes[layer], acts[layer], dead=none, aux_k=16, aux_coef=0).fvu
        assert after < 0.6 * before, (layer, before, after)
    assert trained.finished and trained.tokens == 4800


def test_decoder_rows_stay_unit_norm(trained) -> None:
    for sae in trained.saes.values():
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5, rtol=0)


def test_auxk_revives_a_dead_latent() -> None:
    gen = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(48, 16, generator=gen), dim=-1)

    def sample() -> torch.Tensor:
        codes = torch.rand(128, 48, generator=gen) * (torch.rand(128, 48, generator=gen) < 0.08)
        return codes @ atoms

    def run(aux_coef: float) -> int:
        cfg = TrainConfig(layers=(0,), width=32, k=4, lr=1e-2, warmup_tokens=1, dead_tokens=500, aux_coef=aux_coef)
        trainer = LayerTrainer.create(cfg, 0, 16)
        with torch.no_grad():  # latent 0 reads its direction far too weakly to beat the others into the top k
            trainer.sae.W_enc[:, 0] *= 1e-3
            trainer.sae.b_enc[1:] = 1.0
        trainer.since_fired[0] = 10**6
        fired = 0
        for _ in range(60):
            out = trainer.step(sample(), lr=cfg.lr or 0.0, cfg=cfg)
            trainer.record_firing(out.fired, 128)
            fired += int(out.fired[0])
        return fired

    assert run(aux_coef=0.0) == 0
    assert run(aux_coef=1 / 32) > 0


def test_resume_matches_uninterrupted_run(lm, texts, trained, tmp_path) -> None:
    calls = {"n": 0}

    def stop_soon() -> bool:
        calls["n"] += 1
        return calls["n"] == 23

    path = tmp_path / "checkpoint.pt"
    first = train_saes(lm, texts, tiny_cfg(), checkpoint=path, should_stop=stop_soon, progress=False)
    assert not first.finished and 0 < first.tokens < 4800
    second = train_saes(lm, texts, tiny_cfg(), checkpoint=path, progress=False)
    assert second.finished and second.tokens == 4800
    for layer in (0, 1):
        for name, value in trained.saes[layer].state_dict().items():
            assert torch.equal(value, second.saes[layer].state_dict()[name]), (layer, name)
    with pytest.raises(GradSAEError, match="k=4"):
        train_saes(lm, texts, tiny_cfg(k=8), checkpoint=path, progress=False)


def test_a_kept_checkpoint_branches_a_shorter_runs_decay(lm, texts, trained, tmp_path) -> None:
    """Resuming the state kept at 80% of a shorter budget ends where that budget's own run ends."""
    trunk = train_saes(
        lm, texts, tiny_cfg(keep_checkpoints=(1920,)), checkpoint=tmp_path / "checkpoint.pt", progress=False
    )
    kept = kept_checkpoint(tmp_path / "checkpoint.pt", 1920)
    assert kept.name == "checkpoint-1920.pt" and kept.is_file()
    branch = tmp_path / "branch" / "checkpoint.pt"
    branch.parent.mkdir()
    shutil.copy(kept, branch)
    short = train_saes(lm, texts, tiny_cfg(tokens=2400), checkpoint=branch, progress=False)
    direct = train_saes(lm, texts, tiny_cfg(tokens=2400), progress=False)
    assert short.tokens == direct.tokens == 2400
    for layer in (0, 1):
        for name, value in direct.saes[layer].state_dict().items():
            assert torch.equal(value, short.saes[layer].state_dict()[name]), (layer, name)
            assert torch.equal(trained.saes[layer].state_dict()[name], trunk.saes[layer].state_dict()[name])


def test_evaluation_and_files(lm, texts, trained, tmp_path) -> None:
    ids = torch.tensor([next(iter(sequences(lm.tokenizer, texts, context=16)))] * 4)
    evals = finish_run(lm, trained, tiny_cfg(), texts[:5], out=tmp_path, save_dtype=torch.float16, eval_tokens=150)
    res = evals[1]
    assert res.tokens == 150 and res.ce_zero != res.ce_clean and 0 < res.l0 <= 4 and 0 <= res.dead_fraction <= 1
    loaded = load_sae(tmp_path / "layer_1")
    assert loaded.W_dec.dtype == torch.float32 and loaded.cfg.hook_layer == 1  # fp16 file, float32 cfg.json dtype
    assert loaded.cfg.metadata["eval"]["fvu"] == pytest.approx(res.fvu)
    assert json.loads((tmp_path / "layer_1" / "eval.json").read_text())["ce_recovered"] == pytest.approx(
        res.ce_recovered
    )
    assert "CE loss recovered" in (tmp_path / "layer_1" / "README.md").read_text()
    core = json.loads((tmp_path / "layer_1" / "saebench_core.json").read_text())
    assert core["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"] == res.ce_recovered
    perfect = evaluate_saes(lm, {0: _exact_sae()}, ids, batch=2)[0]
    assert perfect.fvu == pytest.approx(0, abs=1e-6) and perfect.ce_recovered == pytest.approx(1, abs=1e-5)


def _exact_sae() -> SAE:
    """A ReLU SAE with latents ``[x, -x]`` that reconstructs every input exactly."""
    sae = SAE(SAEConfig(d_in=D_MODEL, d_sae=2 * D_MODEL, activation="relu"))
    eye = torch.eye(D_MODEL)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def test_corpora(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("one doc\n\nanother doc\n")
    assert load_texts(tmp_path / "a.txt") == ["one doc", "another doc"]
    (tmp_path / "a.jsonl").write_text('{"body": "x y"}\n{"body": "z"}\n')
    assert load_texts(tmp_path / "a.jsonl", column="body") == ["x y", "z"]
    with pytest.raises(GradSAEError, match="--column"):
        load_texts(tmp_path / "a.jsonl")
    (tmp_path / "a.csv").write_text("id,text\n1,hello\n2,world\n")
    assert load_texts(tmp_path / "a.csv") == ["hello", "world"]
    with pytest.raises(GradSAEError, match="unknown type"):
        (tmp_path / "a.xml").write_text("<x/>")
        load_texts(tmp_path / "a.xml")
    train, held = split_heldout([str(i) for i in range(40)])
    assert held == ["0", "20"] and len(train) == 38


def test_sequences_skip_nothing_and_start_with_bos(texts) -> None:
    stream = sequences(CharTokenizer(), texts, context=16, seed=3)
    rows = [next(stream) for _ in range(50)]
    assert all(len(row) == 16 and row[0] == 1 for row in rows)
    assert sum(row[1:].count(2) for row in rows) > 0  # documents joined by EOS


def test_cli_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_train_sae_arguments(parser)
    args = parser.parse_args(["--layers", "6,15,24", "--tokens", "2.5M", "--width", "4608"])
    assert args.tokens == 2_500_000 and args.layers == "6,15,24" and parse_count("500k") == 500_000
    kept = parser.parse_args(["--keep-checkpoints", "400k,100k"]).keep_checkpoints
    assert kept == (100_000, 400_000) and parser.parse_args([]).keep_checkpoints == ()


def test_sparse_backward_matches_dense_autograd() -> None:
    torch.manual_seed(0)
    sae = SAE.random(SAEConfig(d_in=16, d_sae=64, activation="topk", k=4, apply_b_dec_to_input=True), seed=1)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(50, 16)
    dead = torch.arange(64) < 20
    sae_loss(sae, x, dead=dead, aux_k=8, aux_coef=0.5).loss.backward()
    sparse = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, indices = pre.topk(4)
    h = torch.zeros_like(pre).scatter(1, indices, torch.relu(values))
    error = x - (h @ sae.W_dec + sae.b_dec)
    total = (x - x.mean(0)).pow(2).sum()
    aux_values, aux_indices = pre.masked_fill(~dead, -torch.inf).topk(8)
    h_aux = torch.zeros_like(pre).scatter(1, aux_indices, torch.relu(aux_values))
    aux = (error.detach() - h_aux @ sae.W_dec).pow(2).sum() / total
    (error.pow(2).sum() / total + 0.5 * aux).backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse[name], p.grad, atol=1e-5, rtol=1e-4)


SHIPPED = Path(gradsae.__file__).parent / "saes" / "smollm2-135m-instruct"


@pytest.mark.parametrize("layer", [6, 15, 24])
def test_shipped_saes_load_with_their_figures(layer: int) -> None:
    folder = SHIPPED / f"layer_{layer}"
    if not folder.exists():
        pytest.skip(f"{folder} not trained yet")
    sae = load_sae(folder)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.hook_layer) == (576, 4608, layer)
    assert f"TopK with k = {sae.cfg.k}," in (folder / "README.md").read_text()  # the card states the shipped k
    assert sae.W_dec.dtype == torch.float32 and sae.cfg.apply_b_dec_to_input  # fp16 file, float32 cfg.json dtype
    torch.testing.assert_close(sae.W_dec.float().norm(dim=-1), torch.ones(4608), atol=2e-3, rtol=0)
    figures = json.loads((folder / "eval.json").read_text())
    assert figures == sae.cfg.metadata["eval"] and figures["layer"] == layer
    assert f"{figures['fvu']:.3f}" in (folder / "README.md").read_text()
