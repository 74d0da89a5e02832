"""The ``taskmix`` training corpus: news, chat conversations and plain few-shot text in the generated tasks' style.

The experiments feed the model three kinds of text: news-like prose, chat prompts
with the model's short replies, and plain few-shot prompts of the generated tasks
(``Country: France\\nCapital: Paris\\n\\nCountry: ...``; :mod:`gradsae.tasks.generated`).
``taskmix`` covers all three (a :class:`~gradsae.training.activations.Mixture`):

* news: the NewsArticles training documents, packed (BOS + ``context - 1`` tokens);
* framed documents, each opening a sequence at position 0 as an experiment prompt does
  (after BOS where the experiments' encoding adds one, as Gemma's does: ``Mixture.framed_bos``):
  the ``chatmix`` conversations (:mod:`gradsae.training.chatmix`, the model's own replies),
  and as many few-shot documents, a quarter per task (capitals, plural, past_tense, facts).

Proportions (by the sequences each kind opens): with a chat template, news 1/3, chat 1/3,
few-shot 1/3 (:data:`FRAMED_SHARE_CHAT` of the sequences are framed, and each framed
document opens exactly one sequence per epoch of the framed documents, of which half are
chat); without one (Gemma 3 270M), news 1/2 and few-shot 1/2 (:data:`FRAMED_SHARE_PLAIN`).
A framed sequence is filled up to ``context`` with the next framed documents (chat or
few-shot, in the seeded order), so the token shares are close to, not exactly, these.

A few-shot document is :data:`SHOTS` (3 to 6) answered blocks of one task in that task's
plain format (``<question field>: x\\n<answer field>: y``, blocks a blank line apart) and
ends with a blank line; the blocks are drawn from the task's *training items* only.

Disjoint from every evaluation row, whatever the seed or sample size: the tasks' pools
(``capital_rows``, ``word_rows``, ``facts_rows``) are fixed, and the training items are
exactly the data those pools' own filters leave out, so no training item is a row any
evaluation can draw (:func:`overlap_with_pools` checks it, and a test asserts it is empty):

* capitals: countryinfo countries that the pool drops (population under
  ``MIN_POPULATION``, or missing, and a single capital), whose capital is no pool capital either;
* plural / past_tense: lemminflect lemmas that the pool drops (longer than 12 letters,
  shorter than 3, hyphenated, or capitalised) with a listed form other than the lemma;
* facts: contexts built as the task builds them (same sentence and question shapes) but
  with first names ranked 101 to :data:`NAME_RANKS` in the census lists (the task uses the top
  100, nor the names of its shots) and, as cities, the ASCII capitals of the training countries
  (the task uses the pool's) with no such name in them (``St. Peter Port`` is left out).
  No training context can equal an evaluation context: their name sets are disjoint.

The task prompts' own few-shot items (``France -> Paris``, ``apple -> apples``, ...) are
in every evaluation prompt and are not asked; they are not used here either.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from gradsae._files import package_file
from gradsae.tasks import generated as gen

TASKS = ("capitals", "plural", "past_tense", "facts")
FRAMED_SHARE_CHAT = 2 / 3
"""Share of framed sequences (half chat, half few-shot) when the model has a chat template."""
FRAMED_SHARE_PLAIN = 1 / 2
"""Share of framed (few-shot) sequences for a model without a chat template."""
FEW_SHOT_DOCS = 1400
"""Few-shot documents without a chat template (with one: as many as the conversations)."""
SHOTS = (3, 6)
"""Answered blocks per few-shot document (uniform in this range)."""
NAME_RANKS = 400
"""Census first names per sex read for the facts' training names (ranks 101 to this)."""
FIELDS = {
    "capitals": ("Country", "Capital"),
    "plural": ("Singular", "Plural"),
    "past_tense": ("Verb", "Past tense"),
}
_WORD = re.compile(r"[A-Za-z][a-z]*(-[a-z]+)*")


@dataclass(frozen=True)
class Item:
    """One training item: the question part and its answer."""

    prompt: str
    answer: str


# -- training items ---------------------------------------------------------------
@cache
def training_countries() -> tuple[tuple[str, str], ...]:
    """``(country, capital)`` pairs of countryinfo that the ``capitals`` pool leaves out (module docstring)."""
    folder = package_file(gen.COUNTRYINFO[0], "countryinfo/data/france.json", gen.COUNTRYINFO[1]).parent
    pool = gen.country_capitals()
    countries, capitals = {c for c, _ in pool}, {k for _, k in pool} | {gen._fold(k) for _, k in pool}
    shots = {c for c, _ in gen.CAPITAL_SHOTS} | {k for _, k in gen.CAPITAL_SHOTS}
    out = set()
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        name, capital = data.get("name"), data.get("capital")
        if not (isinstance(name, str) and isinstance(capital, str) and capital and "/" not in capital):
            continue
        if name in countries or capital in capitals or gen._fold(capital) in capitals or {name, capital} & shots:
            continue
        out.add((name, capital))
    return tuple(sorted(out))


