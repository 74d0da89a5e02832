"""The paper's two experiments on one task, layer by layer, and the file that holds them.

Setup (Shu et al. 2025, sec. 4): with the SAE spliced at layer ``l``, greedy-decode
every example and keep those answered correctly (EM = 1 / right label), so the
unperturbed score is 100 by construction. Then rank (:mod:`.rank`), perturb and
steer (:mod:`.perturb`), and summarise (:mod:`.stats`). Each figure carries a 95%
percentile-bootstrap interval over examples.

``results.json`` = ``{"config": RunMeta, "layers": [LayerResult, ...]}``;
:class:`RunResults` writes and reads it, so the report (and a notebook) starts
from the file, not from live objects.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from gradsae.experiments.config import ExperimentConfig
from gradsae.experiments.curves import kept_curves
from gradsae.experiments.decode import decode, prompt_batches
from gradsae.experiments.journal import Journal, recall, record, unit_key
from gradsae.experiments.perturb import pick_donors, run_perturbation, run_steering
from gradsae.experiments.rank import overlap_stats, rank_examples
from gradsae.experiments.results import LayerExamples, LayerResult, from_data
from gradsae.models import LoadedModel
from gradsae.sae import SAE
from gradsae.tasks import Task

if TYPE_CHECKING:
    from gradsae.experiments.record import ExampleRecorder

log = logging.getLogger(__name__)


def run_layer(
    lm: LoadedModel,
    sae: SAE,
    task: Task,
    cfg: ExperimentConfig,
    journal: Journal | None = None,
    *,
    recorder: ExampleRecorder | None = None,
    batched: bool = True,
) -> LayerResult:
    """Both experiments at ``cfg.layer``.

    With a ``journal``, each finished condition and the layer are kept (a finished layer is not rerun);
    ``recorder`` collects the per-example dump (``examples.json``) of the layers computed in this call;
    ``batched=False`` decodes the conditions one at a time (the reference path; the same results).
    """
    if (done := recall(journal, unit_key(cfg.layer, "layer"))) is not None:
        if recorder is not None and (examples := recall(journal, unit_key(cfg.layer, "examples"))) is not None:
            recorder.add(from_data(LayerExamples, examples))  # examples.json keeps the recalled layer
        return from_data(LayerResult, done)
    texts = [task.render(example, lm.tokenizer) for example in task.examples]
    batches = prompt_batches(lm, texts, cfg, reuse=False)
    clean = decode(lm, batches, task, cfg, sae=None, edits_for=None)
    # error mode without edits or recording: the splice is the identity, bit for bit (see gradsae.splice)
    spliced = clean if cfg.mode == "error" else decode(lm, batches, task, cfg, sae=sae, edits_for=None)
    correct = [_is_kept(task.score(ex, gen.text), cfg) for ex, gen in zip(task.examples, spliced, strict=True)]
    kept_examples = [ex for ex, ok in zip(task.examples, correct, strict=True) if ok]
    kept_gens = [gen for gen, ok in zip(spliced, correct, strict=True) if ok]
    log.info("layer %d: %d of %d examples answered correctly with the SAE", cfg.layer, len(kept_examples), len(texts))
    on_batch = None if recorder is None else recorder.on_scores
    kept, diagnostics = rank_examples(lm, sae, task, kept_examples, kept_gens, cfg, on_batch=on_batch)
    curves = kept_curves(lm, sae, kept, cfg, journal) if cfg.curves else {}
    kept_texts = [text for text, ok in zip(texts, correct, strict=True) if ok]  # kept keeps kept_examples' order
    on_answers = None if recorder is None else recorder.on_answers
    perturbation = run_perturbation(
        lm, sae, task, kept, kept_texts, cfg, journal, on_answers=on_answers, batched=batched
    )
    if recorder is not None:
        record(journal, unit_key(cfg.layer, "examples"), recorder.finish(cfg.layer, kept, cfg.ks))
    donors = pick_donors(kept, seed=cfg.seed)
    steering = run_steering(lm, sae, task, kept, kept_texts, donors, cfg, journal, batched=batched)
    result = LayerResult(
        layer=cfg.layer,
        n_examples=len(texts),
        n_kept=len(kept),
        baseline=cfg.stat([float(c) for c in correct]),
        clean_baseline=cfg.stat([task.score(ex, g.text).exact for ex, g in zip(task.examples, clean, strict=True)]),
        perturbation=tuple(perturbation),
        steering=tuple(steering),
        overlap=overlap_stats(kept, cfg, by=task.metric),
        n_donor_pairs=sum(d is not None for d in donors),
        diagnostics=diagnostics,
        curves=curves,
    )
    return from_data(LayerResult, record(journal, unit_key(cfg.layer, "layer"), result))


def _is_kept(score: Any, cfg: ExperimentConfig) -> bool:
    """Exact match, or (``cfg.keep_f1``, the authors' filter) F1 at least that high."""
    return bool(score.exact == 1.0 if cfg.keep_f1 is None else score.f1 >= cfg.keep_f1)
