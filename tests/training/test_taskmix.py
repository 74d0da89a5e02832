"""The taskmix corpus: its few-shot items are disjoint from every row the tasks can draw, its documents
follow the tasks' plain formats, and the mixture's proportions and BOS framing are as documented."""

from __future__ import annotations

import re
from collections import Counter

from gradsae.tasks import generated as gen
from gradsae.tasks import load_task
from gradsae.training import taskmix
from gradsae.training.activations import Mixture, framed_sequences, mixed_sequences
from tests.helpers import BOS, CharTokenizer


def test_no_training_item_is_a_row_of_any_task_pool() -> None:
    assert taskmix.overlap_with_pools() == {"capitals": [], "plural": [], "past_tense": [], "facts": []}
    sizes = taskmix.sizes()
    assert sizes["capitals"] >= 50 and sizes["plural"] >= 1000 and sizes["past_tense"] >= 100
    assert sizes["facts_names"] >= 200 and sizes["facts_cities"] >= 30


def test_the_check_finds_an_overlap_when_there_is_one(monkeypatch) -> None:
    """The disjointness check can fail: a pool country slipped into the training items is reported."""
    leaked = (*taskmix.training_countries(), gen.country_capitals()[0])
    monkeypatch.setattr(taskmix, "training_countries", lambda: leaked)
    assert taskmix.overlap_with_pools()["capitals"] == [gen.country_capitals()[0][0], gen.country_capitals()[0][1]]


def test_no_document_contains_an_evaluation_prompt_of_any_draw() -> None:
    """Independently of the pools' filters: the full task pools' prompts never appear as a training block."""
    docs = taskmix.few_shot_docs(400, seed=3)
    blocks = {b for doc in docs for b in doc.strip().split("\n\n")}
    for name, (question, _) in taskmix.FIELDS.items():
        task = load_task(name, n=None)
        asked = {f"{question}: {e.prompt}" for e in task.examples}
        assert not {b.split("\n")[0] for b in blocks} & asked, name
    facts = load_task("facts", n=None)
    texts = {e.prompt.split("\n")[0] for e in facts.examples}
    assert not {b.split("\n")[0] for b in blocks if b.startswith("Text: ")} & texts
    used = set(gen.first_names())
    names = {w for b in blocks if b.startswith("Text: ") for w in re.findall(r"[A-Z][a-z]+", b.split("\n")[0])}
    assert names and not names & used


def test_documents_follow_the_tasks_plain_formats_a_quarter_each() -> None:
    docs = taskmix.few_shot_docs(40, seed=0)
    assert docs == taskmix.few_shot_docs(40, seed=0) and docs != taskmix.few_shot_docs(40, seed=1)
    kinds = Counter(doc.split(":")[0] for doc in docs)
    assert kinds == {"Country": 10, "Singular": 10, "Verb": 10, "Text": 10}
    for doc in docs:
        assert doc.endswith("\n\n") and not doc.startswith("\n")
        blocks = doc.strip().split("\n\n")
        low, high = taskmix.SHOTS
        assert low <= len(blocks) <= high
    plural = next(d for d in docs if d.startswith("Singular"))
    assert re.fullmatch(r"(Singular: \S+\nPlural: \S+\n\n)+", plural)
    # the same block shape the task prompts use (their shots rendered the same way)
    assert gen.CAPITALS_PLAIN.startswith(taskmix.block("capitals", taskmix.Item("France", "Paris")))
    assert gen.FACTS_PLAIN.startswith(
        taskmix.block("facts", taskmix.Item(gen.FACTS_SHOTS[0][0], gen.FACTS_SHOTS[0][1]))
    )


def test_framed_bos_opens_each_framed_sequence_with_bos_only_there() -> None:
    docs = [f"doc {i} text. " for i in range(8)]
    plain = framed_sequences(CharTokenizer(), docs, context=30, seed=0)
    with_bos = framed_sequences(CharTokenizer(), docs, context=30, seed=0, bos=True)
    for _ in range(10):
        a, b = next(plain), next(with_bos)
        assert b[0] == BOS and BOS not in b[1:] and a[0] != BOS
        assert b[1:] == a[:29], "the same documents, shifted by the BOS"


def test_three_way_mix_opens_a_third_of_sequences_with_each_kind() -> None:
    """news (BOS-packed), chat ("#"), few-shot ("C"): 1/3 each, as the docstring states."""
    news = [f"news story {i}: the council met. " * 2 for i in range(20)]
    chats = [f"#chat {i} user asks; bot says. " for i in range(6)]
    shots = [f"Country: c{i}\nCapital: k{i}\n\n" for i in range(6)]
    mix = Mixture(texts=tuple(news), framed=(*chats, *shots), framed_share=taskmix.FRAMED_SHARE_CHAT)
    stream = mixed_sequences(CharTokenizer(), mix, context=20, seed=0)
    rows = [next(stream) for _ in range(36)]  # 24 framed = two epochs of the 12 framed documents
    firsts = Counter("news" if r[0] == BOS else "chat" if r[0] == ord("#") else "shot" for r in rows)
    assert firsts == {"news": 12, "chat": 12, "shot": 12}


def test_the_model_card_states_the_mix() -> None:
    from gradsae.training.export import _corpus_lines

    (line,) = _corpus_lines({"corpus": "taskmix"})
    sizes = taskmix.sizes()
    assert "1/3 NewsArticles" in line and "1/2 news and 1/2 few-shot" in line
    assert f"{sizes['plural']} nouns" in line and f"{sizes['facts_names']} first names" in line
