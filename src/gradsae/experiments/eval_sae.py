"""An SAE's figures on three held-out sets, and the task accuracy with it spliced in (``gradsae eval-sae``).

1. Per SAE (layer ``l``) and set (:mod:`gradsae.experiments.eval_sets`), from
   :func:`gradsae.training.evaluate.evaluate_all`: with ``x`` the residual after block
   ``l`` at the counted positions, ``x^`` its reconstruction and ``h`` its latents,

   * ``FVU = sum ||x - x^||^2 / sum ||x - mean(x)||^2``; ``L0`` = mean ``#{c: h_c > 0}``;
     ``dead`` = share of latents that never fire on the set; ``cos`` = mean ``cos(x, x^)``;
   * ``FVU typical``: the FVU without the tokens whose ``||x||`` exceeds :data:`TYPICAL` times
     the set's median ``||x||`` (massive activations: a plain few-shot prompt has no BOS, and
     its second token can carry a residual ~80x the median, enough to dominate the pooled
     variance and make the pooled FVU small however the rest is reconstructed);
   * over the next-token predictions made at counted positions (not a row's last):
     ``CE_clean``, ``CE_sae`` (the residual replaced by ``x^`` at every spliced
     position), ``CE_zero`` (replaced by 0), ``CE recovered = (CE_zero - CE_sae) /
     (CE_zero - CE_clean)``, and ``KL(p_clean || p_sae)``, ``KL(p_clean || p_zero)``.

   Spliced: every real token but each row's first (never spliced, as in training and
   in the experiments); padding is never spliced nor counted.
2. Per task, the experiments' greedy decoding and scoring (:func:`Task.score`: the
   label for ``sst2``, SQuAD exact match for the generated tasks) on ``n`` examples
   drawn with ``seed``, for the clean model and for each SAE spliced in ``replace``
   mode (the paper's) and in ``error`` mode. ``error`` mode leaves the model exact, so
   its answers must be the clean ones token for token: :attr:`Accuracy.differs`
   counts the examples where they are not (a check, expected 0).

:class:`EvalSAEResults` holds everything and writes ``eval_sae.json`` and ``eval_sae.md``;
:func:`card_section` is one layer's part of it, for that SAE's model card.

Resuming (:mod:`gradsae.experiments.journal`): each finished unit is journaled under
``<out>/journal/`` as soon as it is done: each set's token rows (``set-<name>``; the
``generated`` set costs greedy decoding), each (set, layer) figure
(``figures-<set>-<layer>``), each task's clean answers (``clean-<task>``, with their token
ids, which ``error`` mode is checked against) and each (task, layer, mode) accuracy
(``acc-<task>-<layer>-<mode>``). A rerun of the same command (the fingerprint covers every
setting, the examples and the SAEs' weights) measures only the missing units and
assembles ``eval_sae.json`` from the journaled values, so it writes what an uninterrupted
run writes; :attr:`EvalSAEResults.seconds` is the measuring time summed over the units,
whichever run measured them. Per-layer figures do not depend on which other SAEs share
the pass (:func:`~gradsae.training.evaluate.evaluate_all` keeps them apart).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradsae import _files
from gradsae.experiments.config import ExperimentConfig, SpliceSpec
from gradsae.experiments.decode import decode, prompt_batches
from gradsae.experiments.eval_sets import EvalSet
from gradsae.experiments.journal import Journal, recall, unit_key
from gradsae.experiments.stats import Stat, stat
from gradsae.models import LoadedModel
from gradsae.sae import SAE
from gradsae.splice import Mode
from gradsae.tasks import Task
from gradsae.training.evaluate import evaluate_all

log = logging.getLogger(__name__)

JSON = "eval_sae.json"
MARKDOWN = "eval_sae.md"
MODES: tuple[Mode, ...] = ("replace", "error")
BOOTSTRAP = 1000
TYPICAL = 10.0
"""A token whose residual norm exceeds this many times the set's median is a massive activation."""


