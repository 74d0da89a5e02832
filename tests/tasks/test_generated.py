"""The generated tasks: deterministic, answers where they must be, whole contexts, both prompt formats."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest

from gradsae.cli import build_parser, reproduce
from gradsae.errors import GradSAEError
from gradsae.tasks import generated, load_task
from gradsae.tasks.generated import SPECS, facts_rows
from tests.helpers import CharTokenizer

GENERATED = tuple(SPECS)


class ChatTokenizer(CharTokenizer):
    chat_template = "stub"

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool
    ) -> Any:
        return f"<user>{messages[0]['content']}</user><assistant>"


@pytest.mark.parametrize("name", GENERATED)
def test_same_seed_same_examples_other_seed_others(name: str) -> None:
    task = load_task(name, n=12, seed=0)
    assert len(task) == 12 and task.metric == "squad" and task.name == name
    assert load_task(name, n=12, seed=0) == task
    assert load_task(name, n=12, seed=1).examples != task.examples
    assert len({e.id for e in load_task(name, n=None).examples}) == len(load_task(name, n=None))


def test_facts_generator_is_seeded() -> None:
    assert facts_rows(seed=1, contexts=20) == facts_rows(seed=1, contexts=20)
    assert facts_rows(seed=1, contexts=20) != facts_rows(seed=2, contexts=20)


def test_facts_answers_are_spans_of_their_context() -> None:
    rows = facts_rows(seed=3, contexts=60, n_facts=(2, 6))
    for _, prompt, answers, _ in rows:
        context = re.match(r"Text: (.*)\nQuestion: ", prompt).group(1)
        assert len(answers) == 1
        assert len(re.findall(rf"\b{re.escape(answers[0])}\b", context)) == 1, (prompt, answers)


def test_facts_groups_hold_several_questions() -> None:
    sizes = Counter(group for *_, group in facts_rows(seed=0, contexts=50, n_facts=(3, 5)))
    assert len(sizes) == 50 and set(sizes.values()) <= {3, 4, 5} and len(set(sizes.values())) > 1
    task = load_task("facts", n=10, seed=0)
    per_group = Counter(e.group for e in task.examples)
    assert min(per_group.values()) >= 2
    contexts = {e.group: e.prompt.split("\nQuestion:")[0] for e in task.examples}
    assert all(e.prompt.startswith(contexts[e.group]) for e in task.examples)
    with pytest.raises(GradSAEError, match="facts per context"):
        facts_rows(n_facts=(1, 3))


def test_word_tasks_leave_out_the_shots_and_keep_every_form() -> None:
    capitals = {e.prompt: e.answers for e in load_task("capitals", n=None).examples}
    assert "France" not in capitals and capitals["Germany"] == ("Berlin",)
    assert capitals["Colombia"] == ("Bogotá", "Bogota")
    plurals = {e.prompt: e.answers for e in load_task("plural", n=None).examples}
    assert "child" not in plurals and plurals["mouse"] == ("mice",) and plurals["tooth"] == ("teeth",)
    past = {e.prompt: e.answers for e in load_task("past_tense", n=None).examples}
    assert "stop" not in past and past["bring"] == ("brought",) and past["drop"] == ("dropped",)


def test_plain_and_chat_formats_render_as_expected() -> None:
    plain = load_task("capitals", n=1, seed=0)
    example = plain.examples[0]
    assert plain.prompt_format == "plain" and plain.answer_marker is None
    text = plain.render(example, ChatTokenizer())
    assert text == generated.CAPITALS_PLAIN.replace("{prompt}", example.prompt)
    assert text.startswith("Country: France\nCapital: Paris\n\n")
    assert text.endswith(f"Country: {example.prompt}\nCapital:")
    chat = load_task("capitals", n=1, seed=0, prompt_format="chat")
    assert chat.name == "capitals-chat" and chat.examples == plain.examples
    rendered = chat.render(example, ChatTokenizer())
    assert rendered.startswith("<user>Give the capital city") and rendered.endswith("</user><assistant>")
    assert plain.score(example, f" {example.answers[0]}\n\nCountry: Peru").exact == 1.0
    with pytest.raises(GradSAEError, match="prompt format"):
        load_task("capitals", n=1, prompt_format="html")  # type: ignore[arg-type]


def test_user_task_in_plain_format_is_not_templated(tmp_path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text('{"prompt": "Q: 2+2?\\nA:", "answer": "4"}\n')
    task = load_task(path, n=None, prompt_format="plain")
    assert task.render(task.examples[0], ChatTokenizer()) == "Q: 2+2?\nA:"
    assert load_task(path, n=None).render(task.examples[0], ChatTokenizer()).startswith("<user>")


def test_metric_flag_makes_a_classification_task(tmp_path, monkeypatch) -> None:
    path = tmp_path / "cls.csv"
    path.write_text("prompt,answer\n" + "".join(f"text {i},{'yes' if i % 2 else 'no'}\n" for i in range(6)))
    argv = ["reproduce", "--out", str(tmp_path / "o"), "--task", str(path), "--n", "4"]
    for metric, labels in (("accuracy", ("no", "yes")), ("squad", None)):
        args = build_parser().parse_args([*argv, "--metric", metric])
        task = reproduce.task_run(args, task=args.task, out=args.out).task  # what the run would load
        assert task.metric == metric and task.labels == labels
    assert task.examples[0].label is None
    with pytest.raises(GradSAEError, match="drop --metric"):
        load_task("capitals", n=1, metric="accuracy")
