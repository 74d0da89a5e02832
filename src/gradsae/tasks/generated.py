"""Generative tasks built offline from pip data packages (their data files only; their code is never imported).

Each task is a deterministic list of rows ``(id, prompt, answers, group)`` and a
frozen prompt format in two styles (:class:`TaskSpec`):

* ``plain``: a base-model few-shot continuation, ``<instruction><shots><field>: {prompt}\\n<answer field>:``.
  The answer is the first line of the continuation (:func:`gradsae.tasks.parse_result`)
  and opens at the first generated token (``answer_marker=None``).
* ``chat``: one user turn of the tokenizer's chat template, an instruction with the
  same shots; the reply's first line is the answer.

Answers are scored with the SQuAD exact match and token F1 (``metric="squad"``).
The few-shot items are never asked: they are left out of the pools.

Tasks and data:

* ``capitals``: country -> capital, from ``countryinfo==1.0.1``'s
  ``countryinfo/data/*.json`` (``name``, ``capital``, ``population``, ``ISO.alpha2``).
  Kept: one row per ISO code (the most populous), a single capital (no ``/``,
  not a list), population >= :data:`MIN_POPULATION`. Gold answers: the capital and
  its ASCII folding (``Bogotá`` -> ``Bogota``).
* ``plural``: noun -> plural, from ``lemminflect==0.2.3``'s
  ``lemminflect/resources/infl_lu.csv.gz`` (rows ``lemma,noun,PLURAL[/PLURAL...]``):
  lower-case alphabetic lemmas of 3-12 letters whose plural differs from the
  lemma; every listed plural is a gold answer.
* ``past_tense``: verb -> simple past, from the same table (rows
  ``lemma,verb,VBD[/VBD...],VBN,VBG,VBZ``), the same filter on the ``VBD`` forms.
* ``facts``: synthetic SQuAD-shaped reading comprehension. A context holds ``k``
  facts (``k`` drawn uniformly from ``n_facts``, 2 to 6), each about a different
  person and of a different kind (where they live, the colour of an object they
  own, their age, how many objects they own, their pet's name, their birth
  year); each fact gets one question whose answer is a span of the context, and
  the questions on one context share a ``group``. Numbers come from disjoint
  ranges and names, cities and pets are distinct within a context, so every
  answer occurs exactly once. First names: the 100 most common male and female
  names of ``names==0.3.0``'s census files (``names/dist.{male,female}.first``);
  cities: the ASCII capitals of ``capitals``; colours and objects: fixed lists
  here. Row ``j`` of context ``i`` has id ``facts-<i>-<j>``; contexts are drawn
  with ``random.Random(seed)``, so the same seed gives the same rows.
* ``facts_result``: the ``facts`` rows with the shots answered in the paper's SQuAD
  format ``Result = [[ answer ]]`` and ``answer_marker="["``: the answer is parsed
  from the ``[[ ]]`` span and ``Y`` is read at the first generated token containing
  ``[`` (the authors' objective: ``p`` of the format token, here `` [[``, two tokens
  into the answer). A variant of the paper's SQuAD protocol: few-shot plain text
  instead of its zero-shot instruction, which SmolLM2-135M does not follow (it never
  writes ``[[`` zero-shot).
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from gradsae._files import package_file
from gradsae.errors import GradSAEError

PromptFormat = Literal["chat", "plain"]
PROMPT_FORMATS = ("chat", "plain")

COUNTRYINFO = ("countryinfo", "pip install --no-deps countryinfo==1.0.1")
LEMMINFLECT = ("lemminflect", "pip install --no-deps lemminflect==0.2.3")
NAMES = ("names", "pip install --no-deps names==0.3.0")
MIN_POPULATION = 1_000_000
"""Capitals of countries and territories at least this populous (the model knows few of the tiny ones)."""

Row = tuple[str, str, tuple[str, ...], str | None]
"""(id, prompt, gold answers, group)."""


@dataclass(frozen=True)
class TaskSpec:
    """A generated task: its rows and its two prompt formats."""

    name: str
    rows: Callable[[], list[Row]]
    """The full pool of rows (deterministic)."""
    plain: str
    """Few-shot continuation template with a ``{prompt}`` slot."""
    chat: str
    """User message template (inside the chat template) with a ``{prompt}`` slot."""
    default_format: PromptFormat
    """The frozen format (the better one on the development sample, ``docs/results/task_formats.md``)."""
    max_new_tokens: int
    answer_marker: str | None = None
    """The answer (and ``Y``) opens at the first generated token containing this text; ``None``: the first."""


# -- data files ---------------------------------------------------------------
def _fold(text: str) -> str:
    """``text`` without diacritics (``São Tomé`` -> ``Sao Tome``)."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