@dataclass(frozen=True)
class SetFigures:
    """One SAE on one set."""

    set: str
    layer: int
    tokens: int
    """Counted tokens (residual figures)."""
    sequences: int
    predictions: int
    """Counted next-token predictions (CE and KL)."""
    fvu: float
    fvu_typical: float
    """FVU without the counted tokens whose ``|x|`` exceeds ``TYPICAL`` x the set's median ``|x|``."""
    outliers: int
    """Those tokens (massive activations), left out of ``fvu_typical`` only."""
    cossim: float
    """Mean cosine of ``x`` and ``x^`` per token."""
    l0: float
    dead_fraction: float
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_recovered: float
    kl_sae: float
    """Mean ``KL(p_clean || p_sae)`` per prediction (nats)."""
    kl_zero: float


@dataclass(frozen=True)
class Accuracy:
    """One task's score under one condition."""

    task: str
    condition: str
    """``clean``, ``replace`` or ``error``."""
    layer: int | None
    """The spliced layer (``None`` for ``clean``)."""
    exact: Stat
    """Accuracy (classification) or exact match (generative), 0-100 with a 95% bootstrap interval."""
    f1: Stat
    differs: int = 0
    """Examples whose generated tokens differ from the clean model's."""
    per_example: tuple[float, ...] = ()
    """Exact score of each example, in drawing order."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Accuracy:
        return cls(
            **{
                **data,
                "exact": Stat.from_dict(data["exact"]),
                "f1": Stat.from_dict(data["f1"]),
                "per_example": tuple(data.get("per_example", ())),
            }
        )


@dataclass(frozen=True)
class EvalSAEResults:
    """Everything ``gradsae eval-sae`` measured."""

    config: dict[str, Any]
    """The command, model, SAE labels per layer, budgets, tasks, seed, positions."""
    sets: dict[str, dict[str, Any]]
    """Per set: sequences, counted tokens and predictions, counted tokens per source."""
    figures: tuple[SetFigures, ...]
    accuracy: tuple[Accuracy, ...]
    versions: dict[str, str]
    seconds: float
    """Measuring time: the seconds of every unit summed, across resumed runs (module docstring)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, folder: str | Path) -> Path:
        """Write ``eval_sae.md``, then ``eval_sae.json`` (each atomically); return the JSON path."""
        folder = Path(folder)
        _files.write_text(folder / MARKDOWN, render_markdown(self))
        return _files.write_json(folder / JSON, self.to_json(), sort_keys=False)

    @classmethod
    def load(cls, folder: str | Path) -> EvalSAEResults:
        """Read ``<folder>/eval_sae.json`` (or the file itself)."""
        path = Path(folder)
        data = _files.read_json(path / JSON if path.is_dir() else path)
        return cls(
            config=data["config"],
            sets=data["sets"],
            figures=tuple(SetFigures(**f) for f in data["figures"]),
            accuracy=tuple(Accuracy.from_dict(a) for a in data["accuracy"]),
            versions=data["versions"],
            seconds=float(data["seconds"]),
        )


# -- 1. figures on a set --------------------------------------------------------
def set_figures(lm: LoadedModel, saes: dict[int, SAE], evalset: EvalSet, *, batch: int) -> list[SetFigures]:
    """Each SAE's figures on ``evalset`` (one clean pass per chunk, shared by all SAEs)."""
    device = lm.device
    found = evaluate_all(
        lm,
        saes,
        evalset.input_ids.to(device),
        batch=batch,
        attention_mask=evalset.attention_mask.to(device),
        counted=evalset.counted.to(device),
        typical=TYPICAL,
    )
    out = []
    for layer, (result, core) in found.items():
        out.append(
            SetFigures(
                set=evalset.name,
                layer=layer,
                tokens=result.tokens,
                sequences=core.sequences,
                predictions=predictions(evalset),
                fvu=result.fvu,
                fvu_typical=core.fvu_typical,
                outliers=core.outliers,
                cossim=core.cossim,
                l0=result.l0,
                dead_fraction=result.dead_fraction,
                ce_clean=result.ce_clean,
                ce_sae=result.ce_sae,
                ce_zero=result.ce_zero,
                ce_recovered=result.ce_recovered,
                kl_sae=core.kl_sae,
                kl_zero=core.kl_zero,
            )
        )
    return out


