"""The steering evaluation: disjoint splits, selectors, metrics, the alpha choice, a tiny run, resuming, the freeze."""

from __future__ import annotations

import math
import shutil
from typing import Any

import pytest
import torch

from gradsae.errors import GradSAEError
from gradsae.experiments.concepts import (
    CONCEPTS,
    NEUTRAL_PROMPTS,
    NEUTRAL_TEXTS,
    choose_alpha,
    distinct_n,
    freeze_hash,
    journal_config,
    mean_nll,
    pick_latents,
    run_steering,
    selector_scores,
    split_prompts,
    steered_generations,
    sweep_edit,
)
from gradsae.experiments.journal import Journal
from gradsae.experiments.judges import concept_hits
from gradsae.experiments.results import (
    DEFAULT_ALPHAS,
    FREEZE,
    STEER_METHODS,
    Concept,
    Point,
    SteerConfig,
    SteerResult,
    second_seed,
)
from gradsae.experiments.stats import Stat
from gradsae.generate import generate
from gradsae.models import LoadedModel
from gradsae.report.concepts import headline, markdown, render
from gradsae.steer import arad_output_scores, top_latents
from tests.helpers import char_lm, tiny_sae

CONCEPT = Concept(
    name="abc",
    words=("ab", "cd"),
    texts=("ab cd ab", "cd ab"),
    negatives=("xy zz", "qq rr"),
    judge="positive",
)


@pytest.fixture(scope="module")
def lively() -> LoadedModel:
    """A char-level random Llama with large weights (greedy text varies) and a long context."""
    return char_lm(hidden=32, intermediate=64, heads=4, kv_heads=2, max_positions=512, init_range=0.3)


def test_splits_are_disjoint_and_eval_is_fixed():
    split = split_prompts(NEUTRAL_PROMPTS, n_seed=4, n_heldout=6, n_eval=12, seed=0)
    sets = [set(split[name]) for name in ("seed", "heldout", "eval")]
    assert [len(s) for s in sets] == [4, 6, 12]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    other = split_prompts(NEUTRAL_PROMPTS, n_seed=2, n_heldout=9, n_eval=12, seed=0)
    assert other["eval"] == split["eval"]
    assert split_prompts(NEUTRAL_PROMPTS, n_seed=4, n_heldout=6, n_eval=12, seed=1)["eval"] != split["eval"]
    with pytest.raises(GradSAEError, match="repeats"):
        split_prompts(["a", "b", "a"], n_seed=1, n_heldout=1, n_eval=1, seed=0)
    with pytest.raises(GradSAEError, match="needed"):
        split_prompts(NEUTRAL_PROMPTS, n_seed=10, n_heldout=10, n_eval=10, seed=0)


def test_norm_zero_gives_the_unsteered_text(lively):
    sae = tiny_sae(d_sae=48, layer=1, d_in=32)
    texts = ["hello there", "a", "the quick brown fox"]
    plain = generate(lively, texts, max_new_tokens=12)
    zero = steered_generations(
        lively, sae, texts, sweep_edit(sae, [1, 5, 9], torch.ones(3), [0.0], rows=3), layer=1, budget=12
    )
    strong = steered_generations(
        lively, sae, texts, sweep_edit(sae, [1, 5, 9], torch.ones(3), [40.0], rows=3), layer=1, budget=12
    )
    assert [g.token_ids for g in zero] == [g.token_ids for g in plain]
    assert [g.token_ids for g in strong] != [g.token_ids for g in plain]  # the edit does act


@pytest.mark.parametrize("method", [*STEER_METHODS[:-1], "random-0"])
def test_each_selector_returns_k_distinct_latents(lively, method):
    sae = tiny_sae(d_sae=48, layer=1, d_in=32)
    cfg = SteerConfig(k=6, pool=10)
    latents = pick_latents(lively, sae, CONCEPT, method, layer=1, seeds=["hi", "tell me"], cfg=cfg)
    assert latents.shape == (6,) and len(set(latents.tolist())) == 6
    assert int(latents.min()) >= 0 and int(latents.max()) < 48