@cache
def country_capitals() -> tuple[tuple[str, str], ...]:
    """``(country, capital)`` pairs from countryinfo's JSON files, sorted by country; see the module docstring."""
    folder = package_file(COUNTRYINFO[0], "countryinfo/data/france.json", COUNTRYINFO[1]).parent
    best: dict[str, tuple[int, str, str]] = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        name, capital, people = data.get("name"), data.get("capital"), data.get("population") or 0
        iso = (data.get("ISO") or {}).get("alpha2") if isinstance(data.get("ISO"), dict) else None
        if not (isinstance(name, str) and isinstance(capital, str) and capital and "/" not in capital and iso):
            continue
        if people >= MIN_POPULATION and people > best.get(iso, (-1, "", ""))[0]:
            best[iso] = (people, name, capital)
    return tuple(sorted((name, capital) for _, name, capital in best.values()))


@cache
def inflections(pos: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``(lemma, forms)`` of lemminflect's table for ``pos`` (``noun``: plurals, ``verb``: past tenses)."""
    path = package_file(LEMMINFLECT[0], "lemminflect/resources/infl_lu.csv.gz", LEMMINFLECT[1])
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if len(row) >= 3 and row[1] == pos]
    out = []
    for row in rows:
        lemma, forms = row[0], tuple(f for f in row[2].split("/") if f)
        if lemma.isalpha() and lemma.islower() and 3 <= len(lemma) <= 12 and forms and lemma not in forms:
            out.append((lemma, forms))
    return tuple(sorted(set(out)))


@cache
def first_names(per_sex: int = 100) -> tuple[str, ...]:
    """The ``per_sex`` most common male and female first names (US census), alternating, title case."""
    lists = [_census_names(package_file(NAMES[0], f"names/dist.{sex}.first", NAMES[1]), per_sex) for sex in _SEXES]
    merged = [name for pair in zip(*lists, strict=False) for name in pair]
    return tuple(dict.fromkeys(merged))


_SEXES = ("female", "male")


def _census_names(path: Path, count: int) -> list[str]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [line.split()[0].title() for line in lines[:count]]


# -- word tasks -----------------------------------------------------------------
CAPITAL_SHOTS = (("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"))
PLURAL_SHOTS = (("apple", "apples"), ("box", "boxes"), ("child", "children"))
PAST_SHOTS = (
    ("walk", "walked"),
    ("go", "went"),
    ("try", "tried"),
    ("stop", "stopped"),
    ("make", "made"),
    ("carry", "carried"),
)


def capital_rows() -> list[Row]:
    """One row per country (few-shot countries left out); the answers are the capital and its ASCII folding."""
    shots = {country for country, _ in CAPITAL_SHOTS}
    return [
        (f"capitals-{i}", country, tuple(dict.fromkeys((capital, _fold(capital)))), None)
        for i, (country, capital) in enumerate(country_capitals())
        if country not in shots
    ]


