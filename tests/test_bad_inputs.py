"""A catalogue of bad inputs: each is one line, ``error: <problem>: <fix>``, exit status 2, and nothing else.

Command-line cases run in-process through :func:`gradsae.cli.main` and must fail
before any model loads (loading one fails the test), except those marked
``model=True``, whose check needs the model's shape: they get a tiny random model.
Every case also checks that no traceback was printed and no file was left behind.
Library cases call the public entry points and expect one :class:`GradSAEError`
whose message is one line.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import gradsae.cli.eval_sae
import gradsae.cli.score
import gradsae.cli.train_sae
import gradsae.experiments.run
import gradsae.models
from gradsae import _files
from gradsae.cli import main
from gradsae.errors import GradSAEError
from gradsae.models import LoadedModel, load_model
from gradsae.objectives import NextTokenProb, label_tokens
from gradsae.sae_formats import load_sae, save_sae
from gradsae.scores import ScoreOptions, score_latents
from gradsae.splice import Edit, splice
from gradsae.tasks import load_task
from tests.helpers import CharTokenizer, tiny_sae
from tests.tiny_files import tiny_model, tiny_tokenizer

LOADERS = (gradsae.models, gradsae.cli.score, gradsae.experiments.run, gradsae.cli.train_sae, gradsae.cli.eval_sae)


@dataclass(frozen=True)
class Cli:
    """One command line (``{d}`` is the folder of prepared bad files) and words its error must hold."""

    id: str
    argv: str
    needles: tuple[str, ...]
    model: bool = False
    """The check needs the model: a tiny random one is loaded instead of the default."""
    patch: str | None = None
    """A simulated machine condition: ``readonly``, ``full-disk`` or ``locked``."""
    xfail: str | None = None


CLI = [
    # -- score: model, device, counts, outputs --------------------------------------------------------------------
    Cli("score-missing-gguf", "score --model {d}/missing.gguf", ("does not exist", "check the path")),
    Cli("score-not-gguf", "score --model {d}/fake.gguf", ("not a GGUF file", "pass a real .gguf")),
    Cli("score-model-text-file", "score --model {d}/notes.txt", ("neither a model folder", "pass a model folder")),
    Cli("score-model-empty-folder", "score --model {d}/empty", ("no config.json", "pass a Hugging Face model")),
    Cli("score-model-missing-folder", "score --model {d}/nowhere/", ("does not exist", "check the path")),
    Cli("score-device-tpu9", "score --device tpu9", ("unknown device 'tpu9'", "use cpu")),
    Cli("score-device-absent", "score --device {gpu}", ("this machine",)),
    Cli("score-top-0", "score --top 0", ("--top must be at least 1", "pass --top 1")),
    Cli("score-top-negative", "score --top -5", ("--top must be at least 1", "pass --top 1")),
    Cli("score-top-not-int", "score --top many", ("invalid int value", "--help")),
    Cli("score-json-unwritable-parent", "score --json {d}/notes.txt/out.json", ("is a file", "choose another")),
    Cli("score-json-is-folder", "score --json {d}/empty", ("is a folder", "name a file")),
    Cli("score-json-read-only", "score --json {d}/ro/out.json", ("not writable", "choose a folder"), patch="readonly"),
    Cli(
        "score-json-full-disk",
        "score --model tiny --sae {d}/sae --json {d}/out.json",
        ("No space left on device", "free some disk space"),
        model=True,
        patch="full-disk",
    ),
    Cli("score-empty-prompt", "score --prompt ''", ("--prompt is empty", "pass --prompt")),
    Cli("score-prompts-missing", "score --prompts {d}/nowhere.txt", ("does not exist", "one prompt per line")),
    Cli("score-prompts-not-utf8", "score --prompts {d}/latin1.txt", ("cannot read prompt file", "UTF-8")),
    Cli("score-prompts-blank", "score --prompts {d}/blank.txt", ("holds no prompt", "one prompt per line")),
    Cli("score-prompts-jsonl-field", "score --prompts {d}/noprompt.jsonl", ('"prompt" field',)),
    Cli("score-prompts-html", "score --prompts {d}/notes.txt --html {d}/o.html", ("one prompt", "drop")),
    Cli("score-device-map-unknown", "score --device-map banana", ("unknown device map", "use auto")),
    Cli("reproduce-device-map-unknown", "reproduce --out {d}/o --device-map x", ("unknown device map", "use auto")),
    Cli("score-whitespace-prompt", "score --prompt '  \t '", ("--prompt is empty", "pass --prompt")),
    # -- score: objective options --------------------------------------------------------------------------------
    Cli("score-target-missing", "score --objective target", ("needs a continuation", "pass --target")),
    Cli("score-target-stray", "score --target Paris", ("--objective target only", "drop it")),
    Cli("score-label-one-label", "score --objective label --labels yes --label yes", ("needs --labels", "pass both")),
    Cli("score-label-not-listed", "score --objective label --labels yes,no --label maybe", ("--label one of",)),
    Cli("score-label-twice", "score --objective label --labels yes,yes --label yes", ("twice", "list each label")),
    Cli("score-labels-stray", "score --labels yes,no", ("--objective label only", "drop them")),
    Cli("score-objective-unknown", "score --objective loss", ("invalid choice", "--help")),
    Cli(
        "score-label-multi-token-clash",
        "score --model tiny --sae {d}/sae --objective label --labels 'w1 w2,w1 w3' --label 'w1 w2'",
        ("share a first token", "choose labels that start differently"),
        model=True,
    ),
    Cli("score-unknown-option", "score --topk 5", ("unrecognized arguments", "--help")),
    # -- score: layer and SAE ------------------------------------------------------------------------------------
    Cli("score-layer-negative", "score --layer=-1", ("--layer must be at least 0", "pass --layer 0")),
    Cli("score-layer-out-of-range", "score --model tiny --layer 7", ("layer 7 is out of range", "0..1"), model=True),
    Cli("score-layer-past-folder-model", "score --model {d}/hfmodel --layer 9", ("out of range", "layers 0..1")),
    Cli("score-sae-missing", "score --sae {d}/nowhere", ("does not exist", "pass a folder")),
    Cli("score-sae-no-weights", "score --sae {d}/empty", ("holds no SAE weights", "expected")),
    Cli("score-sae-nan", "score --sae {d}/sae-nan", ("NaN",)),
    Cli("score-sae-d-sae-mismatch", "score --sae {d}/sae-dsae", ("do not belong together",)),
    Cli("score-sae-pickle", "score --sae {d}/sae-pickle", ("not a safetensors file", "re-save")),
    Cli("score-sae-bad-cfg", "score --sae {d}/sae-badcfg", ("not valid JSON", "re-save")),
    Cli(
        "score-sae-wrong-width",
        "score --model tiny --sae {d}/sae-wide --layer 0",
        ("does not match the model's hidden size", "use an SAE trained on this model"),
        model=True,
    ),
    Cli("score-sae-layer-placeholder", "score --sae {d}/sae_{{layer}}", ("has {layer} in it", "pass --layer")),
    # -- reproduce -----------------------------------------------------------------------------------------------
    Cli("reproduce-ks-150", "reproduce --out {d}/o --ks 150%", ("150%", "(0%, 100%]")),
    Cli("reproduce-ks-0", "reproduce --out {d}/o --ks 0", ("neither a positive integer",)),
    Cli("reproduce-ks-0-percent", "reproduce --out {d}/o --ks 0%", ("0%", "(0%, 100%]")),
    Cli("reproduce-ks-twice", "reproduce --out {d}/o --ks 1,10,1", ("names 1 twice", "list each K once")),
    Cli("reproduce-ks-word", "reproduce --out {d}/o --ks 1,lots", ("--ks", "percentage like 50%")),
    Cli("reproduce-ks-empty", "reproduce --out {d}/o --ks ,", ("names no K", "pass e.g.")),
    Cli("reproduce-layers-twice", "reproduce --out {d}/o --layers 6,6", ("layer 6 twice", "list each layer once")),
    Cli("reproduce-layers-negative", "reproduce --out {d}/o --layers=-2,6", ("negative layer", "count from 0")),
    Cli("reproduce-layers-words", "reproduce --out {d}/o --layers six", ("comma-separated integers",)),
    Cli("reproduce-n-0", "reproduce --out {d}/o --n 0", ("--n must be at least 1", "pass --n 1")),
    Cli("reproduce-n-negative", "reproduce --out {d}/o --n -3", ("--n must be at least 1",)),
    Cli("reproduce-batch-0", "reproduce --out {d}/o --batch-size 0", ("--batch-size must be at least 1",)),
    Cli("reproduce-curves-n-0", "reproduce --out {d}/o --curves --curves-n 0", ("--curves-n must be at least 1",)),
    Cli("sweep-unknown-task", "sweep --out {d}/o --tasks sst2,nope", ("unknown task 'nope'",)),
    Cli("sweep-bad-ks", "sweep --out {d}/o --ks 10,lots", ("neither a positive integer",)),
    Cli("reproduce-max-new-0", "reproduce --out {d}/o --max-new-tokens 0", ("--max-new-tokens must be at least 1",)),
    Cli("reproduce-seed-negative", "reproduce --out {d}/o --seed -1", ("--seed must be at least 0",)),
    Cli(
        "reproduce-positions",
        "reproduce --out {d}/o --steer-positions middle",
        ("--steer-positions", "use a comma list of last"),
    ),
    Cli("reproduce-mode", "reproduce --out {d}/o --mode both", ("invalid choice", "--help")),
    Cli("reproduce-out-missing", "reproduce", ("--out", "required")),
    Cli("reproduce-out-is-file", "reproduce --out {d}/notes.txt", ("is an existing file", "choose a folder path")),
    Cli("reproduce-out-under-file", "reproduce --out {d}/notes.txt/run", ("is a file", "choose another path")),
    Cli("reproduce-out-read-only", "reproduce --out {d}/ro/run", ("not writable", "choose a folder"), patch="readonly"),
    Cli(
        "reproduce-out-in-use",
        "reproduce --out {d}/busy --task {d}/good.jsonl",
        ("in use by another", "wait for it"),
        patch="locked",
    ),
    Cli("reproduce-model-not-gguf", "reproduce --out {d}/o --model {d}/fake.gguf", ("not a GGUF file",)),
    Cli("reproduce-device-tpu9", "reproduce --out {d}/o --device tpu9", ("unknown device", "use cpu")),
    Cli("reproduce-sae-placeholder", "reproduce --out {d}/o --sae {d}/sae_{{layer}}", ("pass --layer",)),
    Cli("reproduce-sae-layer-missing", "reproduce --out {d}/o --sae {d}/l{{layer}} --layers 0,1", ("l1 does not",)),
    Cli("reproduce-task-missing", "reproduce --out {d}/o --task {d}/missing.jsonl", ("does not exist", "check")),
    Cli("reproduce-task-unknown", "reproduce --out {d}/o --task imdb", ("unknown task 'imdb'", "use sst2")),
    Cli("reproduce-task-txt", "reproduce --out {d}/o --task {d}/notes.txt", ("cannot read task file", "use a")),
    Cli("reproduce-task-mixed-labels", "reproduce --out {d}/o --task {d}/mixed.jsonl", ("mixes answer types",)),
    Cli("reproduce-task-duplicate-ids", "reproduce --out {d}/o --task {d}/dup.jsonl", ("id 'a' twice", "unique id")),
    Cli("reproduce-task-blank-prompt", "reproduce --out {d}/o --task {d}/blank.jsonl", ("row 2 has an empty prompt",)),
    Cli("reproduce-task-no-answer", "reproduce --out {d}/o --task {d}/noanswer.csv", ("row 2 has no answer",)),
    Cli("reproduce-task-latin1", "reproduce --out {d}/o --task {d}/latin1.jsonl", ("not UTF-8", "re-save it as UTF-8")),
    Cli("reproduce-task-bad-json", "reproduce --out {d}/o --task {d}/badline.jsonl", ("line 2 is not JSON",)),
    Cli("reproduce-task-column", "reproduce --out {d}/o --task {d}/nocol.jsonl", ("no column", "--answer-column")),
    Cli("reproduce-squad-missing", "reproduce --out {d}/o --task squad --squad {d}/dev.json", ("does not exist",)),
    Cli(
        "reproduce-foreign-results",
        "reproduce --out {d}/foreign --model tiny --sae {d}/sae --task {d}/good.jsonl --n 2",
        ("already holds a results.json", "add --restart"),
        model=True,
    ),
    Cli(
        "reproduce-other-config",
        "reproduce --out {d}/other --model tiny --sae {d}/sae --task {d}/good.jsonl --n 2",
        ("another configuration", "add --restart"),
        model=True,
    ),
    # -- train-sae -----------------------------------------------------------------------------------------------
    Cli("train-layers-twice", "train-sae --out {d}/t --layers 6,6", ("layer 6 twice", "list each layer once")),
    Cli("train-tokens-0", "train-sae --out {d}/t --tokens 0", ("--tokens and --sae-batch must be positive",)),
    Cli("train-tokens-negative", "train-sae --out {d}/t --tokens -5", ("not a count", "--help")),
    Cli("train-k-over-width", "train-sae --out {d}/t --k 64 --width 32", ("need 0 < --k <= --width",)),
    Cli("train-lr-0", "train-sae --out {d}/t --lr 0", ("--lr must be a positive number",)),
    Cli("train-lr-nan", "train-sae --out {d}/t --lr nan", ("--lr must be a positive number",)),
    Cli("train-decay", "train-sae --out {d}/t --decay-fraction 2", ("between 0 and 1",)),
    Cli("train-context-1", "train-sae --out {d}/t --context 1", ("--context must be at least 2",)),
    Cli("train-threads-0", "train-sae --out {d}/t --threads 0", ("--threads must be at least 1",)),
    Cli("train-eval-negative", "train-sae --out {d}/t --eval-tokens -1", ("not a count",)),
    Cli("train-out-is-file", "train-sae --out {d}/notes.txt", ("is an existing file",)),
    Cli("train-model-not-gguf", "train-sae --out {d}/t --model {d}/fake.gguf", ("not a GGUF file",)),
    Cli("train-corpus-missing", "train-sae --out {d}/t --corpus {d}/missing.txt", ("does not exist", "--corpus")),
    Cli("train-corpus-latin1", "train-sae --out {d}/t --corpus {d}/latin1.txt", ("not UTF-8", "re-save")),
    Cli(
        "train-layer-out-of-range",
        "train-sae --out {d}/t --model tiny --corpus {d}/corpus.txt --layers 5",
        ("layer 5 is out of range", "0..1"),
        model=True,
    ),
    # -- eval-sae ------------------------------------------------------------------------------------------------
    Cli("eval-layers-twice", "eval-sae --out {d}/e --layers 6,6", ("layer 6 twice", "list each layer once")),
    Cli("eval-tokens-negative", "eval-sae --out {d}/e --tokens -5", ("not a count", "--help")),
    Cli("eval-n-task-negative", "eval-sae --out {d}/e --n-task -1", ("--n-task must be at least 0",)),
    Cli("eval-nothing", "eval-sae --out {d}/e --tokens 0 --n-task 0", ("nothing to measure", "pass e.g.")),
    Cli("eval-unknown-task", "eval-sae --out {d}/e --tasks sst2,nope", ("unknown task 'nope'", "use any of")),
    Cli("eval-task-twice", "eval-sae --out {d}/e --tasks sst2,sst2", ("name each task once",)),
    Cli("eval-context-1", "eval-sae --out {d}/e --context 1", ("--context must be at least 2",)),
    Cli("eval-new-tokens-0", "eval-sae --out {d}/e --new-tokens 0", ("--new-tokens must be at least 1",)),
    Cli("eval-batch-0", "eval-sae --out {d}/e --batch-size 0", ("--batch-size must be at least 1",)),
    Cli("eval-no-shipped-layer", "eval-sae --out {d}/e --layers 6,3", ("no shipped SAE at layer 3", "--sae")),
    Cli(
        "eval-model-without-sae", "eval-sae --out {d}/e --model {d}/hfmodel --layers 1", ("no SAEs ship", "pass --sae")
    ),
    Cli("eval-sae-one-folder", "eval-sae --out {d}/e --sae {d}/sae --layers 0,1", ("one folder for 2 layers",)),
    Cli("eval-sae-missing", "eval-sae --out {d}/e --sae {d}/nowhere_{{layer}} --layers 0", ("does not exist",)),
    Cli("eval-out-is-file", "eval-sae --out {d}/notes.txt", ("is an existing file",)),
    Cli(
        "eval-sae-wrong-width",
        "eval-sae --out {d}/e --model tiny --sae {d}/sae-wide --layers 0 --n-task 0 --tokens 10",
        ("does not match the model's hidden size",),
        model=True,
    ),
    # -- report --------------------------------------------------------------------------------------------------
    Cli("report-missing", "report {d}/nowhere", ("does not exist", "gradsae reproduce")),
    Cli("report-corrupt", "report {d}/corrupt", ("not a gradsae results file", "rerun")),
    Cli("report-latin1", "report {d}/latin1run", ("not a gradsae results file",)),
    Cli("report-wrong-shape", "report {d}/shape", ("not a gradsae results file",)),
]


@dataclass(frozen=True)
class Lib:
    """One library call and words its :class:`GradSAEError` must hold."""

    id: str
    call: Callable[[Path], Any]
    needles: tuple[str, ...]
    xfail: str | None = None


def _lm() -> LoadedModel:
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    return LoadedModel(model=tiny_model().requires_grad_(False), tokenizer=tok, name="tiny")


def _score(ids: Any, mask: Any = None, method: Any = "gradsae", **options: Any) -> Any:
    inputs = {"input_ids": ids, "attention_mask": mask}
    return score_latents(
        _lm(), tiny_sae(layer=0), inputs, NextTokenProb(), method=method, options=ScoreOptions(**options)
    )


IDS = torch.tensor([[1, 5, 6, 7]])
LIB = [
    Lib("load_model-not-gguf", lambda d: load_model(d / "fake.gguf"), ("not a GGUF file",)),
    Lib("load_model-device", lambda d: load_model(d / "fake.gguf", device="tpu9"), ("unknown device",)),
    Lib("load_model-cuda-index", lambda d: load_model(device="cuda:99"), ("cuda:99",)),
    Lib("load_model-text-file", lambda d: load_model(d / "notes.txt"), ("neither a model folder",)),
    Lib("load_sae-missing", lambda d: load_sae(d / "nowhere"), ("does not exist",)),
    Lib("load_sae-nan", lambda d: load_sae(d / "sae-nan"), ("NaN",)),
    Lib("load_sae-inf", lambda d: load_sae(d / "sae-inf"), ("inf",)),
    Lib("load_sae-d_sae-mismatch", lambda d: load_sae(d / "sae-dsae"), ("do not belong together",)),
    Lib("load_sae-pickle-as-safetensors", lambda d: load_sae(d / "sae-pickle"), ("not a safetensors file",)),
    Lib("load_sae-bad-cfg", lambda d: load_sae(d / "sae-badcfg"), ("not valid JSON",)),
    Lib("score_latents-method", lambda d: _score(IDS, method="best"), ("unknown scoring method",)),
    Lib("score_latents-aggregation", lambda d: _score(IDS, aggregation="max"), ("unknown aggregation",)),
    Lib(
        "score_latents-inputs-without-ids",
        lambda d: score_latents(_lm(), tiny_sae(layer=0), {"ids": IDS}, NextTokenProb()),
        ("score_latents(lm, sae, inputs, objective)", "tokenizer's output"),
    ),
    Lib("score_latents-1d-ids", lambda d: _score(IDS[0]), ("[batch, pos]", "ids[None]")),
    Lib("score_latents-float-ids", lambda d: _score(IDS.float()), ("integer token ids",)),
    Lib("score_latents-id-out-of-vocab", lambda d: _score(IDS + 1000), ("outside the model's vocabulary",)),
    Lib("score_latents-mask-shape", lambda d: _score(IDS, torch.ones(1, 3)), ("attention_mask must have",)),
    Lib("score_latents-mask-empty-row", lambda d: _score(IDS, torch.zeros(1, 4)), ("all padding",)),
    Lib("score_latents-layer", lambda d: _score(IDS, layer=5), ("layer 5 is out of range",)),
    Lib("splice-mode", lambda d: splice(_lm(), tiny_sae(layer=0), mode="both").__enter__(), ("unknown splice mode",)),
    Lib("splice-width", lambda d: splice(_lm(), tiny_sae(d_in=8), 0).__enter__(), ("does not match",)),
    Lib("Edit-op", lambda d: Edit([1], op="scale"), ("unknown edit 'scale'",)),
    Lib("Edit-positions", lambda d: Edit([1], positions="first"), ("unknown positions 'first'",)),
    Lib("Edit-fractional-latents", lambda d: Edit([1.5]), ("whole latent ids",)),
    Lib("Edit-nan-values", lambda d: Edit([1], op="set", values=float("nan")), ("NaN or infinity",)),
    Lib("Edit-3d-latents", lambda d: Edit(torch.zeros(1, 2, 3, dtype=torch.long)), ("[n] or [batch, n]",)),
    Lib("Edit-ragged-latents", lambda d: Edit([[1, 2], [3]]), ("cannot be read as a tensor",)),
    Lib("Edit-1d-position-mask", lambda d: Edit([1], positions=torch.ones(4, dtype=torch.bool)), ("[batch, pos]",)),
    Lib("label-no-tokens", lambda d: label_tokens(CharTokenizer(), ["\u00e9", "b"]), ("encodes to no tokens",)),
    Lib("load_task-unknown", lambda d: load_task("imdb", n=4), ("unknown task",)),
    Lib("load_task-mixed", lambda d: load_task(d / "mixed.jsonl", n=4), ("mixes answer types",)),
    Lib("load_task-duplicate-ids", lambda d: load_task(d / "dup.jsonl", n=4), ("twice",)),
    Lib("load_task-whitespace-prompt", lambda d: load_task(d / "blank.jsonl", n=4), ("empty prompt",)),
    Lib("load_task-not-utf8", lambda d: load_task(d / "latin1.jsonl", n=4), ("not UTF-8",)),
    Lib("load_task-squad-not-utf8", lambda d: load_task(d / "latin1.json", n=4), ("not UTF-8",)),
    Lib("write-full-disk", lambda d: _full_disk(lambda: _files.write_json(d / "w.json", {"a": 1})), ("No space",)),
]


# -- the bad files ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of prepared bad (and a few good) inputs, shared by all cases."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty").mkdir()
    (d / "fake.gguf").write_bytes(b"PK\x03\x04 a zip, renamed")
    (d / "notes.txt").write_text("just notes\n")
    (d / "blank.txt").write_text("\n  \n")
    (d / "noprompt.jsonl").write_text('{"text": "hi"}\n')
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n\nun autre\n".encode("latin-1"))
    _saes(d)
    _tasks(d)
    _runs(d)
    tiny_model().config.save_pretrained(d / "hfmodel")
    return d


def _saes(d: Path) -> None:
    save_sae(tiny_sae("topk", layer=0), d / "sae")
    save_sae(tiny_sae("topk", layer=0), d / "l0")
    save_sae(tiny_sae(d_in=8, layer=0), d / "sae-wide")
    for name, value in (("sae-nan", float("nan")), ("sae-inf", float("inf"))):
        sae = tiny_sae(layer=0)
        with torch.no_grad():
            sae.W_dec[3, 2] = value
        save_sae(sae, d / name)
    save_sae(tiny_sae(layer=0), d / "sae-dsae")
    cfg = json.loads((d / "sae-dsae" / "cfg.json").read_text())
    (d / "sae-dsae" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 32}))
    save_sae(tiny_sae(layer=0), d / "sae-pickle")
    marker = d / "UNPICKLED"
    payload = pickle.dumps({"W_enc": _Tripwire(str(marker))})
    (d / "sae-pickle" / "sae_weights.safetensors").write_bytes(payload)
    save_sae(tiny_sae(layer=0), d / "sae-badcfg")
    (d / "sae-badcfg" / "cfg.json").write_text("{not json")


class _Tripwire:
    """Unpickling this creates a file: proof that a loader ran pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def _tasks(d: Path) -> None:
    def jsonl(name: str, *rows: dict[str, Any]) -> None:
        (d / name).write_text("".join(json.dumps(row) + "\n" for row in rows))

    jsonl("good.jsonl", {"prompt": "w1 w2", "answer": "w3"}, {"prompt": "w4", "answer": "w5"})
    jsonl("mixed.jsonl", {"prompt": "a", "answer": "positive"}, {"prompt": "b", "answer": 1})
    jsonl("dup.jsonl", {"id": "a", "prompt": "x", "answer": "y"}, {"id": "a", "prompt": "z", "answer": "y"})
    jsonl("blank.jsonl", {"prompt": "fine", "answer": "y"}, {"prompt": " \t\n ", "answer": "y"})
    jsonl("nocol.jsonl", {"prompt": "fine", "label": "y"})
    (d / "noanswer.csv").write_text("prompt,answer\nfine,yes\nlonely\n")
    (d / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "answer": "y"}\n'.encode("latin-1"))
    (d / "latin1.json").write_bytes('{"data": [{"title": "caf\xe9"}]}'.encode("latin-1"))
    (d / "badline.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a",\n')
    (d / "corpus.txt").write_text("w1 w2 w3 w4\n\nw5 w6 w7\n\nw8 w9 w10\n")


def _runs(d: Path) -> None:
    (d / "corrupt").mkdir()
    (d / "corrupt" / "results.json").write_text('{"config": {"task": ')
    (d / "latin1run").mkdir()
    (d / "latin1run" / "results.json").write_bytes(b'{"config": "\xe9"}')
    (d / "shape").mkdir()
    (d / "shape" / "results.json").write_text("{}")
    (d / "foreign").mkdir()
    (d / "foreign" / "results.json").write_text("{}")
    (d / "other" / "journal").mkdir(parents=True)
    (d / "other" / "journal" / "run.json").write_text(json.dumps({"fingerprint": "0" * 64, "config": {"seed": 5}}))
    (d / "busy").mkdir()


# -- running the cases --------------------------------------------------------------------------------------------
def _files_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def _gpu_absent() -> str:
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Loading a model fails the test; ``model=True`` cases get a tiny one (recorded in the list)."""
    loaded: list[str] = []

    def forbidden(name: Any = None, **_: Any) -> LoadedModel:
        raise AssertionError(f"a model was loaded ({name}) before the bad input was refused")

    for module in LOADERS:
        monkeypatch.setattr(module, "load_model", forbidden)
    yield loaded


def _tiny_loader(loaded: list[str]) -> Callable[..., LoadedModel]:
    def load(name: Any = None, **_: Any) -> LoadedModel:
        loaded.append(str(name))
        return _lm()

    return load


def _simulate(patch: str | None, monkeypatch: pytest.MonkeyPatch, d: Path) -> Iterator[None]:
    if patch == "readonly":

        def refuse(path: Path, data: bytes) -> None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

        monkeypatch.setattr(_files, "_write_bytes", refuse)
    elif patch == "full-disk":
        monkeypatch.setattr(_files, "_write_bytes", _half_then_enospc)
    if patch != "locked":
        yield
        return
    fd = os.open(d / "busy" / _files.LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"4242\n", 0)
        yield
    finally:
        os.close(fd)


def _half_then_enospc(path: Path, data: bytes) -> None:
    """Write half of ``data``, then fail as a full disk does; probes (tiny writes) pass."""
    if data == b"probe":
        path.write_bytes(data)
        return
    path.write_bytes(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _full_disk(write: Callable[[], Any]) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_files, "_write_bytes", _half_then_enospc)
        return write()


def _cases(cases: list[Any]) -> list[Any]:
    marks = {c.id: [pytest.mark.xfail(strict=False, reason=c.xfail)] if c.xfail else [] for c in cases}
    return [pytest.param(c, id=c.id, marks=marks[c.id]) for c in cases]


@pytest.mark.parametrize("case", _cases(CLI))
def test_command_line(case: Cli, bad: Path, no_model: list[str], monkeypatch, capsys) -> None:
    if case.model:
        for module in LOADERS:
            monkeypatch.setattr(module, "load_model", _tiny_loader(no_model))
    argv = shlex.split(case.argv.format(d=bad, gpu=_gpu_absent()))
    before = _files_under(bad)
    simulation = _simulate(case.patch, monkeypatch, bad)
    next(simulation)
    try:
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    finally:
        next(simulation, None)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and ": " in err[len("error: ") :]
    for needle in case.needles:
        assert needle.lower() in err.lower(), (needle, err)
    left = {p for p in _files_under(bad) - before if p.name != _files.LOCK}
    assert not left, f"left behind: {sorted(map(str, left))}"
    assert not (bad / "UNPICKLED").exists(), "a pickle was unpickled"
    if case.patch == "full-disk":
        assert "GradSAE influence" in out, "the scores are printed before the file is written"
    assert bool(no_model) == case.model


@pytest.mark.parametrize("case", _cases(LIB))
def test_library(case: Lib, bad: Path) -> None:
    before = _files_under(bad)
    with pytest.raises(GradSAEError) as caught:
        case.call(bad)
    message = str(caught.value)
    assert "\n" not in message and ": " in message, message
    for needle in case.needles:
        assert needle.lower() in message.lower(), (needle, message)
    assert _files_under(bad) == before
    assert not (bad / "UNPICKLED").exists(), "a pickle was unpickled"


def test_catalogue_size() -> None:
    assert len(CLI) + len(LIB) >= 40
