"""Accuracy of the model (no SAE) on the generated tasks, per prompt format: the record behind
``docs/results/task_formats.md``.

The development sample is held aside from the evaluation sample: ``--dev-n`` examples
drawn with ``--dev-seed`` from the pool without the examples (and, for ``facts``, the
contexts) that ``reproduce --task X`` draws (``--n 48 --seed 0``). ``--eval`` scores
the evaluation sample itself instead. Variants other than the frozen ``plain`` and
``chat`` formats are the formats tried on the way (``--variants``).

    python scripts/task_formats.py [--tasks capitals,plural,past_tense,facts] [--variants] [--eval]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gradsae.generate import generate  # noqa: E402
from gradsae.models import load_model  # noqa: E402
from gradsae.tasks import (  # noqa: E402
    Example,
    Task,
    generated,
    load_task,
    sample_examples,
)

EVAL_N, EVAL_SEED = 48, 0

RESULT = 'Please organize your final answer in this format: "Result = [[ answer ]]"'
MORE_CAPITALS = (("Iceland", "Reykjavik"), ("Malta", "Valletta"), ("Fiji", "Suva"))
SENTENCE_CAPITALS = "".join(f"The capital of {c} is {x}.\n" for c, x in generated.CAPITAL_SHOTS)
MORE_PLURALS = (("city", "cities"), ("knife", "knives"), ("man", "men"))
PAST_3_SHOTS = (("walk", "walked"), ("go", "went"), ("try", "tried"))
Variant = tuple[str, str, str | None]
"""(prompt format, template, answer marker)."""

VARIANTS: dict[str, dict[str, Variant]] = {
    # task -> variant -> format; the formats tried on the way that were not kept
    "capitals": {
        "chat-zero-shot": ("chat", "What is the capital of {prompt}? Reply with the city name only.", None),
        "chat-result": ("chat", f"What is the capital of {{prompt}}?\n{RESULT}", "["),
        "plain-zero-shot": ("plain", "The capital of {prompt} is", None),
        "plain-sentences": ("plain", SENTENCE_CAPITALS + "The capital of {prompt} is", None),
        "plain-6-shot": (
            "plain",
            generated.few_shot(generated.CAPITAL_SHOTS + MORE_CAPITALS, "Country", "Capital"),
            None,
        ),
    },
    "plural": {
        "chat-zero-shot": ("chat", "What is the plural of the noun '{prompt}'? Reply with one word.", None),
        "chat-result": ("chat", f"What is the plural of the noun '{{prompt}}'?\n{RESULT}", "["),
        "plain-6-shot": (
            "plain",
            generated.few_shot(generated.PLURAL_SHOTS + MORE_PLURALS, "Singular", "Plural"),
            None,
        ),
    },
    "past_tense": {
        "chat-zero-shot": ("chat", "What is the simple past tense of the verb '{prompt}'? Reply with one word.", None),
        "chat-result": ("chat", f"What is the simple past tense of the verb '{{prompt}}'?\n{RESULT}", "["),
        "plain-3-shot": ("plain", generated.few_shot(PAST_3_SHOTS, "Verb", "Past tense"), None),
    },
    "facts": {
        "chat-zero-shot": ("chat", "Answer the question with a few words copied from the text.\n\n{prompt}", None),
        "chat-result": ("chat", f"Answer the following question based on the context.\n{{prompt}}\n\n{RESULT}", "["),
    },
}
FACTS_SIZES = {"plain-3-facts": (3, 3), "plain-3-to-5-facts": (3, 5)}
"""Harder ``facts`` pools (more facts per context) in the frozen plain format."""


def dev_task(task: Task, n: int, seed: int) -> Task:
    """``n`` examples from ``seed`` among those the evaluation sample does not draw (nor share a context with)."""
    held = sample_examples(task, EVAL_N, EVAL_SEED)
    ids, groups = {e.id for e in held}, {e.group for e in held if e.group is not None}
    rest = tuple(e for e in task.examples if e.id not in ids and (e.group is None or e.group not in groups))
    return replace(task, examples=sample_examples(replace(task, examples=rest), n, seed))


def evaluate(lm: object, task: Task, batch_size: int) -> dict[str, object]:
    texts = [task.render(e, lm.tokenizer) for e in task.examples]  # type: ignore[attr-defined]
    began = time.perf_counter()
    gens = generate(lm, texts, max_new_tokens=task.max_new_tokens, batch_size=batch_size)  # type: ignore[arg-type]
    scores = [task.score(e, g.text) for e, g in zip(task.examples, gens, strict=True)]
    pairs = zip(task.examples, scores, strict=True)
    wrong = [(e.prompt.splitlines()[-1], e.answers[0], s.prediction) for e, s in pairs if not s.exact]
    return {
        "n": len(scores),
        "em": 100 * sum(s.exact for s in scores) / len(scores),
        "f1": 100 * sum(s.f1 for s in scores) / len(scores),
        "seconds": round(time.perf_counter() - began, 1),
        "wrong": wrong[:6],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(generated.SPECS))
    parser.add_argument("--variants", action="store_true", help="also score the tried formats in VARIANTS")
    parser.add_argument("--eval", action="store_true", help="score the evaluation sample (n=48, seed 0)")
    parser.add_argument("--dev-n", type=int, default=40)
    parser.add_argument("--dev-seed", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--only", default=None, help="comma-separated formats / variants to run")
    parser.add_argument("--out", default=None, help="append the results as JSON lines to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    lm = load_model()
    for name in args.tasks.split(","):
        spec = generated.SPECS[name]
        runs = {fmt: load_task(name, n=None, prompt_format=fmt) for fmt in ("plain", "chat")}
        if args.variants:
            for variant, (fmt, template, marker) in VARIANTS.get(name, {}).items():
                runs[variant] = replace(runs[fmt], template=template, answer_marker=marker)
            for variant, sizes in FACTS_SIZES.items() if name == "facts" else ():
                rows = generated.facts_rows(n_facts=sizes)
                examples = tuple(Example(id=i, prompt=p, answers=a, group=g) for i, p, a, g in rows)
                runs[variant] = replace(runs["plain"], examples=examples)
        if args.only:
            runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
        for label, full in runs.items():
            task = replace(full, examples=sample_examples(full, EVAL_N, EVAL_SEED)) if args.eval else None
            task = task or dev_task(full, args.dev_n, args.dev_seed)
            result = {"task": name, "format": label, "sample": "eval" if args.eval else "dev", **evaluate(lm, task, 16)}
            result["frozen"] = label == spec.default_format
            print(json.dumps(result), flush=True)  # noqa: T201
            if args.out:
                with open(args.out, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