def test_arad_and_dtc_rank_the_activation_pool(lively):
    sae = tiny_sae(d_sae=48, layer=1, d_in=32)
    cfg = SteerConfig(k=3, pool=8)
    seeds = ["hi", "tell me"]
    pool = top_latents(selector_scores(lively, sae, CONCEPT, "activation", layer=1, seeds=seeds, cfg=cfg), 8)
    arad = pick_latents(lively, sae, CONCEPT, "arad", layer=1, seeds=seeds, cfg=cfg)
    dtc = pick_latents(lively, sae, CONCEPT, "dtc", layer=1, seeds=seeds, cfg=cfg)
    assert set(arad.tolist()) <= set(pool.tolist()) and set(dtc.tolist()) <= set(pool.tolist())
    scores = arad_output_scores(lively, sae, pool.tolist(), layer=1, amp=cfg.amplify)
    assert arad.tolist() == pool[scores.argsort(descending=True, stable=True)[:3]].tolist()


def test_random_draws_differ_by_draw_concept_and_seed(lively):
    sae, cfg = tiny_sae(d_sae=48, layer=1, d_in=32), SteerConfig(k=6)
    other = Concept(name="other", words=("x",))

    def draw(concept: Concept, run: str, seed: int) -> list[int]:
        return pick_latents(lively, sae, concept, run, layer=1, seeds=["hi"], cfg=cfg, seed=seed).tolist()

    first = draw(CONCEPT, "random-0", 0)
    assert first == draw(CONCEPT, "random-0", 0)
    assert first != draw(CONCEPT, "random-1", 0) and first != draw(other, "random-0", 0)
    assert first != draw(CONCEPT, "random-0", 1)
    assert SteerConfig(random_draws=5).runs()[-5:] == tuple(f"random-{d}" for d in range(5))


def test_text_metrics():
    assert concept_hits("The Wedding, the brides and a groomsman; weddings!", ["wedding", "weddings"]) == (2, 8)
    assert concept_hits("", ["a"]) == (0, 0)
    assert distinct_n([1, 2, 1, 2, 1, 2]) == pytest.approx(2 / 5)
    assert distinct_n([7]) == 1.0 and distinct_n([1, 2, 3, 4]) == 1.0


def test_mean_nll_is_the_teacher_forced_loss(lively):
    gens = generate(lively, ["hello", "ab cd"], max_new_tokens=6)
    got = mean_nll(lively, gens, batch_size=2)
    for gen, value in zip(gens, got, strict=True):
        ids = torch.tensor([gen.prompt_ids + gen.token_ids])
        logp = lively.model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        tail = logp[len(gen.prompt_ids) - 1 :].gather(-1, torch.tensor(gen.token_ids)[:, None])
        assert value == pytest.approx(-float(tail.mean()), abs=1e-5)


def _point(alpha: float, success: float, ppl: float, distinct: float) -> Point:
    def s(x: float) -> Stat:
        return Stat(mean=x, low=x, high=x, n=1)

    return Point("m", alpha, "heldout", s(success), s(0), s(ppl), s(distinct), (), (), ())


def test_choose_alpha_is_the_best_success_within_the_budget():
    cfg = SteerConfig(max_ppl_ratio=2.0, min_distinct_ratio=0.8)
    base = _point(0.0, 10, 5.0, 90)
    sweep = [_point(1, 20, 6, 90), _point(2, 50, 9.9, 80), _point(4, 90, 11, 90), _point(8, 95, 6, 50)]
    assert choose_alpha(sweep, base, cfg) == 2  # 4 is too perplexing, 8 too repetitive
    assert choose_alpha([_point(1, 10, 5, 90), _point(2, 5, 5, 90)], base, cfg) == 0.0  # nothing beats no steering
    assert choose_alpha([_point(1, 30, 5, 90), _point(2, 30, 5, 90)], base, cfg) == 1  # ties: the weaker