def word_rows(name: str, pos: str, shots: Sequence[tuple[str, str]]) -> list[Row]:
    """One row per lemma of lemminflect's ``pos`` table (few-shot words left out)."""
    skip = {word for word, _ in shots}
    return [
        (f"{name}-{i}", lemma, forms, None) for i, (lemma, forms) in enumerate(inflections(pos)) if lemma not in skip
    ]


def few_shot(shots: Sequence[tuple[str, str]], question: str, answer: str) -> str:
    """``question: x\\nanswer: y`` blocks, one blank line apart, then the open slot."""
    blocks = [f"{question}: {x}\n{answer}: {y}" for x, y in shots]
    return "\n\n".join([*blocks, f"{question}: {{prompt}}\n{answer}:"])


# -- facts ----------------------------------------------------------------------
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink", "purple", "orange", "grey")
OBJECTS = (
    ("car", "cars"),
    ("bike", "bikes"),
    ("hat", "hats"),
    ("coat", "coats"),
    ("bag", "bags"),
    ("lamp", "lamps"),
    ("chair", "chairs"),
    ("kite", "kites"),
    ("boat", "boats"),
    ("cup", "cups"),
    ("scarf", "scarves"),
    ("book", "books"),
)
PETS = ("dog", "cat", "horse", "parrot", "rabbit")
FACT_KINDS = ("home", "colour", "age", "count", "pet", "born")
AGES, COUNTS, YEARS = range(20, 90), range(2, 10), range(1950, 2010)
POOL_SEED = 0
POOL_CONTEXTS = 400


@dataclass(frozen=True)
class Fact:
    """One sentence of a context, its question and its answer (a span of the sentence)."""

    sentence: str
    question: str
    answer: str


def facts_rows(seed: int = POOL_SEED, contexts: int = POOL_CONTEXTS, n_facts: tuple[int, int] = (2, 2)) -> list[Row]:
    """``contexts`` contexts of ``n_facts[0]..n_facts[1]`` facts, one question per fact; see the module docstring."""
    low, high = n_facts
    if not 2 <= low <= high <= len(FACT_KINDS):
        raise GradSAEError(f"facts per context must satisfy 2 <= low <= high <= {len(FACT_KINDS)}, got {n_facts}")
    rng = random.Random(seed)
    names, cities = first_names(), [c for _, c in country_capitals() if c.isascii()]
    rows: list[Row] = []
    for i in range(contexts):
        facts = context_facts(rng, rng.randint(low, high), names, cities)
        text = " ".join(f.sentence for f in facts)
        rows += [
            (f"facts-{i}-{j}", facts_prompt(text, f.question), (f.answer,), f"facts-{i}") for j, f in enumerate(facts)
        ]
    return rows


def facts_prompt(context: str, question: str) -> str:
    """The example's part of the prompt: the context and the question."""
    return f"Text: {context}\nQuestion: {question}"


def context_facts(rng: random.Random, k: int, names: Sequence[str], cities: Sequence[str]) -> list[Fact]:
    """``k`` facts of distinct kinds about ``k`` distinct people (plus distinct pet names)."""
    people = rng.sample(list(names), 2 * k)
    kinds = rng.sample(FACT_KINDS, k)
    return [
        _fact(kind, person, pet_name, rng, cities)
        for kind, person, pet_name in zip(kinds, people[:k], people[k:], strict=True)
    ]


def _fact(kind: str, person: str, pet_name: str, rng: random.Random, cities: Sequence[str]) -> Fact:
    if kind == "home":
        city = rng.choice(cities)
        return Fact(f"{person} lives in {city}.", f"Where does {person} live?", city)
    if kind == "colour":
        colour, (thing, _) = rng.choice(COLOURS), rng.choice(OBJECTS)
        return Fact(f"{person} has a {colour} {thing}.", f"What colour is {person}'s {thing}?", colour)
    if kind == "age":
        age = str(rng.choice(AGES))
        return Fact(f"{person} is {age} years old.", f"How old is {person}?", age)
    if kind == "count":
        count, (_, things) = str(rng.choice(COUNTS)), rng.choice(OBJECTS)
        return Fact(f"{person} owns {count} {things}.", f"How many {things} does {person} own?", count)
    if kind == "pet":
        pet = rng.choice(PETS)
        return Fact(f"{person}'s {pet} is called {pet_name}.", f"What is {person}'s {pet} called?", pet_name)
    year = str(rng.choice(YEARS))
    return Fact(f"{person} was born in {year}.", f"When was {person} born?", year)


