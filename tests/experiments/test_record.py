"""examples.json: the per-example dump agrees with a fresh scoring of the same input."""

from __future__ import annotations

import torch

from gradsae.experiments.record import record_scores
from gradsae.experiments.results import ExampleDump
from gradsae.objectives import NextTokenProb
from gradsae.scores import ScoreOptions, score_methods


def test_dump_reads_back(tiny_run):
    assert ExampleDump.load(tiny_run.folder) == tiny_run.dump
    part = tiny_run.dump.layer(0)
    assert part is not None and len(part.examples) == tiny_run.results.layers[0].n_kept


def _rescore(tiny_run, record):
    """The record's input scored again, alone (no padding): the per-token values must be the same."""
    tok = tiny_run.lm.tokenizer
    ids = torch.tensor([[tok.get_vocab().get(t, 0) if len(t) > 1 else ord(t) for t in record.tokens]])
    ids[0, 0] = tok.bos_token_id
    by = score_methods(
        tiny_run.lm,
        tiny_run.sae,
        ids,
        torch.ones_like(ids),
        NextTokenProb(),
        methods=("gradsae", "activation"),
        options=ScoreOptions(layer=0, mode="replace"),
    )
    return ids, by


def test_per_token_values_and_topk_match_a_fresh_scoring(tiny_run):
    record = tiny_run.dump.layers[0].examples[0]
    _, by = _rescore(tiny_run, record)
    assert record.objective == float(by["gradsae"].objective[0])
    assert [c for c, _ in record.top["gradsae"]] == by["gradsae"].ranking(0)[: len(record.top["gradsae"])].tolist()
    dense_inf = by["gradsae"].per_token().to_dense()[0]
    dense_act = by["activation"].per_token().to_dense()[0]
    for trace in record.traces:
        active = torch.nonzero(dense_act[:, trace.latent] > 0).squeeze(-1).tolist()
        assert list(trace.positions) == active
        for n, act, inf in zip(trace.positions, trace.activation, trace.influence, strict=True):
            assert abs(act - float(dense_act[n, trace.latent])) <= 1e-4 * abs(act) + 1e-9
            assert abs(inf - float(dense_inf[n, trace.latent])) <= 1e-4 * abs(inf) + 1e-12


def test_masked_answers_are_kept_per_condition(tiny_run):
    for record in tiny_run.dump.layers[0].examples:
        assert record.masked["none"] == record.answer  # K = 0 measured on the kept set reproduces the answer
        assert {"gradsae/top/1", "activation/top/3", "random/bottom/50%"} <= set(record.masked)
        assert len(record.tokens) >= record.prompt_len
        assert {t.latent for t in record.traces} == {c for rows in record.top.values() for c, _ in rows}


def test_record_scores_for_one_prompt(tiny_run):
    record = tiny_run.dump.layers[0].examples[0]
    ids, by = _rescore(tiny_run, record)
    single = record_scores(tiny_run.lm.tokenizer, ids, torch.ones_like(ids), by, top=2)
    assert single.tokens == record.tokens
    assert [c for c, _ in single.top["gradsae"]] == [c for c, _ in record.top["gradsae"][:2]]


def test_every_ranking_method_of_the_run_is_kept(five_methods):
    """--methods gradsae,activation,random,ig,relp: each example keeps all five TopK sets with their scores."""
    from tests.experiments.conftest import FIVE

    _lm, _sae, dump = five_methods
    (part,) = dump.layers
    assert part.examples
    for record in part.examples:
        assert set(record.top) == set(FIVE)
        traced = {t.latent: t for t in record.traces}
        assert set(traced) == {c for rows in record.top.values() for c, _ in rows}
        for method, rows in record.top.items():
            assert 1 <= len(rows) <= 3 and all(score > 0 for _, score in rows)
            assert [s for _, s in rows] == sorted((s for _, s in rows), reverse=True)
            assert all(traced[c].scores[method] == score for c, score in rows)
        for trace in traced.values():
            assert set(trace.scores) == set(FIVE) and set(trace.token_scores) == {"ig", "relp"}
            assert all(len(v) == len(trace.positions) for v in trace.token_scores.values())


def test_estimator_topk_and_per_token_values_match_a_fresh_scoring(five_methods):
    """The recorded ig / relp TopK and per-token attributions are those of the input scored again, alone."""
    lm, sae, dump = five_methods
    record = dump.layers[0].examples[0]
    tok = lm.tokenizer
    ids = torch.tensor([[tok.get_vocab().get(t, 0) if len(t) > 1 else ord(t) for t in record.tokens]])
    ids[0, 0] = tok.bos_token_id
    by = score_methods(
        lm,
        sae,
        ids,
        torch.ones_like(ids),
        NextTokenProb(),
        methods=("ig", "relp"),
        options=ScoreOptions(layer=0, mode="error", ig_steps=4),
    )
    for method in ("ig", "relp"):
        fresh = by[method]
        assert [c for c, _ in record.top[method]] == fresh.ranking(0)[: len(record.top[method])].tolist()
        dense = fresh.per_token().to_dense()[0]
        for trace in record.traces:
            for n, value in zip(trace.positions, trace.token_scores[method], strict=True):
                assert abs(value - float(dense[n, trace.latent])) <= 1e-4 * abs(value) + 1e-9
