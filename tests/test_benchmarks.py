"""The benchmark's workloads on the tiny model: the fast paths equal the straightforward ones, and every timing runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from benchmarks import core
from benchmarks.common import compare
from benchmarks.memory import peak_above_baseline
from benchmarks.reference import agreement, our_pipeline, reference_pipeline

from gradsae.models import LoadedModel
from gradsae.objectives import NextTokenProb
from gradsae.scores import forward_backward
from gradsae.tasks import Example, Task
from tests.helpers import CharTokenizer, padded_batch, tiny_lm, tiny_sae


def sharp_lm(dtype: torch.dtype = torch.float64, vocab: int = 64) -> LoadedModel:
    """The tiny Llama with its matrices scaled up, so that greedy tokens vary from step to step."""
    lm = tiny_lm(dtype, vocab=vocab, tokenizer=CharTokenizer())
    with torch.no_grad():
        for param in lm.model.parameters():
            if param.ndim == 2:
                param.mul_(20)
    return lm


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_reference_pipeline_equals_ours(activation: str) -> None:
    lm = sharp_lm()
    sae = tiny_sae(activation, dtype=torch.float64)
    ids, mask = padded_batch()
    ref = reference_pipeline(lm, sae, ids, mask, 0, 8)
    ours = our_pipeline(lm, sae, ids, mask, 0, 8)
    assert ref.tokens.shape == (2, 8)
    assert len(set(ref.tokens[0].tolist())) > 2, "the tokens should vary, else the check is weak"
    check = agreement(ours, ref)
    assert check["same_tokens"] and check["same_top_latent"]
    assert check["max_rel_score_diff"] < 1e-10
    assert torch.allclose(ours.scores, ref.scores, rtol=1e-9, atol=1e-14)


def test_plain_backward_is_the_gradient_at_the_splice() -> None:
    """With no edits, error mode leaves the model unchanged, so both baselines take the same gradient."""
    lm = sharp_lm()
    sae = tiny_sae("relu", dtype=torch.float64)
    ids, mask = padded_batch()
    plain = core.plain_forward_backward(lm, ids, mask, 0)
    run = forward_backward(lm, sae, ids, mask, NextTokenProb(), layer=0, mode="error", grad=True)
    assert run.grad is not None
    assert torch.allclose(plain, run.grad, rtol=1e-9, atol=1e-12)


def test_every_timing_runs_on_the_tiny_model() -> None:
    lm = sharp_lm(torch.float32, vocab=128)
    sae = tiny_sae("topk")
    ids, mask = padded_batch()
    figures = core.score_overhead(lm, sae, ids, mask, 0, repeats=1)
    figures += core.speedup_vs_reference(lm, sae, ids, mask, 0, n_new=4, repeats=1, slow_repeats=1)
    figures += core.speedup_vs_ablation(lm, sae, ids, mask, 0, repeats=1, slow_repeats=1)
    examples = tuple(Example(id=str(i), prompt=p, answers=("x",)) for i, p in enumerate(["abc def", "hello", "zz"]))
    task = Task("tiny", "{prompt}", examples, max_new_tokens=3, metric="squad")
    figures += core.perturb_condition_cost(lm, sae, task, 0, repeats=1)
    by_name = {figure.name: figure for figure in figures}
    assert all(f.value is not None and f.value == f.value for f in figures), [f.line() for f in figures]
    assert by_name["reference_check"].extra["same_tokens"]
    for name in ("score_overhead_vs_floor", "answer_overhead_vs_floor"):
        assert by_name[name].target is not None and by_name[name].floor, name
    assert by_name["speedup_vs_reference"].extra["ceiling"] > 0, "the plain decode's time is measured beside ours"
    assert by_name["perturb_condition_cost_single"].extra["same_tokens_reuse_vs_no_reuse"]
    assert by_name["perturb_condition_cost"].extra["same_answers_as_one_at_a_time"]["same_answers"]
    assert -1.0 <= by_name["spearman_vs_ablation"].value <= 1.0  # type: ignore[operator]
    assert all(f.line().startswith(f"{f.name}: ") for f in figures)


def test_compare_interleaves_and_counts() -> None:
    calls: list[str] = []
    times = compare(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, {"a": 3, "b": 1}, warmup={"a": 1, "b": 0}
    )
    assert calls == ["a", "a", "b", "a", "a"]
    assert len(times["a"].runs) == 3 and len(times["b"].runs) == 1


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_above_baseline_sees_a_temporary() -> None:
    def allocate() -> None:
        block = torch.ones(16 * 2**20 // 4 * 4)  # 64 MiB, touched
        del block

    _baseline, peak = peak_above_baseline(allocate)
    assert 48 * 1024 <= peak < 512 * 1024


def test_demo_figure_without_a_run(tmp_path: Path) -> None:
    assert core.demo_wall(False, tmp_path).value is None
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "timing.json").write_text('{"total_s": 61.5}')
    assert core.demo_wall(False, tmp_path).value == 61.5
    assert core.demo_wall(False, tmp_path).met is True and core.demo_wall(False, tmp_path).target == 120


def test_same_layers_compares_every_cell(tmp_path: Path) -> None:
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    new.write_text('{"layers": [{"layer": 6, "cells": [1, 2]}], "timing": 1}')
    assert core._same_layers(new, old) is None
    old.write_text('{"layers": [{"layer": 6, "cells": [1, 2]}], "timing": 2}')
    assert core._same_layers(new, old) is True
    old.write_text('{"layers": [{"layer": 6, "cells": [1, 3]}]}')
    assert core._same_layers(new, old) is False


def test_nnsight_version_equals_ours() -> None:
    backward = torch.Tensor.backward
    try:
        nnsight = pytest.importorskip("nnsight")  # importing it replaces torch.Tensor.backward
        from benchmarks.with_nnsight import nnsight_scores

        lm = sharp_lm()
        sae = tiny_sae("jumprelu", dtype=torch.float64)
        ids, mask = padded_batch()
        theirs = nnsight_scores(nnsight.NNsight(lm.model), sae, ids, mask, 0)
    finally:
        torch.Tensor.backward = backward  # type: ignore[method-assign]
    ours = core.gradsae_scores(lm, sae, ids, mask, 0).per_latent
    assert torch.allclose(theirs, ours, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_dense_encode_floor_computes_the_encoders_values(activation: str) -> None:
    """The floor does the encoder's whole work: TopK's values are those of ``sae.encode``."""
    sae = tiny_sae(activation, d_sae=48, dtype=torch.float64)
    x = torch.randn(9, 16, dtype=torch.float64)
    got = core.dense_encode(sae, x, budget=9 * 10)  # blocks of 10 latents: the merge across blocks is exercised
    dense = sae.encode(x)
    if activation == "topk":
        want = sae.pre_acts(x).topk(int(sae.cfg.k or 0), dim=-1).values
        assert torch.allclose(got.sort(dim=-1).values, want.sort(dim=-1).values)
        assert torch.allclose(torch.relu(got).sum(-1), dense.sum(-1))
    else:
        assert torch.allclose(got, dense[:, 40:])


def test_layer_residuals_are_the_spliced_positions() -> None:
    lm = sharp_lm()
    ids, mask = padded_batch()
    got = core.layer_residuals(lm, ids, mask, 0)
    assert got.shape == (int(mask.sum()) - 2, lm.d_model)  # every real token but each row's first


def test_answer_floor_reads_the_same_objective_as_an_uncached_forward() -> None:
    """The plain cached decode with the graph kept: Y equals p(greedy) of one uncached pass over prompt + tokens."""
    from benchmarks.reference import plain_decode_with_graph

    from gradsae.models import position_ids

    lm = sharp_lm()
    ids, mask = padded_batch()
    tokens = torch.randint(3, 60, (2, 5))
    y = plain_decode_with_graph(lm, ids, mask, 0, tokens)
    full = torch.cat([ids, tokens[:, :-1]], dim=1)
    full_mask = torch.cat([mask, mask.new_ones(2, 4)], dim=1)
    with torch.no_grad():
        logits = lm.model(input_ids=full, attention_mask=full_mask, position_ids=position_ids(full_mask)).logits
    want = torch.softmax(logits[:, -1], dim=-1).max(dim=-1).values
    assert torch.allclose(y, want, rtol=1e-9)


def test_long_prompt_figures_read_the_longest_row() -> None:
    from benchmarks.scaling import long_prompt_figures

    rows = [
        {
            "axis": "length",
            "tokens": n,
            "d_sae": 8,
            "gradsae_s": 1.1 * n,
            "plain_s": n,
            "gradsae_peak_mib": 2.0 * n,
            "plain_peak_mib": 1.0 * n,
        }
        for n in (64, 8192)
    ] + [
        {
            "axis": "width",
            "tokens": 99999,
            "d_sae": 9,
            "gradsae_s": 5,
            "plain_s": 1,
            "gradsae_peak_mib": 1,
            "plain_peak_mib": 1,
        }
    ]
    time_figure, memory_figure = long_prompt_figures(rows)
    assert time_figure.value == pytest.approx(1.1) and time_figure.met
    assert memory_figure.value == pytest.approx(2.0) and memory_figure.met is False
    assert "8192" in time_figure.floor


def test_dp_prompt_file_has_distinct_lines() -> None:
    from benchmarks.dp import prompt_lines

    lines = prompt_lines(6, 20)
    assert len(set(lines)) == 6 and all(len(line.split()) == 20 and "\n" not in line for line in lines)
