"""The paper's two experiments on one task, layer by layer, and the file that holds them.

Setup (Shu et al. 2025, sec. 4): with the SAE spliced at layer ``l``, greedy-decode
every example and keep those answered correctly (EM = 1 / right label), so the
unperturbed score is 100 by construction. Then rank (:mod:`.rank`), perturb and
steer (:mod:`.perturb`), and summarise (:mod:`.stats`). Each figure carries a 95%
percentile-bootstrap interval over examples.

``results.json`` = ``{"config": RunMeta, "layers": [LayerResult, ...]}``;
:class:`RunResults` writes and reads it, so the report (and a notebook) starts
from the file, not from live objects.

:func:`run_task` is one task's whole run into a folder (``gradsae reproduce``, and each task
of ``gradsae sweep``), described by a :class:`TaskRun`: it holds ``<out>/.lock``, journals
each finished unit (:mod:`.journal`: a killed run resumes), resolves and checks every
layer's SAE, runs :func:`run_layer` per layer with its wall time, and writes the plots and
table (the caller's renderer), ``timing.json`` and ``examples.json``, then ``results.json``
last, each atomically, so an interrupted run never leaves a half-written result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradsae import _files, distributed
from gradsae.errors import GradSAEError
from gradsae.experiments.config import ExperimentConfig
from gradsae.experiments.curves import kept_curves
from gradsae.experiments.decode import decode, prompt_batches
from gradsae.experiments.journal import FOLDER, Journal, recall, record, unit_key
from gradsae.experiments.perturb import pick_donors, run_perturbation, run_steering
from gradsae.experiments.rank import objective_description, overlap_stats, rank_examples
from gradsae.experiments.record import ExampleRecorder
from gradsae.experiments.results import RESULTS, LayerExamples, LayerResult, RunMeta, RunResults, from_data
from gradsae.generate import Generation
from gradsae.models import LoadedModel, load_model, sae_device
from gradsae.pretrained import ResolvedSAE, resolve_saes
from gradsae.sae import SAE
from gradsae.tasks import Task, check_prompt_lengths

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
    texts, clean, spliced, correct = keep_filter(lm, sae, task, cfg)
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


def keep_filter(
    lm: LoadedModel, sae: SAE, task: Task, cfg: ExperimentConfig
) -> tuple[list[str], list[Generation], list[Generation], list[bool]]:
    """The setup's filter: each example's prompt, clean and spliced greedy answers, and whether it is kept.

    In error mode without edits the splice is the identity, so the clean decode serves as the spliced one.
    """
    texts = [task.render(example, lm.tokenizer) for example in task.examples]
    batches = prompt_batches(lm, texts, cfg, reuse=False)
    clean = decode(lm, batches, task, cfg, sae=None, edits_for=None)
    # error mode without edits or recording: the splice is the identity, bit for bit (see gradsae.splice)
    spliced = clean if cfg.mode == "error" else decode(lm, batches, task, cfg, sae=sae, edits_for=None)
    correct = [_is_kept(task.score(ex, gen.text), cfg) for ex, gen in zip(task.examples, spliced, strict=True)]
    return texts, clean, spliced, correct


def _is_kept(score: Any, cfg: ExperimentConfig) -> bool:
    """Exact match, or (``cfg.keep_f1``, the authors' filter) F1 at least that high."""
    return bool(score.exact == 1.0 if cfg.keep_f1 is None else score.f1 >= cfg.keep_f1)


# -- one task's run into a folder ----------------------------------------------------------------------------------

OUTPUTS = (RESULTS, "table.md", "timing.json", "exp1_layer*.png", "exp2_layer*.png")
"""What a run writes to its folder (``restart`` removes these and the journal)."""
AGGREGATION = "paper (mean over positions of relu)"
"""How per-token influence becomes per-latent in the rankings (recorded in ``RunMeta``)."""

Renderer = Callable[[Path, RunResults], object]
"""Writes the human-readable files (table, plots) of a run folder from its results."""


@dataclass(frozen=True)
class TaskRun:
    """One task's run: what ``gradsae reproduce`` does, and each task of ``gradsae sweep``."""

    task: Task
    """The loaded task (its examples drawn)."""
    out: Path
    """Output folder."""
    config: ExperimentConfig
    """The experiment at every layer; its ``splice.layer`` is replaced by each SAE's layer."""
    layers: tuple[int | None, ...]
    """Layers to run, one SAE each (``None``: the SAE's own layer)."""
    model: str | None = None
    """HF model folder or id, or a .gguf file (``None``: the embedded model)."""
    sae: str | None = None
    """SAE folder, ``{layer}`` in it filled per layer (``None``: the shipped SAEs)."""
    device: str = "cpu"
    """Torch device."""
    device_map: str | None = None
    """Spread the model over the visible devices (accelerate), e.g. ``auto``."""
    paper: bool = False
    """The config is the paper-exact preset's (recorded in ``RunMeta``)."""
    restart: bool = False
    """Discard an earlier run's journal and results in ``out`` first."""


def run_task(spec: TaskRun, *, render: Renderer, started: float | None = None) -> tuple[RunResults, dict[str, float]]:
    """Run ``spec`` (resuming from its journal) and write its folder; return the results and wall times.

    ``render`` writes the table and plots; ``started`` is ``time.perf_counter()`` when the invocation began
    (default: now), the start of ``timing.json``'s ``session_s``.
    """
    start = time.perf_counter() if started is None else started
    with ExitStack() as held:
        # under torchrun rank 0 holds the lock and writes; a refusal there is raised on every rank
        distributed.on_main(lambda: held.enter_context(_files.locked_folder(spec.out, command="reproduce")))
        lm = load_model(spec.model, device=spec.device, device_map=spec.device_map)
        check_prompt_lengths(lm, spec.task)
        saes = resolve_saes(lm, spec.sae, spec.layers)
        meta = run_meta(spec, lm, saes)
        journal = distributed.on_main(lambda: open_journal(spec, meta, saes))
        if journal is None:  # the other ranks read rank 0's journal, never write it
            journal = Journal.open(spec.out, journal_config(meta, spec.task, saes), writes=False)
        layers: list[LayerResult] = []
        timing: dict[str, float] = {}
        recorder = ExampleRecorder(lm.tokenizer)
        for found in saes:
            began = time.perf_counter()
            sae = found.sae.to(sae_device(lm, found.layer, found.sae.cfg.hook_point))
            cfg = spec.config.spliced(layer=found.layer)
            layers.append(run_layer(lm, sae, spec.task, cfg, journal, recorder=recorder))
            timing[f"layer_{found.layer}_s"] = round(time.perf_counter() - began, 1)
        timing["session_s"] = round(time.perf_counter() - start, 1)
        timing["total_s"] = round(earlier_seconds(spec.out, restart=spec.restart) + timing["session_s"], 1)
        results = RunResults(config=meta, layers=tuple(layers))
        if distributed.is_main():  # under torchrun every rank holds the same results; one writes them
            recorder.dump().merged(spec.out, [r.layer for r in layers]).save(spec.out)
            write_outputs(spec.out, results, timing, render=render)
    return results, timing


def run_meta(spec: TaskRun, lm: LoadedModel, saes: list[ResolvedSAE]) -> RunMeta:
    """``results.json``'s ``config``: read from the run's spec, its config, task, model and SAEs."""
    cfg, task = spec.config, spec.task
    return RunMeta(
        task=task.name,
        metric=task.metric,
        model=lm.name,
        n=len(task.examples),
        seed=cfg.seed,
        mode=cfg.mode,
        methods=cfg.methods,
        ks=tuple(str(k) for k in cfg.ks),
        steer_positions=cfg.steer_positions,
        sae_labels={str(found.layer): found.label for found in saes},
        batch_size=cfg.batch_size,
        max_new_tokens=task.max_new_tokens,
        objective=objective_description(task.answer_marker),
        paper=spec.paper,
        skip_first=cfg.skip_first,
        keep_f1=cfg.keep_f1,
        donor_value=cfg.donor_value,
        floors=cfg.floors,
        curves=cfg.curves,
        curves_n=cfg.curves_n if cfg.curves else None,
        aggregation=AGGREGATION,
        versions=_files.versions(),
    )


def open_journal(spec: TaskRun, meta: RunMeta, saes: list[ResolvedSAE]) -> Journal:
    """The run's journal; refuse to mix with another run's results unless ``spec.restart``."""
    out = spec.out
    if spec.restart:
        discard(out)
    elif (out / RESULTS).is_file() and not (out / FOLDER).is_dir():
        raise GradSAEError(
            f"{out} already holds a {RESULTS} that this run did not write: add --restart to replace it, "
            "or choose another --out"
        )
    return Journal.open(out, journal_config(meta, spec.task, saes))


def journal_config(meta: RunMeta, task: Task, saes: list[ResolvedSAE]) -> dict[str, Any]:
    """What must match for a rerun to reuse finished units: the config, the examples, the SAEs' weights."""
    examples = hashlib.sha256(repr([dataclasses.astuple(e) for e in task.examples]).encode()).hexdigest()
    weights = {str(found.layer): _digest(found.sae.state()) for found in saes}
    return {**dataclasses.asdict(meta), "examples": examples, "sae_weights": weights}


def _digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def discard(out: Path) -> None:
    """Remove an earlier run's journal and outputs from ``out`` (``restart``)."""
    shutil.rmtree(out / FOLDER, ignore_errors=True)
    for pattern in OUTPUTS:
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)


def earlier_seconds(out: Path, *, restart: bool) -> float:
    """Wall time of the earlier completed invocations into ``out`` (``timing.json``), 0 after ``restart``."""
    path = out / "timing.json"
    if restart or not path.is_file():
        return 0.0
    try:
        return float(_files.read_json(path).get("total_s", 0.0))
    except (ValueError, TypeError, AttributeError):
        return 0.0


def write_outputs(folder: Path, results: RunResults, timing: dict[str, float], *, render: Renderer) -> None:
    """Plots and table first (``render``), then ``timing.json``, ``results.json`` last; each atomically."""
    render(folder, results)
    _files.write_json(folder / "timing.json", timing, sort_keys=False)
    results.save(folder)