def predictions(evalset: EvalSet) -> int:
    """Counted next-token predictions: counted positions that have a next token."""
    return int(evalset.counted[:, :-1].sum())


def set_info(evalset: EvalSet) -> dict[str, Any]:
    """What a set holds, for the JSON and the tables."""
    return {
        "sequences": int(evalset.input_ids.shape[0]),
        "tokens": evalset.tokens,
        "predictions": predictions(evalset),
        "sources": evalset.sources,
    }


# -- 2. task accuracy -------------------------------------------------------------
def task_accuracy(
    lm: LoadedModel,
    saes: dict[int, SAE],
    task: Task,
    *,
    batch_size: int = 16,
    seed: int = 0,
    journal: Journal | None = None,
) -> list[Accuracy]:
    """Clean, then per layer ``replace`` and ``error`` (both replaying one prefix of blocks ``0..l``).

    Each of these units is taken from ``journal`` when it holds it, else measured and journaled.
    """
    texts = [task.render(example, lm.tokenizer) for example in task.examples]
    first = ExperimentConfig(splice=SpliceSpec(layer=min(saes) if saes else 0), batch_size=batch_size, seed=seed)

    def clean_unit() -> dict[str, Any]:
        gens = decode(lm, prompt_batches(lm, texts, first, reuse=False), task, first, sae=None, edits_for=None)
        ids = [list(g.token_ids) for g in gens]
        return {"accuracy": _accuracy(task, "clean", None, [g.text for g in gens], ids, ids, seed), "token_ids": ids}

    clean = journaled(journal, unit_key("clean", task.name), clean_unit)
    out = [Accuracy.from_dict(clean["accuracy"])]
    for layer, sae in saes.items():
        out += _layer_accuracy(lm, sae, task, texts, first.spliced(layer=layer), clean, journal)
        log.info("%s layer %d: %s", task.name, layer, " ".join(f"{a.condition} {a.exact.mean:.1f}" for a in out[-2:]))
    error = [a for a in out if a.condition == "error" and a.differs]
    for a in error:
        log.warning(
            "%s layer %s: error mode changed %d answers: the splice is not exact", task.name, a.layer, a.differs
        )
    return out


def _layer_accuracy(
    lm: LoadedModel,
    sae: SAE,
    task: Task,
    texts: list[str],
    cfg: ExperimentConfig,
    clean: dict[str, Any],
    journal: Journal | None,
) -> list[Accuracy]:
    """``replace`` and ``error`` at ``cfg.layer`` (the prefix of blocks is built only when a mode is missing)."""
    keys = {mode: unit_key("acc", task.name, cfg.layer, mode) for mode in MODES}
    batches = None
    out = []
    for mode in MODES:
        unit = recall(journal, keys[mode])
        if unit is None:
            if batches is None:
                batches = prompt_batches(lm, texts, cfg, reuse=True)
            began = time.perf_counter()
            gens = decode(lm, batches, task, cfg.spliced(mode=mode), sae=sae, edits_for=None)
            ids = [list(g.token_ids) for g in gens]
            found = _accuracy(task, mode, cfg.layer, [g.text for g in gens], ids, clean["token_ids"], cfg.seed)
            unit = store(journal, keys[mode], {"accuracy": found, "seconds": round(time.perf_counter() - began, 3)})
        out.append(Accuracy.from_dict(unit["accuracy"]))
    return out