def test_config_refuses_bad_values():
    with pytest.raises(GradSAEError, match="pool"):
        SteerConfig(k=8, pool=4)
    with pytest.raises(GradSAEError, match="seeds"):
        SteerConfig(seeds=(1, 1))
    with pytest.raises(GradSAEError, match="methods"):
        SteerConfig(methods=("gradsae", "magic"))
    with pytest.raises(GradSAEError, match="positive"):
        SteerConfig(alphas=(0.0, 1.0))


TOPIC = Concept(name="topic", words=("ab", "e"), texts=("ab ab e",))


def tiny_config(**changes: Any) -> SteerConfig:
    base = {
        "k": 3,
        "alphas": (0.5, 4.0),
        "n_seed": 2,
        "n_heldout": 2,
        "n_eval": 3,
        "max_new_tokens": 6,
        "resamples": 50,
        "pool": 6,
        "random_draws": 2,
        "seeds": (0, 1),
    }
    return SteerConfig(**{**base, **changes})


def test_tiny_run_saves_loads_and_renders(lively, tmp_path):
    sae = tiny_sae(d_sae=48, layer=1, d_in=32)
    cfg = tiny_config()
    result = run_steering(lively, {1: (sae, "tiny")}, [TOPIC, CONCEPT], cfg, command="test")
    assert [(c.layer, c.seed) for c in result.cells] == [(1, 0), (1, 1)]
    runs = cfg.runs()
    assert runs == ("gradsae", "gradsae-target", "activation", "logit-lens", "arad", "dtc", "random-0", "random-1")
    for cell in result.cells:
        assert cell.resid_norm > 0 and set(cell.prompts["eval"]).isdisjoint(cell.prompts["heldout"])
        for run in cell.concepts:
            assert [m.method for m in run.methods] == list(runs)
            for method in run.methods:
                sweep = [p for p in method.points if p.split == "heldout"]
                assert [p.alpha for p in sweep] == list(cfg.alphas) and len(method.latents) == 3
                assert method.alpha in (0.0, *cfg.alphas)
                assert (method.point(method.alpha, "eval") is not None) == (method.alpha > 0)
                assert all(math.isfinite(p.ppl.mean) and 0 <= p.success.mean <= 100 for p in method.points)
    assert set(result.judges) == {"topic", "abc"} and result.judges["topic"]["good"]
    paths = render(result, tmp_path)
    assert [p.name for p in paths] == ["steering.json", "steering.md", "steering.png"]
    loaded = SteerResult.load(tmp_path / "steering.json")
    assert loaded == result
    text = markdown(loaded)
    assert "## `topic` (topic)" in text and "## Answer" in text and "Holm" in text and "logit-lens" in text
    assert headline(loaded) in text


def test_layers_that_reuse_the_prompts_are_one_unit_not_several(lively):
    """Every layer of a seed evaluates the same prompts: a second layer with the same outcomes must not double
    the units (nor shrink a p-value); each unit is the mean over its layers."""
    import dataclasses

    from gradsae.report.concepts import compare, unit_outcomes

    sae = tiny_sae(d_sae=48, layer=1, d_in=32)
    result = run_steering(lively, {1: (sae, "tiny")}, [TOPIC, CONCEPT], tiny_config(), command="test")
    copies = tuple(dataclasses.replace(cell, layer=2) for cell in result.cells)
    doubled = dataclasses.replace(result, cells=result.cells + copies)
    names = [c.name for c in (TOPIC, CONCEPT)]
    assert unit_outcomes(doubled, names) == unit_outcomes(result, names)
    one, two = compare(result, names), compare(doubled, names)
    assert two.units == one.units == len(result.cells) * len(names) * tiny_config().n_eval
    assert [(p.a, p.b, p.p, p.p_holm) for p in two.pairs] == [(p.a, p.b, p.p, p.p_holm) for p in one.pairs]


