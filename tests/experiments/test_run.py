"""The experiments on a tiny random model: filter, selection, masking, steering, reproducibility."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from gradsae.cli.options import parse_ks
from gradsae.cli.reproduce import write_outputs
from gradsae.errors import GradSAEError
from gradsae.experiments.config import ExperimentConfig, SpliceSpec
from gradsae.experiments.decode import decode, prompt_batches
from gradsae.experiments.perturb import pick_donors, steering_edits
from gradsae.experiments.rank import KeptExample, chosen, k_value
from gradsae.experiments.results import RunMeta, RunResults, from_data
from gradsae.experiments.run import run_layer
from gradsae.generate import Generation, encode_prompts, generate_batch
from gradsae.splice import Edit, apply_edits
from gradsae.tasks import Example, Task
from tests import helpers
from tests.helpers import tiny_sae

PROMPTS = ["hello there", "abc", "the quick fox", "zebra", "mnop qr", "why not", "ok go", "lorem"]


@pytest.fixture(scope="module")
def char_lm():
    return helpers.char_lm(seed=4)  # varied, distinct answers (donor pairs need different answers)


@pytest.fixture(scope="module")
def sae():
    return tiny_sae("topk", d_sae=48, seed=2)


def _task(examples, max_new_tokens=6):
    return Task("tiny", "{prompt}", tuple(examples), max_new_tokens=max_new_tokens, metric="squad")


def _answers(lm, sae, cfg, task):
    texts = [task.render(e, lm.tokenizer) for e in task.examples]
    batches = prompt_batches(lm, texts, cfg, reuse=False)
    return [task.parse(g.text) for g in decode(lm, batches, task, cfg, sae=sae, edits_for=None)]


def _half_right_task(lm, sae, cfg):
    probe = _task([Example(id=str(i), prompt=p, answers=("?",)) for i, p in enumerate(PROMPTS)])
    said = _answers(lm, sae, cfg, probe)
    examples, right = [], 0
    for i, (prompt, answer) in enumerate(zip(PROMPTS, said, strict=True)):
        good = i % 2 == 0 and answer.strip() != ""
        right += good
        gold = answer if good else "never said this"
        examples.append(Example(id=str(i), prompt=prompt, answers=(gold,), label="a" if i % 4 < 2 else "b"))
    return _task(examples), right


def _cfg(**kw):
    splice = {"layer": 0, "mode": "replace"} | {k: kw.pop(k) for k in ("layer", "mode", "skip_first") if k in kw}
    base = {"ks": (1, 3, "50%"), "batch_size": 3, "bootstrap": 50}
    return ExperimentConfig(splice=SpliceSpec(**splice), **(base | kw))


def test_correct_example_filter_and_full_run(char_lm, sae):
    cfg = _cfg()
    task, right = _half_right_task(char_lm, sae, cfg)
    assert right >= 2
    result = run_layer(char_lm, sae, task, cfg)
    assert result.n_kept == right
    assert result.baseline.mean == pytest.approx(100 * right / len(PROMPTS))
    none = [c for c in result.perturbation if c.edit == "none"]
    assert len(none) == 1 and none[0].exact.mean == 100.0  # K = 0 measured: the kept set reproduces
    assert len(result.perturbation) == 1 + 3 * 2 * 3
    assert result.n_donor_pairs >= 2
    # per position mode: the no-edit floor, then (swap, zero, inject) for TopK and swap for BottomK
    assert len(result.steering) == 1 + 3 * (3 + 1) * 3
    assert {c.edit for c in result.steering} == {"none", "swap", "zero", "inject"}
    assert all(c.exact.n == right for c in result.perturbation)
    assert all(c.own is not None and c.own.n == result.n_donor_pairs for c in result.steering)


def test_rerun_with_same_seed_gives_same_results_json(char_lm, sae, tmp_path):
    cfg = _cfg()
    task, _ = _half_right_task(char_lm, sae, cfg)
    meta = _meta(cfg)
    for name in ("a", "b"):
        results = RunResults(config=meta, layers=(run_layer(char_lm, sae, task, cfg),))
        write_outputs(tmp_path / name, results, {"total_s": 0.0})
    first = (tmp_path / "a" / "results.json").read_text()
    assert first == (tmp_path / "b" / "results.json").read_text()
    assert RunResults.load(tmp_path / "a") == results  # the file reads back into the same objects
    assert json.loads(first)["layers"][0]["n_kept"] >= 2
    table = (tmp_path / "a" / "table.md").read_text()
    for row in ("GradSAE TopK", "GradSAE BottomK", "activation TopK", "activation BottomK", "random TopK"):
        assert row in table
    assert (tmp_path / "a" / "exp1_layer0.png").stat().st_size > 1000


def _meta(cfg):
    return RunMeta(
        task="tiny",
        metric="squad",
        model="tiny",
        n=8,
        seed=0,
        mode="replace",
        methods=tuple(cfg.methods),
        ks=("1", "3", "50%"),
        steer_positions=("last", "all"),
        sae_labels={"0": "random"},
        batch_size=cfg.batch_size,
        max_new_tokens=6,
        objective="p(greedy token) at the answer step",
        aggregation="paper",
        versions={},
    )


def test_interrupted_write_leaves_no_results_json(tmp_path, monkeypatch):
    import gradsae.report.tables as report

    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "table_markdown", boom)
    monkeypatch.setattr(report, "plot_layer", lambda *a, **k: [])
    with pytest.raises(KeyboardInterrupt):
        write_outputs(tmp_path, RunResults(config=_meta(_cfg()), layers=()), {})
    assert not (tmp_path / "results.json").exists()
    assert not list(tmp_path.glob(".*tmp*"))


def _kept(rankings, active_last, label="a", group=None, values=None, answer=None):
    answer = answer or f"answer {id(rankings)}"
    ex = Example(id=str(id(rankings)), prompt="p", answers=(answer,), label=label, group=group)
    gen = Generation(prompt_ids=(1,), token_ids=(5,), text="x", stopped=False)
    return KeptExample(
        example=ex,
        generation=gen,
        step=0,
        rankings={"gradsae": rankings},
        active_last=active_last,
        donor_values=values or {},
    )


def test_topk_bottomk_and_half_rule():
    ex = _kept([9, 4, 7, 1, 3], active_last=7)
    assert k_value("50%", ex) == 3
    assert chosen(ex, "gradsae", "top", 2) == [9, 4]
    assert chosen(ex, "gradsae", "bottom", 2) == [3, 1]
    assert chosen(ex, "gradsae", "top", "50%") == [9, 4, 7]
    assert chosen(ex, "gradsae", "top", 30) == [9, 4, 7, 1, 3]
    assert k_value("50%", _kept([1], active_last=1)) == 1


def test_donors_differ_in_label_or_share_context():
    kept = [_kept([1], 2, label="a"), _kept([1], 2, label="a"), _kept([1], 2, label="b")]
    donors = pick_donors(kept, seed=0)
    assert donors[0] == 2 and donors[1] == 2 and donors[2] in (0, 1)
    squad = [_kept([1], 2, group="c1"), _kept([1], 2, group="c2"), _kept([1], 2, group="c1")]
    assert pick_donors(squad, seed=0) == [2, None, 0]


def test_donors_of_ungrouped_unlabelled_rows_are_any_other_row_with_another_answer():
    """capitals / plural / past_tense rows have neither a group nor a label: every other row may donate."""
    rows = [_kept([1], 2, label=None, answer=a) for a in ("Paris", "Lima", "Oslo", "paris")]
    donors = pick_donors(rows, seed=0)
    assert all(d is not None for d in donors)
    assert all(d != i for i, d in enumerate(donors))
    assert donors[0] != 3 and donors[3] != 0, "same gold answer after normalisation: not a donor"


def test_donors_with_the_same_gold_answer_are_not_donors():
    """Two questions on one context with the same answer: a swap could not be told from no edit."""
    same = [_kept([1], 2, group="c", answer="Paris"), _kept([1], 2, group="c", answer="the Paris")]
    assert pick_donors(same, seed=0) == [None, None]
    labels = [_kept([1], 2, label="a", answer="yes"), _kept([1], 2, label="b", answer="Yes")]
    assert pick_donors(labels, seed=0) == [None, None]


@pytest.mark.parametrize("where", ["last", "all"])
def test_steering_edits_swap_latents(where):
    h = torch.rand(2, 4, 10) + 0.1
    edits = steering_edits([[1, 2], [3]], [[5], [6, 7]], [[9.0], [8.0, 7.5]], where)
    out = apply_edits(h, edits)
    rows = slice(None) if where == "all" else slice(-1, None)
    assert (out[0, rows, [1, 2]] == 0).all() and (out[1, rows, 3] == 0).all()
    assert (out[0, rows, 5] == 9.0).all() and (out[1, rows, 6] == 8.0).all() and (out[1, rows, 7] == 7.5).all()
    if where == "last":
        assert torch.equal(out[:, :-1], h[:, :-1])


def test_masking_applies_at_every_generation_step(char_lm, sae):
    """Zeroing every latent in replace mode makes each spliced residual b_dec, on every pass."""
    cfg = _cfg()
    task = _task([Example(id=str(i), prompt=p, answers=("x",)) for i, p in enumerate(PROMPTS[:4])], max_new_tokens=5)
    texts = [task.render(e, char_lm.tokenizer) for e in task.examples]
    everything = list(range(sae.cfg.d_sae))
    batches = prompt_batches(char_lm, texts, cfg, reuse=True)
    masked = decode(
        char_lm,
        batches,
        task,
        cfg,
        sae=sae,
        edits_for=lambda rows: steering_edits([everything] * len(rows), [[]] * len(rows), [[]] * len(rows), "all")[:1],
    )

    ids, mask = encode_prompts(char_lm.tokenizer, texts)
    first = mask.int().argmax(1)
    handle = char_lm.layers[0].register_forward_hook(
        lambda m, i, out: torch.where(_not_first(out, first), sae.b_dec.expand_as(out), out)
    )
    try:
        by_hand = generate_batch(char_lm, ids, mask, max_new_tokens=5)
    finally:
        handle.remove()
    assert [g.token_ids for g in masked] == [g.token_ids for g in by_hand]
    unmasked = decode(char_lm, batches, task, cfg, sae=sae, edits_for=None)
    assert [g.token_ids for g in unmasked] != [g.token_ids for g in masked]


def _not_first(out, first):
    pos = out.shape[1]
    if pos == 1:
        return torch.ones(out.shape[0], 1, 1, dtype=torch.bool)
    cols = torch.arange(pos)[None, :]
    keep = cols != first[:, None]
    return keep[:, :, None]


def test_bad_k_is_refused():
    with pytest.raises(GradSAEError, match="percentage"):
        parse_ks("1,ten")
    assert parse_ks("1,50%") == (1, "50%")


def test_prefix_reuse_changes_no_result(char_lm, sae):
    cfg = _cfg(ks=(1, "50%"), steer_positions=("last",))
    task, _ = _half_right_task(char_lm, sae, cfg)
    reused = run_layer(char_lm, sae, task, cfg)
    plain = run_layer(char_lm, sae, task, dataclasses.replace(cfg, reuse_prefix=False))
    assert json.dumps(dataclasses.asdict(reused)) == json.dumps(dataclasses.asdict(plain))


def test_prefix_reuse_gives_the_same_tokens(char_lm, sae):
    from gradsae.prefix import compute_prefix, replay_prefix
    from gradsae.splice import Edit, splice

    texts = [p + "?" for p in PROMPTS[:5]]
    ids, mask = encode_prompts(char_lm.tokenizer, texts)
    edit = Edit(latents=torch.tensor([[1, 2, 3]] * 5), op="set", values=2.0, positions="last")
    for layer in (0, 1):
        prefix = compute_prefix(char_lm, ids, mask, layer)
        for edits in ([], [edit]):
            with splice(char_lm, sae, layer, edits=edits, mode="replace", record=False):
                plain = generate_batch(char_lm, ids, mask, max_new_tokens=6)
                with replay_prefix(char_lm, prefix):
                    reused = generate_batch(char_lm, ids, mask, max_new_tokens=6)
                    again = generate_batch(char_lm, ids, mask, max_new_tokens=6)
            assert [g.token_ids for g in reused] == [g.token_ids for g in plain]
            assert [g.token_ids for g in again] == [g.token_ids for g in plain]
    assert all("forward" not in vars(block) for block in char_lm.layers)


def test_overlap_divides_by_the_number_chosen():
    """An example with fewer than K positive scores is not counted as disagreement (old code divided by K)."""
    from gradsae.experiments.rank import overlap_stats

    a = _kept([1, 2, 3], 3, label="a")
    a.rankings["activation"] = [1, 2, 3]
    cfg = _cfg(methods=("gradsae", "activation"))
    assert overlap_stats([a], cfg, by="accuracy", k=10)["cross/gradsae-activation"] == 100.0


def test_keep_f1_keeps_near_misses(char_lm, sae):
    """The authors' filter (F1 >= 0.9) keeps an answer exact match would drop."""
    from gradsae.experiments.run import _is_kept
    from gradsae.tasks import Score

    near = Score(exact=0.0, f1=0.92, prediction="x")
    assert not _is_kept(near, _cfg())
    assert _is_kept(near, _cfg(keep_f1=0.9))
    assert not _is_kept(Score(exact=0.0, f1=0.5, prediction="x"), _cfg(keep_f1=0.9))


