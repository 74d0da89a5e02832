"""The curves are journaled one example at a time: an interrupted run resumes from the next example and ends
with the same ``curves`` as an uninterrupted one, which equal those of one batched ``faithfulness`` call."""

from __future__ import annotations

import json

import pytest

from gradsae.experiments import curves as curves_module
from gradsae.experiments.curves import DEFAULT_RANKINGS, faithfulness, kept_curves
from gradsae.experiments.journal import Journal
from gradsae.experiments.rank import k_value, rank_examples
from gradsae.generate import answer_inputs
from tests import helpers
from tests.experiments.test_curves_splice_first import _generations
from tests.experiments.test_run import _cfg, _half_right_task


def _kept(lm, sae, cfg):
    task, _ = _half_right_task(lm, sae, cfg)
    said = _generations(lm, sae, cfg, task)
    right = [task.score(ex, g.text).exact == 1.0 for ex, g in zip(task.examples, said, strict=True)]
    examples = [ex for ex, ok in zip(task.examples, right, strict=True) if ok]
    gens = [g for g, ok in zip(said, right, strict=True) if ok]
    kept, _ = rank_examples(lm, sae, task, examples, gens, cfg)
    return kept


def _same(a: dict, b: dict) -> bool:
    """Equal as JSON (a budget with no target is nan, and nan != nan)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_an_interrupted_curves_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    lm, sae = helpers.char_lm(seed=4), helpers.tiny_sae("topk", d_sae=48, seed=2)
    cfg = _cfg(curves=True, ks=(1, "50%"))
    kept = _kept(lm, sae, cfg)
    assert len(kept) >= 2
    whole = kept_curves(lm, sae, kept, cfg)

    calls = []
    real = curves_module.faithfulness

    def dies_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    journal = Journal.open(tmp_path, {"run": "curves"})
    monkeypatch.setattr(curves_module, "faithfulness", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        kept_curves(lm, sae, kept, cfg, journal)
    assert len(journal) == 1  # the first example is kept
    calls.clear()
    monkeypatch.setattr(curves_module, "faithfulness", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = kept_curves(lm, sae, kept, cfg, Journal.open(tmp_path, {"run": "curves"}))
    assert len(calls) == len(kept) - 1  # only the examples not yet journaled are measured
    assert _same(resumed, whole)
    again = kept_curves(lm, sae, kept, cfg, Journal.open(tmp_path, {"run": "curves"}))
    assert _same(again, whole) and len(calls) == len(kept) - 1


def test_one_example_at_a_time_equals_one_batched_call():
    """The per-example seeds (``cfg.seed`` + the example's index) and unpadded rows of a batched call."""
    lm, sae = helpers.char_lm(seed=4), helpers.tiny_sae("topk", d_sae=48, seed=2)
    cfg = _cfg(curves=True, ks=(1, "50%"))
    kept = _kept(lm, sae, cfg)
    ids, mask = answer_inputs(lm.tokenizer, [k.generation for k in kept], [k.step for k in kept])
    batched = faithfulness(
        lm,
        sae,
        ids,
        mask,
        layer=cfg.layer,
        mode=cfg.mode,
        seed=cfg.seed,
        skip_first=cfg.skip_first,
        experiment_ks=[{str(k): k_value(k, ex) for k in cfg.ks} for ex in kept],
        rankings=DEFAULT_RANKINGS,
    )
    assert _same(kept_curves(lm, sae, kept, cfg), batched.to_dict())
