"""``--plan`` of ``gradsae score`` and ``gradsae reproduce``: predicted wall time and peak memory, nothing written.

The model and SAE are loaded (for their shapes and the tokenizer's token counts). The
prediction is :mod:`gradsae.plan`'s, from the per-token costs that ``benchmarks/run.py``
measured for the model on this kind of device (``src/gradsae/costs.json``). ``score --plan``
runs nothing; ``reproduce --plan`` runs the run's first two steps as a pilot (the keep filter,
a greedy decode of every example, and the ranking of the kept ones;
:mod:`gradsae.experiments.pilot`), for the kept examples, their answer lengths, where each
masked set first changes the prompt and a measured scale, unless ``--no-pilot`` asks for the
upper bound that runs nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from gradsae.experiments.config import ExperimentConfig
from gradsae.models import LoadedModel, load_model, sae_device
from gradsae.plan import Costs, Pilot, Plan, curves_seconds, find_costs, pilot_scale, plan_reproduce, plan_score
from gradsae.pretrained import ResolvedSAE, resolve_sae
from gradsae.tasks import Task


def add_plan_argument(parser: argparse.ArgumentParser, *, pilot: bool = False) -> None:
    """The ``--plan`` flag (and, with ``pilot``, ``--no-pilot``)."""
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print the predicted wall time and peak memory (from the benchmark's measured per-token costs) "
        "and exit without running"
        + (" the experiments (the keep filter and the ranking run as a pilot; nothing is written)" if pilot else ""),
    )
    if pilot:
        parser.add_argument(
            "--no-pilot",
            dest="pilot",
            action="store_false",
            help="with --plan: run nothing, and print an upper bound (every example kept, every decode to "
            "--max-new-tokens)",
        )


def score_plan(args: argparse.Namespace, prompt_tokens: Callable[[LoadedModel], list[int]]) -> str:
    """``gradsae score --plan``: the prompts' token counts (``prompt_tokens(lm)``) through this model's costs."""
    lm = load_model(args.model, device=args.device, device_map=args.device_map)
    sae, layer, label = resolve_sae(lm, args.sae, args.layer)
    costs = find_costs(lm.name, str(lm.device), torch.get_num_threads())
    plan = plan_score(costs, prompt_tokens(lm), layer=layer, d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae)
    return plan.text(f"gradsae score, {lm.name}, layer {layer}, {label}") + "\n"


def reproduce_plan(
    args: argparse.Namespace,
    task: Task,
    cfg: ExperimentConfig,
    saes_of: Callable[[LoadedModel], list[ResolvedSAE]],
) -> str:
    """``gradsae reproduce --plan``: every layer's SAE (``saes_of(lm)``), the task's prompts, ``cfg``'s conditions."""
    lm = load_model(args.model, device=args.device, device_map=args.device_map)
    saes = saes_of(lm)
    texts = [task.render(example, lm.tokenizer) for example in task.examples]
    tokens = [len(lm.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    costs = find_costs(lm.name, str(lm.device), torch.get_num_threads())
    masking, steering, steer_all = conditions_per_example(cfg)
    conditions = masking + steering
    pilots = layer_pilots(lm, saes, task, cfg) if args.pilot else [None] * len(saes)
    plans = [
        plan_reproduce(
            costs,
            tokens,
            layer=found.layer,
            d_in=found.sae.cfg.d_in,
            d_sae=found.sae.cfg.d_sae,
            new_tokens=task.max_new_tokens,
            masking=masking,
            steering=steering,
            steer_all=steer_all,
            spliced_decode=cfg.mode == "replace",
            batch=cfg.batch_size,
            pilot=pilot,
        )
        for found, pilot in zip(saes, pilots, strict=True)
    ]
    seconds = sum(p.seconds for p in plans) - costs.load_s * (len(plans) - 1)
    notes = [pilot_note(pilots, saes, len(texts)) if args.pilot else UPPER_BOUND]
    if cfg.curves:
        curves = []
        for found, pilot in zip(saes, pilots, strict=True):
            chosen = list(range(len(texts))) if pilot is None else list(pilot.kept)
            chosen = chosen if cfg.curves_n is None else chosen[: cfg.curves_n]
            scale = 1.0 if pilot is None else pilot_scale(costs, tokens, pilot, spliced_decode=cfg.mode == "replace")
            took, active = curves_plan(lm, found, [texts[i] for i in chosen], [tokens[i] for i in chosen], cfg, costs)
            curves.append((scale * took, active, len(chosen)))
        seconds += sum(c for c, _, _ in curves)
        counts = ", ".join(f"layer {found.layer}: {a}" for found, (_, a, _) in zip(saes, curves, strict=True))
        examples = ", ".join(f"layer {found.layer}: {n}" for found, (_, _, n) in zip(saes, curves, strict=True))
        notes.append(
            f"- curves on {examples} examples: {sum(c for c, _, _ in curves):.1f} s of it, an upper bound on the "
            f"passes; mean active latents per prompt ({counts}) counted by encoding the prompts at each layer"
        )
    took = sum(p.seconds + p.rank_seconds for p in pilots if p)
    ran = "" if not args.pilot else f"the keep filter and the ranking ({took:.1f} s)"
    peak = max(p.peak_mib for p in plans)
    total = Plan(seconds=seconds, peak_mib=peak, tokens=tuple(tokens), costs=costs, ran=ran)
    layers = ",".join(str(found.layer) for found in saes)
    what = f"gradsae reproduce --task {args.task}, {lm.name}, layers {layers}, {conditions} conditions per example"
    return total.text(what) + "\n" + "\n".join(notes) + "\n"


UPPER_BOUND = "- an upper bound: as if every example were kept and every decode ran to --max-new-tokens"


def layer_pilots(lm: LoadedModel, saes: list[ResolvedSAE], task: Task, cfg: ExperimentConfig) -> list[Pilot]:
    """Each layer's keep filter and ranking, run and timed (:mod:`gradsae.experiments.pilot`)."""
    from gradsae.experiments.pilot import run_pilot

    out: list[Pilot] = []
    for found in saes:
        sae = found.sae.to(sae_device(lm, found.layer, found.sae.cfg.hook_point))
        out.append(run_pilot(lm, sae, task, cfg.spliced(layer=found.layer)))  # rankings differ by layer
    return out


def pilot_note(pilots: Sequence[Pilot | None], saes: list[ResolvedSAE], n: int) -> str:
    """How the pilot shaped the plan: kept examples and answer steps per layer."""
    parts = []
    for found, pilot in zip(saes, pilots, strict=True):
        if pilot is None:
            continue
        steps = sum(pilot.answer_steps) / max(1, len(pilot.answer_steps))
        parts.append(
            f"layer {found.layer}: {len(pilot.kept)} of {n} kept, {steps:.1f} answer steps on average, "
            f"keep filter {pilot.seconds:.1f} s, ranking {pilot.rank_seconds:.1f} s"
        )
    return (
        "- from the keep filter and the ranking, run and timed: "
        + "; ".join(parts)
        + " (masking and steering are costed on the kept examples, masked prompts from each set's first change, "
        "and scaled by the filter's measured / predicted time)"
    )


def curves_plan(
    lm: LoadedModel, found: ResolvedSAE, texts: list[str], tokens: list[int], cfg: ExperimentConfig, costs: Costs
) -> tuple[float, int]:
    """(predicted seconds, mean active latents) of the faithfulness curves on ``texts`` at ``found``'s layer."""
    from gradsae.estimators import ESTIMATORS
    from gradsae.experiments.curves import DEFAULT_GRID, DEFAULT_RANKINGS, LOG_KS, RANDOM_DRAWS

    active = [active_latents(lm, found, text, skip_first=cfg.skip_first) for text in texts]
    estimators = [m for m in cfg.methods if m in ESTIMATORS]
    orders = len(DEFAULT_RANKINGS) + len(estimators) + RANDOM_DRAWS - 1
    points = len(DEFAULT_GRID) + len(LOG_KS) + len(cfg.ks)
    scores = 2 + (cfg.ig_steps if "ig" in estimators else 0) + ("relp" in estimators)  # + the greedy token's pass
    seconds = curves_seconds(costs, tokens, active, layer=found.layer, orders=orders, points=points, scores=scores)
    return seconds, round(sum(active) / max(1, len(active)))


@torch.no_grad()
def active_latents(lm: LoadedModel, found: ResolvedSAE, text: str, *, skip_first: bool) -> int:
    """Distinct latents active at some spliced position of ``text`` (blocks ``0..l`` and the encoder, once)."""
    from gradsae.prefix import compute_prefix

    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(lm.device)
    prefix = compute_prefix(lm, ids, torch.ones_like(ids), found.layer)
    z = prefix.residual[0, 1 if skip_first else 0 :]
    sae = found.sae.to(z.device)
    h = sae.encode(z.to(sae.W_enc.dtype))
    return int((h > 0).any(dim=0).sum())


def conditions_per_example(cfg: ExperimentConfig) -> tuple[int, int, int]:
    """(masking, steering, steering at every position) conditions per example.

    Masking: Top and Bottom K per method, and K = 0; steering: each cell of
    :func:`~gradsae.experiments.perturb.steering_conditions`, and the no-edit floor.
    """
    from gradsae.experiments.perturb import steering_conditions

    cells = steering_conditions(cfg)
    every = sum(1 for cell in cells if cell[3] == "all")
    return 2 * len(cfg.ks) * len(cfg.methods) + 1, len(cells) + (1 if cfg.floors else 0), every
