"""Task loaders, prompts, answer parsing and the SQuAD metrics."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from gradsae.errors import GradSAEError
from gradsae.tasks import (
    Example,
    Task,
    exact_match,
    f1_score,
    load_task,
    normalize_answer,
    parse_label,
    parse_result,
    with_prompt_format,
)

SQUAD_TINY = Path(__file__).parents[1] / "data" / "squad_tiny.json"
NEWS = ("Entertainment", "Politics", "Sport", "Technology")


# -- metrics --------------------------------------------------------------------
def test_normalize_answer() -> None:
    assert normalize_answer("  An apple, the PIE!  ") == "apple pie"
    assert normalize_answer("U.S. Army") == "us army"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


@pytest.mark.parametrize(
    ("prediction", "answers", "em", "f1"),
    [
        ("The Volga", ["Volga"], 1.0, 1.0),
        ("Volga River", ["Volga"], 0.0, 2 / 3),  # P = 1/2, R = 1
        ("Robert Louis Stevenson", ["Robert Stevenson"], 0.0, 0.8),  # P = 2/3, R = 1
        ("Stevenson built it", ["Robert Stevenson", "Stevenson"], 0.0, 0.5),  # max(0.4, 0.5)
        ("the cat cat", ["cat"], 0.0, 2 / 3),  # repeated tokens count once against the gold
        ("Paris", ["London"], 0.0, 0.0),
        ("", ["London"], 0.0, 0.0),
    ],
)
def test_squad_scores(prediction: str, answers: list[str], em: float, f1: float) -> None:
    assert exact_match(prediction, answers) == em
    assert f1_score(prediction, answers) == pytest.approx(f1)


# -- parsing --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Result = [[ Robert Stevenson ]]", "Robert Stevenson"),
        ("Sure!\nResult = [[Volga]] is the answer.", "Volga"),
        ("Result = [[ ten", "ten"),  # cut off by the token budget
        ("Result = [[ [1810] ]]", "1810"),
        ("The Volga.\nIt is long.", "The Volga."),
        ("\n\nResult = 1810\n", "1810"),
        ("", ""),
    ],
)
def test_parse_result(text: str, answer: str) -> None:
    assert parse_result(text) == answer


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Positive.", "positive"),
        (" negative", "negative"),
        ("This is negative, not positive", "negative"),
        ("Sentiment: POSITIVE", "positive"),
        ("nonpositive", None),  # labels must start a word
        ("I am not sure", None),
    ],
)
def test_parse_label(text: str, label: str | None) -> None:
    assert parse_label(text, ("negative", "positive")) == label


def test_parse_label_topics() -> None:
    assert parse_label("Sports", NEWS) == "Sport"
    assert parse_label("technology news", NEWS) == "Technology"


# -- built-in tasks -----------------------------------------------------------------
@pytest.mark.parametrize(("name", "labels", "n"), [("sst2", ("negative", "positive"), 10), ("news", NEWS, 12)])
def test_classification_loaders(name: str, labels: tuple[str, ...], n: int) -> None:
    task = load_task(name, n=n, seed=0)
    assert task.labels == labels
    assert task.metric == "accuracy"
    assert len(task) == n
    assert Counter(e.label for e in task.examples) == dict.fromkeys(labels, n // len(labels))
    assert all(e.answers == (e.label,) and e.prompt for e in task.examples)
    assert load_task(name, n=n, seed=0) == task  # deterministic
    assert load_task(name, n=n, seed=1).examples != task.examples
    message = task.message(task.examples[0])
    assert task.examples[0].prompt in message
    assert all(label in message for label in labels)
    assert task.score(task.examples[0], f"{task.examples[0].label}.").exact == 1.0


def test_sst2_plain_is_few_shot_with_shots_from_outside_sst2() -> None:
    full = load_task("sst2", n=None, seed=0)
    plain = with_prompt_format(load_task("sst2", n=4, seed=0), "plain")
    example = plain.examples[0]
    text = plain.render(example, tokenizer=None)
    assert plain.name == "sst2-plain" and plain.prompt_format == "plain"
    assert text.endswith(f"Review: {example.prompt}\nSentiment:") and text.count("Sentiment:") == 5
    assert text.count("Sentiment: positive") == 2 and text.count("Sentiment: negative") == 2
    sentences = {e.prompt for e in full.examples}
    shots = [line.removeprefix("Review: ") for line in text.splitlines()[:-2] if line.startswith("Review: ")]
    assert len(shots) == 4 and not sentences & set(shots), "no shot is an SST-2 sentence"
    assert plain.score(example, f" {example.label}\n\nReview: x").exact == 1.0
    assert plain.examples == load_task("sst2", n=4, seed=0).examples, "the same draw as the default format"


def test_full_classification_sets() -> None:
    assert len(load_task("sst2", n=None, seed=0)) == 5000
    assert len(load_task("news", n=None, seed=0)) == 5000


def test_squad_file() -> None:
    task = load_task(SQUAD_TINY, n=None, seed=0)
    assert (task.name, task.metric, len(task), task.answer_marker) == ("squad", "squad", 8, "[")
    first = next(e for e in task.examples if e.id == "lh-1")
    assert first.answers == ("Robert Stevenson", "Stevenson")
    assert "Question:\nWho built the Bell Rock Lighthouse?" in first.prompt
    assert "Result = [[ answer ]]" in task.message(first)
    assert len({e.group for e in task.examples}) == 3
    assert load_task("squad", n=None, seed=0, squad_path=SQUAD_TINY) == task
    score = task.score(first, "Result = [[ Robert Stevenson ]]")
    assert (score.prediction, score.exact, score.f1) == ("Robert Stevenson", 1.0, 1.0)
    donor = next(e for e in task.examples if e.id == "lh-2")
    assert task.score(first, "Result = [[ 1810 ]]", answers=donor.answers).exact == 1.0


def test_squad_samples_whole_contexts() -> None:
    for seed in range(5):
        task = load_task(SQUAD_TINY, n=4, seed=seed)
        groups = [e.group for e in task.examples]
        assert len(groups) == 4
        runs = [g for i, g in enumerate(groups) if i == 0 or g != groups[i - 1]]
        assert len(runs) == len(set(runs))  # each context's questions are contiguous
        assert Counter(groups).most_common(1)[0][1] >= 2  # the first context is whole


def test_squad_errors(tmp_path: Path) -> None:
    with pytest.raises(GradSAEError, match="does not exist"):
        load_task(tmp_path / "missing.json", n=None, seed=0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(GradSAEError, match=r"not a SQuAD v1\.1 file"):
        load_task(bad, n=None, seed=0)


# -- prompts --------------------------------------------------------------------
class ChatTokenizer:
    chat_template = "stub"

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool
    ) -> Any:
        assert not tokenize and add_generation_prompt
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_render_uses_chat_template() -> None:
    task = Task("t", "Q: {prompt}", (Example("0", "2+2?", ("4",)),), max_new_tokens=4, metric="squad")
    assert task.render(task.examples[0]) == "Q: 2+2?"
    assert task.render(task.examples[0], ChatTokenizer()) == "<user>Q: 2+2?</user><assistant>"
    with pytest.raises(GradSAEError, match="no labels"):
        Task("t", "{prompt}", (), max_new_tokens=4, metric="accuracy")


# -- user files --------------------------------------------------------------------
def test_user_csv_and_jsonl(tmp_path: Path) -> None:
    csv_file = tmp_path / "qa.csv"
    csv_file.write_text('question,reply\n"Capital of France?",Paris\n"2+2?",4\n')
    task = load_task(csv_file, n=None, seed=0, prompt_column="question", answer_column="reply")
    assert [(e.prompt, e.answers) for e in task.examples] == [("Capital of France?", ("Paris",)), ("2+2?", ("4",))]
    assert task.render(task.examples[0]) == "Capital of France?"
    jsonl = tmp_path / "qa.jsonl"
    rows = [{"prompt": "Colour of the sky?", "answer": ["blue", "Blue sky"], "id": "a"}, {"prompt": "x", "answer": "y"}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_task(jsonl, n=None, seed=0)
    assert task.examples[0].answers == ("blue", "Blue sky") and task.examples[0].id == "a"
    assert task.score(task.examples[0], "Blue sky.").exact == 1.0


def test_user_accuracy_task(tmp_path: Path) -> None:
    path = tmp_path / "cls.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"p{i}", "answer": "yes" if i % 3 else "no"}) + "\n" for i in range(9))
    )
    task = load_task(path, n=4, seed=0, metric="accuracy")
    assert task.labels == ("no", "yes")
    assert Counter(e.label for e in task.examples) == {"no": 2, "yes": 2}


def test_user_file_errors(tmp_path: Path) -> None:
    with pytest.raises(GradSAEError, match="does not exist"):
        load_task(tmp_path / "none.csv", n=None, seed=0)
    missing = tmp_path / "cols.csv"
    missing.write_text("text,label\nhi,yes\n")
    with pytest.raises(GradSAEError, match=r"no column 'prompt' \(columns: label, text\): set --prompt-column"):
        load_task(missing, n=None, seed=0)
    with pytest.raises(GradSAEError, match="set --answer-column"):
        load_task(missing, n=None, seed=0, prompt_column="text")
    for name, text in (("empty.csv", "prompt,answer\n"), ("empty.jsonl", "\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(GradSAEError, match="has no rows"):
            load_task(tmp_path / name, n=None, seed=0)
    with pytest.raises(GradSAEError, match="unknown task") as raised:
        load_task("nonsense", n=None, seed=0)
    assert "\n" not in str(raised.value)
