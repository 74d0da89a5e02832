"""The curves measure the model the run measures: with ``--splice-first`` the first token is spliced too."""

from __future__ import annotations

import pytest
import torch

from gradsae.experiments.curves import kept_curves
from gradsae.experiments.rank import rank_examples
from gradsae.experiments.results import CurveResult, from_data
from gradsae.generate import answer_inputs
from gradsae.models import position_ids
from gradsae.splice import splice
from tests import helpers
from tests.experiments.test_run import _cfg, _half_right_task


@pytest.mark.parametrize("skip_first", [False, True])
def test_curves_pin_the_kept_answer_token_with_the_first_token_spliced(skip_first):
    """``--paper --curves``: ``t*`` is the kept answer's token and ``Y_0`` its probability, both with the first
    token spliced (the old curves always left it unspliced, so ``Y_0`` came from another model)."""
    lm, sae = helpers.char_lm(seed=4), helpers.tiny_sae("topk", d_sae=48, seed=2)
    cfg = _cfg(curves=True, skip_first=skip_first, ks=(1,))
    task, _ = _half_right_task(lm, sae, cfg)
    said = _generations(lm, sae, cfg, task)
    kept_examples = [ex for ex, g in zip(task.examples, said, strict=True) if task.score(ex, g.text).exact == 1.0]
    kept_gens = [g for ex, g in zip(task.examples, said, strict=True) if task.score(ex, g.text).exact == 1.0]
    kept, _ = rank_examples(lm, sae, task, kept_examples, kept_gens, cfg)
    assert kept
    curves = kept_curves(lm, sae, kept, cfg)
    result = from_data(CurveResult, curves)
    assert curves["skip_first"] is skip_first
    assert result.skip_first is skip_first
    for k, ex in zip(kept, result.examples, strict=True):
        ids, mask = answer_inputs(lm.tokenizer, [k.generation], [k.step])
        with splice(lm, sae, cfg.layer, mode=cfg.mode, record=False, skip_first=skip_first), torch.no_grad():
            logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[0, -1]
        assert ex.token == k.generation.token_ids[k.step] == int(logits.argmax())
        assert ex.clean == pytest.approx(float(logits.double().softmax(-1)[ex.token]), rel=1e-4)


def _generations(lm, sae, cfg, task):
    from gradsae.experiments.decode import decode, prompt_batches

    texts = [task.render(e, lm.tokenizer) for e in task.examples]
    return decode(lm, prompt_batches(lm, texts, cfg, reuse=False), task, cfg, sae=sae, edits_for=None)


def test_old_results_without_the_field_read_as_skipped():
    assert from_data(
        CurveResult, {"layer": 0, "mode": "error", "grid": [0, 1], "methods": ["random"], "top": 1, "examples": []}
    ).skip_first