def test_donor_value_score_injects_the_ranking_score(char_lm, sae):
    """``score`` (the authors' code) stores each latent's GradSAE score, ``activation`` its activation."""
    cfg = _cfg(donor_value="score")
    task, _ = _half_right_task(char_lm, sae, cfg)
    from gradsae.experiments.rank import rank_examples

    texts = [task.render(e, char_lm.tokenizer) for e in task.examples]
    gens = decode(char_lm, prompt_batches(char_lm, texts, cfg, reuse=False), task, cfg, sae=sae, edits_for=None)
    by_score, _ = rank_examples(char_lm, sae, task, task.examples[:2], gens[:2], cfg)
    by_act, _ = rank_examples(char_lm, sae, task, task.examples[:2], gens[:2], _cfg())
    grad = by_score[0].donor_values["gradsae"]
    act = by_act[0].donor_values["gradsae"]
    assert grad.keys() == act.keys() and grad != act
    top = by_score[0].rankings["gradsae"][0]
    assert max(grad.values()) == grad[top]  # the best-ranked latent has the largest score


def test_splice_first_masks_the_first_token_too(char_lm, sae):
    """``skip_first=False`` (the authors' code) splices and masks position 0 as well."""
    cfg = _cfg()
    texts = [p + "?" for p in PROMPTS[:3]]
    task = _task([Example(id=str(i), prompt=t, answers=("x",)) for i, t in enumerate(texts)], max_new_tokens=4)
    everything = list(range(sae.cfg.d_sae))
    batches = prompt_batches(char_lm, texts, cfg, reuse=False)

    def zero_all(rows):
        return [Edit(latents=torch.tensor([everything] * len(rows)), positions="all")]

    def run(skip_first):
        c = cfg.spliced(skip_first=skip_first)
        return [g.token_ids for g in decode(char_lm, batches, task, c, sae=sae, edits_for=zero_all)]

    ids, mask = encode_prompts(char_lm.tokenizer, texts)
    handle = char_lm.layers[0].register_forward_hook(
        lambda m, i, out: torch.where(mask_or_new(out, mask), sae.b_dec.expand_as(out), out)
    )
    try:
        by_hand = [g.token_ids for g in generate_batch(char_lm, ids, mask, max_new_tokens=4)]
    finally:
        handle.remove()
    assert run(False) == by_hand


