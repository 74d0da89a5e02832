"""Conditions decoded as one batch give each condition's own generations (or a prefix with the same answer)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gradsae.experiments import decode as batched
from gradsae.experiments.config import ExperimentConfig, SpliceSpec
from gradsae.experiments.decode import decode, decode_conditions, merged_edits, prompt_batches
from gradsae.experiments.record import ExampleRecorder
from gradsae.experiments.run import run_layer
from gradsae.splice import Edit
from gradsae.tasks import Example, Task, label_final
from tests import helpers
from tests.helpers import tiny_sae

PROMPTS = ["hello there", "abc", "the quick fox", "zebra", "mnop qr", "why not", "ok go"]


@pytest.fixture(scope="module")
def char_lm():
    return helpers.char_lm(seed=4)


@pytest.fixture(scope="module")
def sae():
    return tiny_sae("topk", d_sae=48, seed=2)


def _conditions(where: str):
    top = torch.tensor([[1, 5, 9], [2, -1, -1], [3, 4, 40], [0, 7, 8], [11, 12, 13], [6, -1, 2], [20, 21, 22]])

    def zero(rows):
        return [Edit(latents=top[rows.start : rows.stop], positions=where)]

    def swap(rows):
        own = top[rows.start : rows.stop]
        give = own.flip(0).clamp(min=-1)
        return [
            Edit(latents=own, positions=where),
            Edit(latents=give, op="set", values=torch.full(give.shape, 3.0), positions=where),
        ]

    def add(rows):
        return [Edit(latents=[30, 31], op="add", values=2.5, positions=where)]

    def inject(rows):
        return [Edit(latents=[44], op="set", values=4.0, positions=where)]

    return [None, zero, swap, add, inject]


def _task(labels=None, max_new_tokens=6):
    examples = tuple(Example(id=str(i), prompt=p, answers=("x",), label="x") for i, p in enumerate(PROMPTS))
    if labels:
        return Task("tiny", "{prompt}", examples, max_new_tokens, metric="accuracy", labels=tuple(labels))
    return Task("tiny", "{prompt}", examples, max_new_tokens, metric="squad")


@pytest.mark.parametrize(
    ("mode", "where", "reuse"),
    [
        ("replace", "all", True),
        ("error", "all", False),
        ("error", "last", True),
        ("replace", "newest", True),
        ("error", "newest", False),
    ],
)
def test_same_generations_as_one_condition_at_a_time(char_lm, sae, mode, where, reuse, monkeypatch):
    cfg = ExperimentConfig(splice=SpliceSpec(layer=0, mode=mode), batch_size=3)
    task = _task()
    texts = [task.render(e, char_lm.tokenizer) for e in task.examples]
    batches = prompt_batches(char_lm, texts, cfg, reuse=reuse)
    conditions = _conditions("last" if where == "newest" else where)
    newest = where == "newest"
    alone = [decode(char_lm, batches, task, cfg, sae=sae, edits_for=c, newest_only=newest) for c in conditions]
    starts: list[int] = []
    first_changes = batched._first_changes

    def spy(*args, **kwargs):
        found = first_changes(*args, **kwargs)
        starts.extend(found.values())
        return found

    monkeypatch.setattr(batched, "_first_changes", spy)
    plans: list[list[tuple[int, int]]] = []
    plan = batched.stages
    monkeypatch.setattr(batched, "stages", lambda found: plans.append(plan(found)) or plans[-1])
    together = decode_conditions(
        char_lm, sae, batches, task, cfg, conditions, newest_only=newest, stop_when_answered=False, max_rows=7
    )
    assert together == alone
    if where == "all":
        assert len(set(starts)) > 3, "rows should start at different columns"
        assert max(len(p) for p in plans) > 1, "some chunk should join its rows in stages"
    assert len({tuple(g.token_ids for g in gens) for gens in alone}) > 2, "the edits should change the answers"


def test_stopping_when_answered_keeps_every_answer(char_lm, sae):
    cfg = ExperimentConfig(splice=SpliceSpec(layer=0, mode="replace"), batch_size=4)
    plain = _task()
    texts = [plain.render(e, char_lm.tokenizer) for e in plain.examples]
    batches = prompt_batches(char_lm, texts, cfg, reuse=True)
    conditions = _conditions("all")
    alone = [decode(char_lm, batches, plain, cfg, sae=sae, edits_for=c) for c in conditions]
    task = _task(labels=sorted({g.text[:2] for gens in alone for g in gens[:4]}))
    together = decode_conditions(char_lm, sae, batches, task, cfg, conditions)
    shorter = 0
    for full, short in zip(alone, together, strict=True):
        for f, s in zip(full, short, strict=True):
            assert f.token_ids[: len(s.token_ids)] == s.token_ids
            assert task.score(task.examples[0], s.text) == task.score(task.examples[0], f.text)
            shorter += len(s.token_ids) < len(f.token_ids)
    assert shorter >= 5


def test_label_final():
    labels = ("pos", "positive", "neg")
    assert not label_final("the answer is po", labels)
    assert not label_final("pos", labels)  # may still become "positive"
    assert label_final("positive", labels)
    assert label_final("neg", labels)
    assert label_final("posh", labels)  # "pos" found at 0; no label starts with "posh"
    assert not label_final("", labels)


def test_merged_edits_keep_each_rows_order():
    like = torch.empty(0)
    a = [Edit(latents=[1, 2]), Edit(latents=[3], op="set", values=5.0)]
    b = [Edit(latents=[[4], [5]], op="set", values=1.0)]
    merged = merged_edits([a, b, []], 2, 48, like)
    assert [(e.op, torch.as_tensor(e.latents).tolist()) for e in merged] == [
        ("zero", [[1, 2], [1, 2], [-1, -1], [-1, -1], [-1, -1], [-1, -1]]),
        ("set", [[-1], [-1], [4], [5], [-1], [-1]]),
        ("set", [[3], [3], [-1], [-1], [-1], [-1]]),
    ]


def _kept_task(lm, sae, cfg):
    """A task the spliced model answers on every other prompt (kept), with two groups for donors."""
    probe = _task(max_new_tokens=5)
    texts = [probe.render(e, lm.tokenizer) for e in probe.examples]
    gens = decode(lm, prompt_batches(lm, texts, cfg, reuse=False), probe, cfg, sae=sae, edits_for=None)
    examples = [
        Example(str(i), e.prompt, (probe.parse(g.text) if i % 2 == 0 else "never",), group=f"g{i // 4}")
        for i, (e, g) in enumerate(zip(probe.examples, gens, strict=True))
    ]
    return dataclasses.replace(probe, examples=tuple(examples))


@pytest.mark.parametrize(
    ("mode", "skip_first"), [("error", True), ("error", False), ("replace", True), ("replace", False)]
)
def test_pipeline_batched_equals_one_condition_at_a_time(char_lm, sae, mode, skip_first):
    """Both experiments (masking; steering at every position mode, with the floors) give the same per-example
    outcomes, statistics and recorded answers batched as condition by condition with ``decode``."""
    cfg = ExperimentConfig(
        splice=SpliceSpec(layer=0, mode=mode, skip_first=skip_first),
        ks=(1, 3, "50%"),
        steer_positions=("last", "cumulative", "all"),
        batch_size=3,
        bootstrap=50,
    )
    task = _kept_task(char_lm, sae, cfg)
    one, many = ExampleRecorder(char_lm.tokenizer), ExampleRecorder(char_lm.tokenizer)
    reference = run_layer(char_lm, sae, task, cfg, recorder=one, batched=False)
    together = run_layer(char_lm, sae, task, cfg, recorder=many, batched=True)
    assert reference.n_kept >= 2 and reference.steering and any(c.edit == "inject" for c in reference.steering)
    assert [c.per_example for c in together.perturbation] == [c.per_example for c in reference.perturbation]
    assert [c.per_example for c in together.steering] == [c.per_example for c in reference.steering]
    assert together == reference
    assert many.dump() == one.dump()  # the masked answers too (no early stop while recording)
    outcomes = {c.per_example for c in reference.perturbation + reference.steering}
    assert len(outcomes) > 1, "the edits should change some answers"


def _columns(starts, bounds, width):
    """Prompt columns computed: each row from the begin of the stage it joins at."""
    total, before = 0, 0
    for begin, joined in bounds:
        total += (joined - before) * (width - begin)
        before = joined
    return total


@pytest.mark.parametrize("seed", range(6))
def test_stages_are_the_cheapest_split(seed):
    """The dynamic programme's stages cost what the best of all boundary choices costs (brute force)."""
    import itertools
    import random

    rng = random.Random(seed)
    starts = sorted(rng.randrange(1, 30) for _ in range(rng.randrange(1, 14)))
    width, values = 31, sorted(set(starts))
    for most in (1, 2, 3, 4):
        found = batched.stages(starts, max_stages=most)
        assert len(found) <= most and found[0][0] == starts[0] and found[-1][1] == len(starts)
        assert all(sum(s < b for s in starts) == j for (b, _), (_, j) in zip(found[1:], found, strict=False))
        best = min(
            _columns(
                starts,
                [(b, sum(s < n for s in starts)) for b, n in zip(chosen, [*chosen[1:], width + 1], strict=True)],
                width,
            )
            for size in range(most)
            for rest in itertools.combinations(values[1:], size)
            for chosen in [(values[0], *rest)]
        )
        assert _columns(starts, found, width) == best
    assert batched.stages([1, 1, 5, 5, 5, 9, 20, 20, 21]) == [(1, 2), (5, 5), (9, 6), (20, 9)]


def test_context_pass_shared_by_every_call(char_lm, sae, monkeypatch):
    """One context pass per prompt batch for all the groups decoded with one ``Contexts``; the same answers."""
    cfg = ExperimentConfig(splice=SpliceSpec(layer=0, mode="error"), batch_size=3)
    task = _task()
    texts = [task.render(e, char_lm.tokenizer) for e in task.examples]
    batches = prompt_batches(char_lm, texts, cfg, reuse=True)
    conditions = _conditions("all")
    fresh = [decode_conditions(char_lm, sae, batches, task, cfg, [c]) for c in conditions]
    calls = []
    context = batched._context
    monkeypatch.setattr(batched, "_context", lambda *a: calls.append(1) or context(*a))
    shared = batched.Contexts()
    again = [decode_conditions(char_lm, sae, batches, task, cfg, [c], contexts=shared) for c in conditions]
    assert again == fresh
    assert len(calls) == len(batches)
    none_kept = batched.Contexts(max_bytes=0)
    calls.clear()
    assert [decode_conditions(char_lm, sae, batches, task, cfg, [c], contexts=none_kept) for c in conditions] == fresh
    assert len(calls) == len(batches) * len(conditions)
