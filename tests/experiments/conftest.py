"""Fixtures only: one tiny run folder (results, examples, cards, plots, report.html), built once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gradsae.cli.reproduce import write_outputs
from gradsae.experiments.cards import compute_cards, run_latents
from gradsae.experiments.record import ExampleRecorder
from gradsae.experiments.results import CardSet, ExampleDump, RunResults, cards_path
from gradsae.experiments.run import run_layer
from gradsae.models import LoadedModel
from gradsae.report.html import write_run_page
from gradsae.sae import SAE
from gradsae.training.activations import heldout_tokens
from tests import helpers
from tests.experiments.test_run import _cfg, _half_right_task, _meta

CORPUS = (
    "the quick brown fox jumps over the lazy dog. " * 2,
    "hello world, this is a tiny corpus of text! " * 2,
    "zebras and lions live on the plains, far away. " * 2,
)


@dataclass(frozen=True)
class TinyRun:
    """A run folder made the way `reproduce` and `cards` make one, on the tiny model."""

    folder: Path
    lm: LoadedModel
    sae: SAE
    results: RunResults
    dump: ExampleDump
    cards: CardSet
    corpus: torch.Tensor
    """``[n_seq, context]`` the cards' corpus sequences."""


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        return _build(tmp_path_factory.mktemp("tiny_run"))
    finally:
        torch.set_num_threads(threads)


FIVE = ("gradsae", "activation", "random", "ig", "relp")
"""The ranking methods of :func:`five_methods`' run."""


@pytest.fixture(scope="session")
def five_methods() -> tuple[LoadedModel, SAE, ExampleDump]:
    """The tiny run's model, SAE and task with ``methods`` = :data:`FIVE` (error mode: ig and relp's),
    its ``examples.json`` content; no steering floors, K 1 and 3, to keep it short."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        lm, sae = helpers.char_lm(seed=4), helpers.tiny_sae("topk", d_sae=48, seed=2)
        cfg = _cfg(methods=FIVE, mode="error", ks=(1, 3), floors=False, ig_steps=4)
        task, _ = _half_right_task(lm, sae, cfg)
        recorder = ExampleRecorder(lm.tokenizer)
        run_layer(lm, sae, task, cfg, recorder=recorder)
        return lm, sae, recorder.dump()
    finally:
        torch.set_num_threads(threads)


def _build(folder: Path) -> TinyRun:
    lm, sae = helpers.char_lm(seed=4), helpers.tiny_sae("topk", d_sae=48, seed=2)
    cfg = _cfg()
    task, _ = _half_right_task(lm, sae, cfg)
    recorder = ExampleRecorder(lm.tokenizer)
    results = RunResults(config=_meta(cfg), layers=(run_layer(lm, sae, task, cfg, recorder=recorder),))
    dump = recorder.dump()
    dump.save(folder)
    write_outputs(folder, results, {"total_s": 0.0})
    corpus = heldout_tokens(lm.tokenizer, CORPUS, context=24, n_sequences=6)
    part = dump.layers[0]
    first = part.examples[0].top["gradsae"][0][0]
    latents = sorted({first, *run_latents(part)[:3]})
    cards = compute_cards(lm, sae, corpus, latents, layer=0, label="random", corpus="tiny", examples=part, batch=3)
    cards.save(cards_path(folder, 0))
    write_run_page(folder, results, images=sorted(folder.glob("*.png")))
    return TinyRun(folder=folder, lm=lm, sae=sae, results=results, dump=dump, cards=cards, corpus=corpus)