@cache
def training_words(pos: str) -> tuple[tuple[str, str], ...]:
    """``(lemma, form)`` of lemminflect's ``pos`` table for lemmas the word tasks' pools leave out."""
    path = package_file(gen.LEMMINFLECT[0], "lemminflect/resources/infl_lu.csv.gz", gen.LEMMINFLECT[1])
    pool = {lemma for lemma, _ in gen.inflections(pos)}
    shots = {w for pair in (*gen.PLURAL_SHOTS, *gen.PAST_SHOTS) for w in pair}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if len(row) >= 3 and row[1] == pos]
    out = set()
    for row in rows:
        lemma = row[0]
        forms = [f for f in row[2].split("/") if f != lemma and _WORD.fullmatch(f)]
        if lemma in pool or lemma in shots or not _WORD.fullmatch(lemma) or not forms:
            continue
        out.add((lemma, forms[0]))
    return tuple(sorted(out))


@cache
def training_names() -> tuple[str, ...]:
    """Census first names ranked 101 to :data:`NAME_RANKS` per sex, none of them a name the ``facts`` task uses."""
    used = set(gen.first_names()) | {w for prompt, _ in gen.FACTS_SHOTS for w in re.findall(r"[A-Za-z]+", prompt)}
    lists = [
        gen._census_names(package_file(gen.NAMES[0], f"names/dist.{sex}.first", gen.NAMES[1]), NAME_RANKS)
        for sex in gen._SEXES
    ]
    merged = [name for pair in zip(*lists, strict=False) for name in pair]
    return tuple(name for name in dict.fromkeys(merged) if name not in used and name.isalpha())


def training_cities() -> tuple[str, ...]:
    """ASCII capitals of the training countries (cities no ``facts`` row uses) without a first name the task uses."""
    used = set(gen.first_names())
    return tuple(
        sorted(
            capital
            for _, capital in training_countries()
            if capital.isascii() and not set(re.findall(r"[A-Za-z]+", capital)) & used
        )
    )


def items(task: str) -> tuple[Item, ...]:
    """The training items of a word task (``capitals``, ``plural``, ``past_tense``)."""
    pairs = training_countries() if task == "capitals" else training_words("noun" if task == "plural" else "verb")
    return tuple(Item(x, y) for x, y in pairs)


def facts_items(rng: random.Random, n: int) -> list[Item]:
    """``n`` facts questions on fresh contexts of 2 facts each, with training names and cities only."""
    names, cities = training_names(), training_cities()
    out: list[Item] = []
    while len(out) < n:
        facts = gen.context_facts(rng, 2, names, cities)
        text = " ".join(f.sentence for f in facts)
        out += [Item(gen.facts_prompt(text, f.question), f.answer) for f in facts]
    return out[:n]


# -- documents ----------------------------------------------------------------------
def block(task: str, item: Item) -> str:
    """One answered block in ``task``'s plain few-shot format."""
    if task == "facts":
        return f"{item.prompt}\nAnswer: {item.answer}"
    question, answer = FIELDS[task]
    return f"{question}: {item.prompt}\n{answer}: {item.answer}"


def few_shot_docs(n: int, *, seed: int = 0) -> list[str]:
    """``n`` few-shot documents, a quarter per task in turn, each its blocks and a blank line."""
    rng = random.Random(f"taskmix-{seed}")
    pools = {task: items(task) for task in TASKS if task != "facts"}
    docs = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        count = rng.randint(*SHOTS)
        chosen = facts_items(rng, count) if task == "facts" else rng.sample(list(pools[task]), count)
        docs.append("\n\n".join(block(task, item) for item in chosen) + "\n\n")
    return docs


# -- the check ---------------------------------------------------------------------
def overlap_with_pools() -> dict[str, list[str]]:
    """Training items that are rows of a task's pool (or use a pool's names): must be empty for every task.

    Compares each word task's training prompts with every row prompt of the task's pool
    (the rows any evaluation draws from), and the facts' training names and cities with
    the names and cities of the facts task.
    """
    found: dict[str, list[str]] = {}
    for task in ("capitals", "plural", "past_tense"):
        pool_prompts = {prompt for _, prompt, _, _ in gen.SPECS[task].rows()}
        pool_answers = {a for _, _, answers, _ in gen.SPECS[task].rows() for a in answers}
        found[task] = sorted(
            {i.prompt for i in items(task) if i.prompt in pool_prompts}
            | ({i.answer for i in items(task) if i.answer in pool_answers} if task == "capitals" else set())
        )
    pool_cities = {c for _, c in gen.country_capitals()}
    found["facts"] = sorted((set(training_names()) & set(gen.first_names())) | (set(training_cities()) & pool_cities))
    return found


def sizes() -> dict[str, int]:
    """Training items per task (facts: names and cities)."""
    out = {task: len(items(task)) for task in ("capitals", "plural", "past_tense")}
    out["facts_names"], out["facts_cities"] = len(training_names()), len(training_cities())
    return out


def adds_bos(tokenizer: object) -> bool:
    """Does the experiments' encoding of a plain prompt start with BOS (Gemma: yes; SmolLM2: no)?"""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids: Sequence[int] = tokenizer("a")["input_ids"]  # type: ignore[operator]
    return bool(ids) and ids[0] == bos
