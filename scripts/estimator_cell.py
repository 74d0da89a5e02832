"""One cell of the estimator comparison (issue 23): faithfulness of each estimator against exact ablation.

For one task and one layer: the examples the spliced model answers correctly (as ``gradsae reproduce``
keeps them), the first ``--curves-n`` of them at their answer step, and for each ranking its Spearman
against the exact single-latent ablation effects (over the active latents), its recall of the exact
top-10 and the AtP* budget (:mod:`gradsae.experiments.curves`), plus each estimator's measured cost:
wall time of scoring each example alone / that of one GradSAE score (= one forward + backward), medians
over the examples, all on this machine in one process. Writes ``OUT/curves.json`` and ``OUT/table.md``.

    python scripts/estimator_cell.py --task facts --layer 15 --n 16 --curves-n 6 --out runs/estimators/cell
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from gradsae.experiments.config import ExperimentConfig, SpliceSpec
from gradsae.experiments.curves import kept_curves
from gradsae.experiments.decode import decode, prompt_batches
from gradsae.experiments.rank import KeptExample, rank_examples
from gradsae.experiments.results import CurveResult, from_data
from gradsae.generate import answer_inputs
from gradsae.models import LoadedModel, load_model
from gradsae.objectives import NextTokenProb
from gradsae.pretrained import resolve_sae
from gradsae.report.curves import curves_markdown
from gradsae.sae import SAE
from gradsae.scores import ScoreOptions, score_methods
from gradsae.tasks import load_task

ESTIMATORS = ("gradsae", "ig", "relp")
"""Timed one example at a time (the exact ablation costs one suffix forward per active latent: counted, not timed)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="facts")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--curves-n", type=int, default=6)
    parser.add_argument("--ig-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model()
    sae, layer, label = resolve_sae(lm, None, args.layer, default_model=True)
    task = load_task(args.task, n=args.n, seed=args.seed)
    methods = ("gradsae", "activation", "random", "ig", "relp")
    cfg = ExperimentConfig(
        splice=SpliceSpec(layer=layer),
        methods=methods,
        curves=True,
        curves_n=args.curves_n,
        ig_steps=args.ig_steps,
        seed=args.seed,
    )
    texts = [task.render(example, lm.tokenizer) for example in task.examples]
    gens = decode(lm, prompt_batches(lm, texts, cfg, reuse=False), task, cfg, sae=None, edits_for=None)
    kept = [(ex, gen) for ex, gen in zip(task.examples, gens, strict=True) if task.score(ex, gen.text).exact == 1.0]
    kept = kept[: args.curves_n]
    ranked, _ = rank_examples(
        lm,
        sae,
        task,
        [k[0] for k in kept],
        [k[1] for k in kept],
        ExperimentConfig(splice=SpliceSpec(layer=layer), methods=("gradsae",)),
    )
    began = time.perf_counter()
    curves = kept_curves(lm, sae, ranked, cfg)
    meta = {"task": args.task, "layer": layer, "sae": label, "n_drawn": args.n, "n_curved": len(ranked)}
    meta["curves_s"] = time.perf_counter() - began
    (out / "curves.json").write_text(json.dumps({**meta, "curves": curves}))  # first: the costs take a while
    result = from_data(CurveResult, curves)
    lines = [f"# Estimators at {args.task}, layer {layer} ({label})", "", *curves_markdown(result)]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
    costs = estimator_costs(lm, sae, ranked, layer, args.ig_steps)
    lines += ["| estimator | cost (x one GradSAE score, median over examples) |", "|---|---|"]
    lines += [f"| {m} | {costs[m]:.2f} |" for m in costs]
    (out / "curves.json").write_text(json.dumps({**meta, "curves": curves, "costs": costs}))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines[-len(costs) - 2 :]) + "\n")


def estimator_costs(
    lm: LoadedModel, sae: SAE, ranked: list[KeptExample], layer: int, ig_steps: int
) -> dict[str, float]:
    """Per estimator: median over examples of (its wall time / one GradSAE score's), one example at a time."""
    ratios: dict[str, list[float]] = {m: [] for m in ESTIMATORS}
    for example in ranked:
        ids, mask = answer_inputs(lm.tokenizer, [example.generation], [example.step])
        seconds = {}
        for method in ESTIMATORS:
            start = time.perf_counter()
            score_methods(
                lm,
                sae,
                ids,
                mask,
                NextTokenProb(),
                methods=(method,),
                options=ScoreOptions(layer=layer, ig_steps=ig_steps),
            )
            seconds[method] = time.perf_counter() - start
        for method in ESTIMATORS:
            ratios[method].append(seconds[method] / seconds["gradsae"])
    return {m: statistics.median(v) for m, v in ratios.items()}


if __name__ == "__main__":
    main()