def mask_or_new(out, mask):
    """Every real position of the prompt pass (padding left alone), every new token."""
    if out.shape[1] == 1:
        return torch.ones(out.shape[0], 1, 1, dtype=torch.bool)
    return mask.bool()[:, :, None]


def test_curves_flag_fills_results_table_and_plot(char_lm, sae, tmp_path):
    from gradsae.experiments.results import CurveResult

    cfg = _cfg(curves=True, ks=(1,), steer_positions=("last",))
    task, right = _half_right_task(char_lm, sae, cfg)
    result = run_layer(char_lm, sae, task, cfg)
    curves = from_data(CurveResult, result.curves)
    assert len(curves.examples) == result.n_kept == right
    assert curves.normalised_area("deletion", "ablation") == pytest.approx(1.0)
    write_outputs(tmp_path, RunResults(config=_meta(cfg), layers=(result,)), {"total_s": 0.0})
    assert "### Faithfulness curves" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "curves_layer0.png").stat().st_size > 1000
    assert RunResults.load(tmp_path).layers[0].curves == json.loads(json.dumps(result.curves))
    assert run_layer(char_lm, sae, task, _cfg(ks=(1,), steer_positions=("last",))).curves == {}


def test_random_ranking_depends_on_the_example_not_its_batch(char_lm, sae):
    """An example's random ranking is the same whatever batch it is scored in (batch size, neighbours)."""
    from gradsae.experiments.rank import rank_examples

    task = _task([Example(id=str(i), prompt=p, answers=("?",)) for i, p in enumerate(PROMPTS)])
    cfg = _cfg()
    texts = [task.render(e, char_lm.tokenizer) for e in task.examples]
    gens = decode(char_lm, prompt_batches(char_lm, texts, cfg, reuse=False), task, cfg, sae=sae, edits_for=None)
    runs = [
        rank_examples(char_lm, sae, task, task.examples[first:], gens[first:], _cfg(batch_size=size))[0]
        for first, size in ((0, 3), (0, 1), (1, 4))
    ]
    by_id = [{k.example.id: k.rankings["random"] for k in kept} for kept in runs]
    assert all(by_id[0][i] == by_id[1][i] for i in by_id[1]) and all(by_id[0][i] == by_id[2][i] for i in by_id[2])
    assert len({tuple(r) for r in by_id[0].values() if len(r) > 1}) > 1  # the rows do differ


def test_the_recorded_objective_names_the_answer_marker_the_run_used() -> None:
    """RunMeta's objective is read from the one used (a marker task says which marker opens the answer)."""
    from gradsae.experiments.rank import objective_description

    assert objective_description(None) == "p(greedy token) at the answer step"
    marked = objective_description("[")
    assert marked.startswith("p(greedy token) at the answer step") and "'['" in marked