def _accuracy(
    task: Task,
    condition: str,
    layer: int | None,
    texts: Sequence[str],
    token_ids: Sequence[Sequence[int]],
    clean_ids: Sequence[Sequence[int]],
    seed: int,
) -> Accuracy:
    scores = [task.score(example, text) for example, text in zip(task.examples, texts, strict=True)]
    return Accuracy(
        task=task.name,
        condition=condition,
        layer=layer,
        exact=stat([s.exact for s in scores], seed=seed, resamples=BOOTSTRAP),
        f1=stat([s.f1 for s in scores], seed=seed, resamples=BOOTSTRAP),
        differs=sum(list(g) != list(c) for g, c in zip(token_ids, clean_ids, strict=True)),
        per_example=tuple(float(s.exact) for s in scores),
    )


# -- journaled units -----------------------------------------------------------------
def journaled(journal: Journal | None, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The unit ``key``: from ``journal`` when there, else ``compute()`` timed, stored and read back.

    Dataclasses in the value become dicts; the value always takes a JSON round trip, so a
    measured unit and a journaled one are the same data. ``seconds``: the time ``compute`` took.
    """
    found = recall(journal, key)
    if found is not None:
        return found
    began = time.perf_counter()
    value = compute()
    return store(journal, key, {**value, "seconds": round(time.perf_counter() - began, 3)})


def store(journal: Journal | None, key: str, value: dict[str, Any]) -> dict[str, Any]:
    """``value`` (dataclasses as dicts) journaled under ``key`` and read back; without a journal, a JSON round trip."""
    plain = {k: dataclasses.asdict(v) if _is_instance(v) else v for k, v in value.items()}
    return json.loads(json.dumps(plain)) if journal is None else journal.put(key, plain)


def _is_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def set_record(evalset: EvalSet) -> dict[str, Any]:
    """An evaluation set as JSON-able data (:func:`set_from_record` restores it)."""
    return {
        "name": evalset.name,
        "input_ids": evalset.input_ids.tolist(),
        "attention_mask": evalset.attention_mask.tolist(),
        "counted": evalset.counted.int().tolist(),
        "sources": evalset.sources,
    }


def set_from_record(record: dict[str, Any]) -> EvalSet:
    """The set :func:`set_record` stored."""
    return EvalSet(
        name=record["name"],
        input_ids=torch.tensor(record["input_ids"], dtype=torch.long),
        attention_mask=torch.tensor(record["attention_mask"], dtype=torch.long),
        counted=torch.tensor(record["counted"], dtype=torch.bool),
        sources=dict(record["sources"]),
    )


def journaled_set_figures(
    lm: LoadedModel,
    saes: dict[int, SAE],
    name: str,
    make: Callable[[], EvalSet],
    *,
    batch: int,
    journal: Journal | None,
) -> tuple[list[SetFigures], dict[str, Any], float]:
    """Set ``name`` (built by ``make`` or journaled) and each SAE's figures on it, measuring only missing layers.

    Returns the figures in the order of ``saes``, the set's info and the seconds of its units.
    """
    record = journaled(journal, unit_key("set", name), lambda: set_record(make()))
    keys = {layer: unit_key("figures", name, layer) for layer in saes}
    found = {layer: recall(journal, key) for layer, key in keys.items()}
    missing = {layer: sae for layer, sae in saes.items() if found[layer] is None}
    evalset = set_from_record(record)
    if missing:
        began = time.perf_counter()
        measured = set_figures(lm, missing, evalset, batch=batch)
        share = round((time.perf_counter() - began) / len(missing), 3)
        for one in measured:
            found[one.layer] = store(journal, keys[one.layer], {"figures": one, "seconds": share})
    units = [found[layer] for layer in saes]
    out = [SetFigures(**unit["figures"]) for unit in units if unit is not None]
    seconds = float(record["seconds"]) + sum(float(unit["seconds"]) for unit in units if unit is not None)
    return out, set_info(evalset), seconds


def sae_digest(sae: SAE) -> str:
    """SHA-256 of an SAE's parameters (names and bytes), for the journal's fingerprint."""
    digest = hashlib.sha256()
    state = sae.state()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- the report --------------------------------------------------------------------
POSITIONS = (
    "The SAE is spliced at every real token except each sequence's first (never spliced: as in training and "
    "in the experiments); padding is never spliced nor counted. FVU, L0 and dead latents are taken over the "
    "counted positions; CE and KL over the next-token predictions made at counted positions (not a "
    "sequence's last). Counted: news and chat, every spliced position; generated, only the continuation's "
    "positions (the prompt is spliced but not counted)."
)
SET_TEXT = {
    "news": "held-out NewsArticles documents (every 20th, the split train-sae holds out), context {context}",
    "chat": "the experiments' prompts as the tasks render them: {formats}{chat_note}; "
    "{n_variants} variants taking turns, drawn with seed {seed}",
    "generated": "greedy continuations (at most {new_tokens} new tokens) of held-out news openings "
    "({opening} tokens) and of the chat set's prompts",
}


def render_markdown(results: EvalSAEResults) -> str:
    """The tables a person reads: figures per SAE and set, then task accuracy."""
    c = results.config
    out = _files.command_out(c["command"])  # older files recorded absolute paths: written relative to --out
    rel = (lambda text: _files.relative_paths(text, out)) if out else (lambda text: text)
    lines = [
        "# SAE evaluation: three held-out sets and task accuracy",
        "",
        f"Model `{c['model']}`; SAEs (paths relative to this folder): "
        + "; ".join(f"layer {k}: {rel(v)}" for k, v in c["saes"].items())
        + ".",
        "",
        f"Command: `{rel(c['command'])}`; wall time {_minutes(results.seconds)} "
        f"({c.get('threads', '?')} thread(s), {c.get('device', 'cpu')}).",
        "",
    ]
    lines += _tables(results)
    lines += [
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results.versions.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def _tables(results: EvalSAEResults) -> list[str]:
    """The set figures, then the task accuracy (each where measured)."""
    return (_figure_lines(results) if results.figures else []) + (_accuracy_lines(results) if results.accuracy else [])


def _figure_lines(results: EvalSAEResults) -> list[str]:
    c = results.config
    lines = ["## Held-out sets", ""]
    for name, info in results.sets.items():
        variants = c.get("variants", ())
        chat_note = (
            ""
            if c.get("prompt_format")
            else ", and the chat template for the few-shot tasks (`-chat`)"
            if any(v.endswith("-chat") for v in variants)
            else " (the model has no chat template)"
        )
        text = SET_TEXT.get(name, name).format(**c, n_variants=len(variants), chat_note=chat_note, formats=_formats(c))
        shares = ", ".join(f"{k} {v:,}" for k, v in info["sources"].items())
        lines.append(
            f"- `{name}`: {text}. {info['sequences']:,} sequences, {info['tokens']:,} counted tokens, "
            f"{info['predictions']:,} predictions (counted tokens by source: {shares})."
        )
    lines += [
        "",
        POSITIONS,
        "",
        "| layer | set | FVU | FVU typical (outliers) | cos | CE loss recovered | CE clean | CE with SAE "
        "| CE zero-ablated | KL(clean ‖ SAE) | KL(clean ‖ zero) | L0 | dead latents |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in sorted(results.figures, key=lambda f: f.layer):
        lines.append(
            f"| {f.layer} | {f.set} | {f.fvu:.3f} | {f.fvu_typical:.3f} ({f.outliers}) | {f.cossim:.3f} "
            f"| {100 * f.ce_recovered:.1f}% | {f.ce_clean:.3f} | {f.ce_sae:.3f} | {f.ce_zero:.3f} | {f.kl_sae:.3f} "
            f"| {f.kl_zero:.3f} | {f.l0:.1f} | {100 * f.dead_fraction:.1f}% |"
        )
    note = (
        f"CE and KL in nats per prediction. FVU typical: the FVU without the counted tokens whose residual norm "
        f"exceeds {TYPICAL:g}x the set's median (massive activations, counted in brackets; e.g. the second token of "
        "a plain few-shot prompt, which has no BOS). A few such tokens carry most of the pooled variance, so the "
        "pooled FVU can be small however the other tokens are reconstructed. cos: mean cosine of x and x^."
    )
    return [*lines, "", note, ""]


def _accuracy_lines(results: EvalSAEResults) -> list[str]:
    layers = sorted({a.layer for a in results.accuracy if a.layer is not None})
    head = "| task | metric | n | clean | " + " | ".join(f"layer {n} replace | layer {n} error" for n in layers) + " |"
    lines = [
        "## Task accuracy",
        "",
        f"Greedy answers scored as the experiments score them (sst2: the label; generative tasks: SQuAD exact "
        f"match), {results.config['n_task']} examples per task drawn with seed {results.config['seed']}, "
        f"{_formats(results.config)}; percent with 95% bootstrap intervals. `error` mode keeps the "
        "model exact, so its answers must equal the clean model's token for token (checked below the table).",
        "",
        head,
        "|" + "---|" * (4 + 2 * len(layers)),
    ]
    metrics = results.config.get("metrics", {})
    for task in dict.fromkeys(a.task for a in results.accuracy):
        rows = {(a.condition, a.layer): a for a in results.accuracy if a.task == task}
        clean = rows[("clean", None)]
        cells = [_stat(rows[(m, n)].exact) if (m, n) in rows else "-" for n in layers for m in MODES]
        metric = "accuracy" if metrics.get(task) == "accuracy" else "exact match"
        lines.append(f"| {task} | {metric} | {clean.exact.n} | {_stat(clean.exact)} | " + " | ".join(cells) + " |")
    errors = [a for a in results.accuracy if a.condition == "error"]
    bad = [f"{a.task} layer {a.layer}: {a.differs}" for a in errors if a.differs]
    check = "every answer equals the clean model's" if not bad else "answers differ from clean: " + ", ".join(bad)
    return [*lines, "", f"Check, error mode vs clean ({len(errors)} task x layer cells): {check}.", ""]


CARD_BEGIN = "<!-- gradsae eval-sae: begin -->"
CARD_END = "<!-- gradsae eval-sae: end -->"


def card_section(results: EvalSAEResults, layer: int) -> str:
    """One layer's figures and task accuracy (with the clean model's), between markers, for its model card."""
    one = dataclasses.replace(
        results,
        figures=tuple(f for f in results.figures if f.layer == layer),
        accuracy=tuple(a for a in results.accuracy if a.layer in (None, layer)),
    )
    lines = [
        CARD_BEGIN,
        f"Measured with `{results.config['command']}` ({_minutes(results.seconds)}).",
        "",
    ]
    return "\n".join([*lines, *_tables(one), CARD_END, ""])


def with_card_section(card: str, section: str) -> str:
    """``card`` with its eval-sae section replaced by ``section`` (appended when it has none)."""
    begin, end = card.find(CARD_BEGIN), card.find(CARD_END)
    if begin >= 0 and end > begin:
        return card[:begin] + section + card[end + len(CARD_END) :].lstrip("\n")
    return card.rstrip("\n") + "\n\n" + section


def _formats(config: dict[str, Any]) -> str:
    fmt = config.get("prompt_format")
    return f"every task in the `{fmt}` format (`--prompt-format {fmt}`)" if fmt else "each task in its default format"


def _stat(s: Stat) -> str:
    if math.isnan(s.mean):
        return "-"
    return f"{s.mean:.1f} [{s.low:.0f}, {s.high:.0f}]"


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min ({seconds:.0f} s)"