def test_a_journaled_run_resumes_to_the_same_bytes(lively, tmp_path):
    sae = tiny_sae(d_sae=48, layer=1, d_in=32)
    cfg = tiny_config(seeds=(0,), random_draws=1)
    config = journal_config(cfg, lively.name, {1: "tiny"}, [TOPIC])
    whole = run_steering(lively, {1: (sae, "tiny")}, [TOPIC], cfg, journal=Journal.open(tmp_path / "a", config))
    whole.save(tmp_path / "a.json")
    units = sorted((tmp_path / "a" / "journal").glob("*.json"))
    assert len(units) > 10
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for path in units[::3]:  # as if killed before these units finished
        (tmp_path / "b" / "journal" / path.name).unlink()
    again = run_steering(lively, {1: (sae, "tiny")}, [TOPIC], cfg, journal=Journal.open(tmp_path / "b", config))
    again.save(tmp_path / "b.json")
    assert (tmp_path / "b.json").read_bytes() == (tmp_path / "a.json").read_bytes()
    plain = run_steering(lively, {1: (sae, "tiny")}, [TOPIC], cfg)  # without a journal: the same numbers
    plain.save(tmp_path / "c.json")
    assert (tmp_path / "c.json").read_bytes() == (tmp_path / "a.json").read_bytes()


def test_freeze_record_matches_the_frozen_texts_and_draws_the_second_seed():
    assert freeze_hash() == FREEZE["sha256"], "concepts, prompts, grid or selectors changed after the freeze"
    assert SteerConfig().seeds == (0, second_seed()) and second_seed() == int(FREEZE["sha256"][:12], 16) % 10**6
    assert SteerConfig().alphas == DEFAULT_ALPHAS and SteerConfig().methods == STEER_METHODS


def test_builtin_concepts_are_well_formed():
    assert [c.judge for c in CONCEPTS.values()].count(None) == 4  # four topics
    assert {c.judge for c in CONCEPTS.values()} == {None, "positive", "negative"}  # two sentiments
    assert CONCEPTS["positive"].judge == "positive" and CONCEPTS["positive"].negatives
    for concept in CONCEPTS.values():
        if concept.judge is None:
            assert all(concept_hits(t, concept.words)[0] for t in concept.texts)
            assert not any(concept_hits(t, concept.words)[0] for t in (*NEUTRAL_TEXTS, *NEUTRAL_PROMPTS))
    assert all(c.texts for c in CONCEPTS.values())


def test_contrast_texts():
    from gradsae.experiments.concepts import NEUTRAL_TEXTS, contrast_texts

    plain = Concept(name="t", words=("a",))
    assert contrast_texts(plain, SteerConfig()) == NEUTRAL_TEXTS
    assert contrast_texts(plain, SteerConfig(contrast="none")) == ()
    assert contrast_texts(CONCEPT, SteerConfig(contrast="none")) == CONCEPT.negatives
    assert not set(NEUTRAL_TEXTS) & set(NEUTRAL_PROMPTS)


def test_a_topic_cells_success_gets_an_exact_binomial_interval():
    """0 of 12 generations with a concept word is not [0.0, 0.0]: Clopper-Pearson gives [0, 26.5]."""
    from gradsae.experiments.stats import bootstrap
    from gradsae.report.concepts import success_stat

    def point(values: tuple[float, ...]) -> Point:
        stat = bootstrap(list(values), lambda x: float(sum(x) / len(x)), scale=100, seed=0, resamples=200)
        return Point("x", 0.1, "eval", stat, stat, stat, stat, values, values, ("",) * len(values))

    none = success_stat(point((0.0,) * 12))
    assert (none.mean, none.low) == (0.0, 0.0) and none.high == pytest.approx(100 * (1 - 0.025 ** (1 / 12)))
    three = success_stat(point((1.0,) * 3 + (0.0,) * 9))
    assert three.mean == 25.0
    assert (three.low, three.high) == (pytest.approx(5.486, abs=1e-3), pytest.approx(57.19, abs=1e-2))
    probs = point((0.2, 0.7, 0.4))  # a sentiment judge's P(label): not 0/1, the bootstrap interval stays
    assert success_stat(probs) == probs.success