FACTS_SHOTS = (
    (
        facts_prompt("Olivia lives in Madrid. Peter has a blue kite.", "What colour is Peter's kite?"),
        "blue",
    ),
    (
        facts_prompt("Sam is 41 years old. Nora's cat is called Felix.", "How old is Sam?"),
        "41",
    ),
    (
        facts_prompt("Hugo owns 7 cups. Emma lives in Lima.", "Where does Emma live?"),
        "Lima",
    ),
)


def facts_plain(result_format: bool = False) -> str:
    """The few-shot prompt; ``result_format`` writes each shot's answer as ``Result = [[ answer ]]``."""
    blocks = [f"{prompt}\nAnswer: {_answer(answer, result_format)}" for prompt, answer in FACTS_SHOTS]
    return "\n\n".join([*blocks, "{prompt}\nAnswer:"])


def _answer(answer: str, result_format: bool) -> str:
    return f"Result = [[ {answer} ]]" if result_format else answer


# -- the specs -------------------------------------------------------------------------
def _chat(instruction: str, plain: str) -> str:
    return f"{instruction}\n\n{plain}"


CAPITALS_PLAIN = few_shot(CAPITAL_SHOTS, "Country", "Capital")
PLURAL_PLAIN = few_shot(PLURAL_SHOTS, "Singular", "Plural")
PAST_PLAIN = few_shot(PAST_SHOTS, "Verb", "Past tense")
FACTS_PLAIN = facts_plain()
FACTS_RESULT_PLAIN = facts_plain(result_format=True)
RESULT_MARKER = "["
"""The authors' SQuAD objective reads ``p`` of the generated token that contains ``[``."""

SPECS: dict[str, TaskSpec] = {
    "capitals": TaskSpec(
        name="capitals",
        rows=capital_rows,
        plain=CAPITALS_PLAIN,
        chat=_chat("Give the capital city of the country. Reply with the city name only.", CAPITALS_PLAIN),
        default_format="plain",
        max_new_tokens=8,
    ),
    "plural": TaskSpec(
        name="plural",
        rows=lambda: word_rows("plural", "noun", PLURAL_SHOTS),
        plain=PLURAL_PLAIN,
        chat=_chat("Give the plural of the noun. Reply with one word.", PLURAL_PLAIN),
        default_format="plain",
        max_new_tokens=6,
    ),
    "past_tense": TaskSpec(
        name="past_tense",
        rows=lambda: word_rows("past_tense", "verb", PAST_SHOTS),
        plain=PAST_PLAIN,
        chat=_chat("Give the simple past tense of the verb. Reply with one word.", PAST_PLAIN),
        default_format="plain",
        max_new_tokens=6,
    ),
    "facts": TaskSpec(
        name="facts",
        rows=facts_rows,
        plain=FACTS_PLAIN,
        chat=_chat("Answer the question with a few words copied from the text.", FACTS_PLAIN),
        default_format="plain",
        max_new_tokens=8,
    ),
    "facts_result": TaskSpec(
        name="facts_result",
        rows=facts_rows,
        plain=FACTS_RESULT_PLAIN,
        chat=_chat('Answer the question in this format: "Result = [[ answer ]]".', FACTS_RESULT_PLAIN),
        default_format="plain",
        max_new_tokens=12,
        answer_marker=RESULT_MARKER,
    ),
}
"""The generated tasks by name (``load_task`` resolves these names)."""
