"""Faithfulness curves of the real model on a few examples a task's model answers correctly with the SAE spliced.

    python scripts/curves_sample.py [--task facts] [--layer 6] [--examples 8] [--out docs/results/curves_facts_layer6]

Draws the evaluation sample (``--n 48 --seed 0``, what ``reproduce --task X`` draws),
decodes it with the shipped SAE spliced (error mode), keeps the first
``--examples`` answered exactly right, and runs
:func:`gradsae.experiments.curves.faithfulness` at each one's answer step. Writes
``<out>.json`` (``CurveResult.to_dict()``), ``<out>.png`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gradsae.experiments.config import ExperimentConfig, SpliceSpec  # noqa: E402
from gradsae.experiments.curves import faithfulness  # noqa: E402
from gradsae.experiments.decode import decode, prompt_batches  # noqa: E402
from gradsae.generate import answer_inputs, answer_step  # noqa: E402
from gradsae.models import load_model  # noqa: E402
from gradsae.pretrained import resolve_sae  # noqa: E402
from gradsae.report.curves import curves_markdown, plot_curves  # noqa: E402
from gradsae.tasks import load_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="facts")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="edited copies per forward")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out or f"docs/results/curves_{args.task}_layer{args.layer}")
    lm = load_model()
    sae, layer, label = resolve_sae(lm, None, args.layer, default_model=True)
    task = load_task(args.task, n=48, seed=0)
    cfg = ExperimentConfig(splice=SpliceSpec(layer=layer), batch_size=16)
    texts = [task.render(e, lm.tokenizer) for e in task.examples]
    gens = decode(lm, prompt_batches(lm, texts, cfg, reuse=False), task, cfg, sae=sae, edits_for=None)
    kept = [(e, g) for e, g in zip(task.examples, gens, strict=True) if task.score(e, g.text).exact == 1.0]
    kept = kept[: args.examples]
    steps = [answer_step(lm.tokenizer, g, task.answer_marker) for _, g in kept]
    ids, mask = answer_inputs(lm.tokenizer, [g for _, g in kept], steps)
    began = time.perf_counter()
    result = faithfulness(lm, sae, ids, mask, layer=layer, mode="error", seed=0, batch_size=args.batch_size)
    seconds = time.perf_counter() - began
    plot_curves(result, out.with_suffix(".png"))
    out.with_suffix(".json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    head = [
        f"# Faithfulness curves: task `{task.name}`, layer {layer} ({label}), error mode",
        "",
        f"{len(kept)} examples answered exactly right with the SAE spliced (of the {len(task)} drawn, seed 0); "
        f"{seconds:.0f} s on the CPU.",
        "",
    ]
    per_example = ["| example | answer | a | Y_0 | budget GradSAE / activation / random |", "|---|---|---|---|---|"]
    for (example, gen), ex in zip(kept, result.examples, strict=True):
        b = ex.budget
        per_example.append(
            f"| {example.id} | {gen.text.strip().splitlines()[0]} | {ex.n_active} | {ex.clean:.3f} | "
            f"{b['gradsae']} / {b['activation']} / {b['random']} |"
        )
    text = "\n".join([*head, *curves_markdown(result), *per_example, ""])
    out.with_suffix(".md").write_text(text)
    print(text)  # noqa: T201


if __name__ == "__main__":
    main()
