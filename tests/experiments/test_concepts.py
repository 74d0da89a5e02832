"""The steering evaluation: disjoint splits, alpha = 0 is the unsteered text, metrics, the alpha choice, a tiny run."""

from __future__ import annotations

import math

import pytest
import torch

from gradsae.errors import GradSAEError
from gradsae.experiments.concepts import (
    CONCEPTS,
    METHODS,
    NEUTRAL_PROMPTS,
    Point,
    SteerConfig,
    SteerResult,
    choose_alpha,
    concept_hits,
    distinct_n,
    mean_nll,
    pick_latents,
    run_steering,
    split_prompts,
    steered_generations,
)
from gradsae.experiments.stats import Stat
from gradsae.generate import generate
from gradsae.models import LoadedModel
from gradsae.report.concepts import markdown, render
from gradsae.steer import Concept, steering_edit
from gradsae.tasks import Example, Task
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


def test_alpha_zero_gives_the_unsteered_text(lively):
    sae, cfg = tiny_sae(d_sae=48, layer=1, d_in=32), SteerConfig(batch_size=2)
    texts = ["hello there", "a", "the quick brown fox"]
    plain = generate(lively, texts, max_new_tokens=12)
    zero = steered_generations(
        lively, sae, texts, steering_edit([1, 5, 9], 0.0, torch.ones(3)), layer=1, cfg=cfg, budget=12
    )
    strong = steered_generations(
        lively, sae, texts, steering_edit([1, 5, 9], 40.0, torch.ones(3)), layer=1, cfg=cfg, budget=12
    )
    assert [g.token_ids for g in zero] == [g.token_ids for g in plain]
    assert [g.token_ids for g in strong] != [g.token_ids for g in plain]  # the edit does act


@pytest.mark.parametrize("method", METHODS)
def test_each_method_returns_k_distinct_latents(lively, method):
    sae = tiny_sae(d_sae=48, layer=1, d_in=32)
    latents = pick_latents(lively, sae, CONCEPT, method, layer=1, k=6, seeds=["hi", "tell me"], cfg=SteerConfig())
    assert latents.shape == (6,) and len(set(latents.tolist())) == 6
    assert int(latents.min()) >= 0 and int(latents.max()) < 48


def test_text_metrics():
    assert concept_hits("The Wedding, the brides and a groomsman; weddings!", ["wedding", "bride"]) == (3, 8)
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
    with pytest.raises(GradSAEError, match="methods"):
        SteerConfig(methods=("gradsae", "magic"))
    with pytest.raises(GradSAEError, match="positive"):
        SteerConfig(alphas=(0.0, 1.0))


def test_tiny_run_saves_loads_and_renders(lively, tmp_path):
    sae = tiny_sae(d_sae=48, layer=1, d_in=32)
    cfg = SteerConfig(
        k=3, alphas=(1.0, 8.0), methods=METHODS, n_seed=2, n_heldout=2, n_eval=3, max_new_tokens=6, resamples=50
    )
    labels = ("negative", "positive")
    task = Task(
        "mini",
        "{prompt} ok?",
        tuple(
            Example(id=str(i), prompt=t, answers=(lab,), label=lab)
            for i, (t, lab) in enumerate([("good", labels[1]), ("bad", labels[0])])
        ),
        max_new_tokens=4,
        metric="accuracy",
        labels=labels,
    )
    topic = Concept(name="topic", words=("ab", "e"), texts=("ab ab e",))
    result = run_steering(lively, sae, [topic, CONCEPT], cfg, sae_label="tiny", cost_task=task, command="test")
    assert [len(run.methods) for run in result.concepts] == [4, 5]  # gradsae-label only for the sentiment concept
    for run in result.concepts:
        for method in run.methods:
            assert len(method.points) == 2 * len(cfg.alphas) and len(method.latents) == 3
            assert method.alpha in (0.0, *cfg.alphas)
            assert all(math.isfinite(p.ppl.mean) and 0 <= p.success.mean <= 100 for p in method.points)
    assert set(result.prompts["eval"]).isdisjoint(result.prompts["heldout"])
    paths = render(result, tmp_path)
    assert [p.name for p in paths] == ["steering.json", "steering.md", "steering.png"]
    loaded = SteerResult.load(tmp_path / "steering.json")
    assert loaded == result
    text = markdown(loaded)
    assert "## Concept `topic`" in text and "vs GradSAE" in text and "logit-lens" in text
    assert "ppl <= 10x" in text


def test_builtin_concepts_are_well_formed():
    assert {"weddings", "positive"} <= set(CONCEPTS)
    assert CONCEPTS["positive"].judge == "positive" and CONCEPTS["positive"].negatives
    assert all(c.texts for c in CONCEPTS.values())


def test_contrast_texts():
    from gradsae.experiments.concepts import NEUTRAL_TEXTS, contrast_texts

    plain = Concept(name="t", words=("a",))
    assert contrast_texts(plain, SteerConfig()) == NEUTRAL_TEXTS
    assert contrast_texts(plain, SteerConfig(contrast="none")) == ()
    assert contrast_texts(CONCEPT, SteerConfig(contrast="none")) == CONCEPT.negatives
    assert not set(NEUTRAL_TEXTS) & set(NEUTRAL_PROMPTS)
