"""Faithfulness curves: how well a ranking orders the latents by their real effect on the output.

After the deletion / sufficiency curves of feature-circuits (Marks et al. 2024)
and MIB (Mueller et al. 2025), and the ablation budget of AtP* (Kramár et al. 2024).

Setting, per example: one input ``x`` (the prompt, plus the tokens generated
before the answer step), the SAE spliced after block ``l``, and ``A`` the set of
latents active at some spliced position (``a = |A|``). The objective is the
probability of one *pinned* token::

    t*   = argmax_v p(v | x)            the greedy token of the spliced, unedited model
    Y(E) = p(t* | x; latents in E zeroed at every spliced position),   Y_0 = Y({})

``t*`` is held fixed under every edit (``NextTokenProb`` would read the new
argmax once an edit changes it, and the curves would measure the wrong thing).

Rankings order ``A`` completely, ``r_m = (c_1, ..., c_a)``, by descending score
(ties: lower latent index first), and ``Top_m(K) = {c_1, ..., c_K}``:

* ``gradsae``: the paper's ``mean_n relu(H[n, c] dY/dH[n, c])``;
* ``gradsae_sum``: ``sum_n H[n, c] dY/dH[n, c]``, the first-order estimate of ``Y_0 - Y({c})``;
* ``activation``: ``mean_n H[n, c]``; ``random``: a seeded uniform score;
* ``ig``, ``relp`` (when asked for: ``rankings=``, or the run's ``--methods``): ``sum_n a[n, c]`` of
  integrated gradients (``ig_steps`` midpoint steps from zero) or of RelP's relevance
  (:mod:`gradsae.estimators`), each an estimate of ``Y_0 - Y({c})`` like ``gradsae_sum``;
* ``ablation``: the exact ``Y_0 - Y({c})`` (one forward per active latent).

Curves on a grid of fractions ``0 = f_0 < f_1 < ... < f_J = 1``, ``K_j = round(f_j a)``:

* deletion: ``D_m(f_j) = Y_0 - Y(Top_m(K_j))``, the drop after zeroing the top ``K_j``;
* sufficiency: ``S_m(f_j) = Y(A - Top_m(K_j))``, what the top ``K_j`` alone keep.

The spliced positions are the run's: ``skip_first`` (each row's first token left unspliced unless
``--splice-first``) holds for ``t*``, the scores and every edited forward, and is recorded in the result.

Both ends are the same for every ranking (``D(0) = 0``, ``D(1) = Y_0 - Y(A) = Y_0 - S(0)``,
``S(1) = Y_0``); larger is better in between. The area of a curve ``C`` is the
trapezoid rule over ``f``: ``AUC = sum_j (f_j - f_{j-1}) (C(f_{j-1}) + C(f_j)) / 2``.
The normalised area of ranking ``m`` over examples ``i`` is::

    N_m = (sum_i AUC_m,i - sum_i AUC_random,i) / (sum_i AUC_ablation,i - sum_i AUC_random,i)

so ``N = 1`` for the exact-ablation ranking and ``0`` for the random one by
construction (a ratio of sums: an example where the two nearly coincide does not
blow it up; ``nan`` when the denominator is 0). Single-latent ablation orders
latents for deletion, not for sufficiency (keeping a set is not the sum of single
removals), so the sufficiency denominator can be small and ``N`` far outside [0, 1].

Estimate vs exact, per example over ``A`` (means over examples are reported):
``spearman_m`` = Spearman's rho between ``m``'s scores and the exact effects;
``recall_m = |Top_m(k) & Top_ablation(k)| / k`` with ``k = top = 10``; and the AtP* budget
``B_m = max_{c in Top_ablation(k)} rank_m(c)`` (1-based): how many exact ablations, taken in
``m``'s order, it takes to have found the exact top ``k`` (``k`` is perfect, ``a`` the worst).
Both are ``nan`` for an example with ``a < top`` active latents (every ranking would score
recall 1 and budget ``a``), and left out of the means.

Figures reported (:meth:`CurveResult.metric`, each with a 95% bootstrap interval over examples):

* besides the grid, ``D`` and ``S`` at fixed ``K`` in :data:`LOG_KS` and at the experiment's K
  (``K = 50%`` is the example's own count), so the curves see the K the experiments edit;
* the deletion area over ``ln K``: ``L_m = (1 / ln(K_b / K_a)) int_{K_a}^{K_b} D_m d ln K`` by the
  trapezoid rule on the measured points with ``1 <= K <= KMAX = 50``, normalised as
  ``(sum_i L_m,i - sum_i L_rand,i) / (sum_i L_abl,i - sum_i L_rand,i)`` (the linear area gave the region
  ``f <= 0.02``, where K = 10-16 lives, 2% of the weight); the random anchor is the mean over
  :data:`RANDOM_DRAWS` permutations (curves, recall and budget alike);
* sufficiency as the fraction of ``Y_0`` kept, ``S_m(K) / Y_0`` (its mean over ``ln K``, and at the
  experiment's K): no ratio to the random-vs-exact gap, which can vanish;
* Spearman's rho of the scores against the signed effect ``e_c = Y_0 - Y({c})`` and against ``|e_c|``, over
  all active latents and over the top :data:`TOP_RHO` (by ``e_c``, resp. ``|e_c|``): an unsigned score
  (activation, the paper's relu score) can only be expected to follow ``|e_c|``;
* threshold budgets (AtP*): ``max_{c : |e_c| >= x Y_0} rank_m(c)``, the exact ablations taken in ``m``'s
  order to have found every latent whose effect is at least ``x`` of ``Y_0`` (``x`` in :data:`THRESHOLDS`);
  ``nan`` for an example where no latent reaches ``x`` (nothing to find), left out of the means.

Cost per example: one forward and backward (the scores), ``a`` ablation forwards,
and one forward per distinct edited set (at most ``2 J`` per ranking), all on the
prompt only, batched, and each past block ``l`` only (:mod:`gradsae.prefix`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from itertools import pairwise
from typing import Any

import numpy as np
import torch

from gradsae import distributed
from gradsae.errors import GradSAEError
from gradsae.estimators import ESTIMATORS
from gradsae.experiments import journal as journaling
from gradsae.experiments.config import ExperimentConfig
from gradsae.experiments.journal import Journal
from gradsae.experiments.rank import KeptExample, k_value, padded
from gradsae.experiments.results import CurveResult, ExampleCurves, from_data
from gradsae.experiments.stats import spearman
from gradsae.generate import answer_inputs
from gradsae.models import LoadedModel, position_ids
from gradsae.objectives import CustomObjective
from gradsae.prefix import Prefix, compute_prefix, replay_prefix
from gradsae.sae import SAE
from gradsae.scores import ScoreOptions, Scores, objective_value, score_methods
from gradsae.splice import Edit, Mode, resolve_layer, splice

log = logging.getLogger(__name__)

DEFAULT_RANKINGS = ("gradsae", "gradsae_sum", "activation", "random", "ablation")
RANKINGS = (*DEFAULT_RANKINGS, *ESTIMATORS)
SUMMED = ("gradsae_sum", *ESTIMATORS)
"""Rankings by ``sum_n a[n, c]`` of their per-token scores: first-order estimates of ``Y_0 - Y({c})``."""
DEFAULT_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
LOG_KS = (1, 2, 5, 10, 20, 50)
"""Absolute K measured in every example (besides the grid and the experiment's K): the log-K area's points."""
RANDOM_DRAWS = 20
"""Random permutations averaged into the random anchor."""
TOP_RHO = 50
"""Spearman's rho is also taken over the exact top this many latents."""
TOP_K = 10
"""Recall and the top-``k`` budget are taken against the exact top this many latents."""
THRESHOLDS = (0.05, 0.01)
"""Threshold budgets: find every latent whose exact ``|effect| >= x Y_0``."""


def full_order(score: torch.Tensor, active: torch.Tensor) -> list[int]:
    """The ``active`` latents by descending ``score``, ties by ascending latent index."""
    latents = active.sort().values
    order = score[latents].double().argsort(descending=True, stable=True)
    return latents[order].tolist()


def budget(order: Sequence[int], targets: Sequence[int]) -> int:
    """1-based position in ``order`` by which every latent of ``targets`` has been seen (0 for none)."""
    rank = {c: i + 1 for i, c in enumerate(order)}
    missing = [c for c in targets if c not in rank]
    if missing:
        raise GradSAEError(f"latents {missing} are not in the ranking: rank every active latent")
    return max((rank[c] for c in targets), default=0)


def recall(order: Sequence[int], exact: Sequence[int], k: int) -> float:
    """``|order[:k] & exact[:k]| / k`` (``nan`` for ``k = 0``)."""
    return len(set(order[:k]) & set(exact[:k])) / k if k else math.nan


def grid_ks(grid: Sequence[float], n_active: int) -> tuple[int, ...]:
    """``K_j = round(f_j a)``."""
    return tuple(round(f * n_active) for f in grid)


def check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    grid = tuple(float(f) for f in grid)
    if len(grid) < 2 or grid[0] != 0.0 or grid[-1] != 1.0 or any(b <= a for a, b in pairwise(grid)):
        raise GradSAEError(f"grid {grid} must rise strictly from 0 to 1: e.g. (0, 0.1, 0.5, 1)")
    return grid


# -- the objective ----------------------------------------------------------------------------------
def pinned_token_prob(token: int) -> CustomObjective:
    """``p(token)`` at the last position, whatever the argmax is."""
    return CustomObjective(fn=partial(_token_prob, token=token), keep=1)


def _token_prob(logits: torch.Tensor, token: int) -> torch.Tensor:
    step = logits[:, -1].to(torch.promote_types(logits.dtype, torch.float32))
    return step.softmax(dim=-1)[:, token]


@torch.no_grad()
def greedy_token(
    lm: LoadedModel, sae: SAE, ids: torch.Tensor, mask: torch.Tensor, *, layer: int, mode: Mode, skip_first: bool = True
) -> int:
    """``t*``: the greedy next token of the spliced model without edits (one row)."""
    with splice(lm, sae, layer, mode=mode, record=False, skip_first=skip_first):
        out = lm.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False, logits_to_keep=1
        )
    return int(out.logits[0, -1].argmax())


# -- computing the curves ---------------------------------------------------------------------------
def faithfulness(
    lm: LoadedModel,
    sae: SAE,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    layer: int | None = None,
    mode: Mode = "error",
    rankings: Sequence[str] = DEFAULT_RANKINGS,
    grid: Sequence[float] = DEFAULT_GRID,
    top: int = TOP_K,
    seed: int = 0,
    batch_size: int = 32,
    skip_first: bool = True,
    experiment_ks: Sequence[dict[str, int]] | None = None,
    random_draws: int = RANDOM_DRAWS,
    ig_steps: int = 10,
) -> CurveResult:
    """Deletion and sufficiency curves, estimate vs exact and budgets for each row of a left-padded batch.

    Each row is measured alone, without its padding, so its numbers do not depend on the batch.
    ``skip_first`` leaves each row's first token unspliced, as in every other measurement of a run;
    ``experiment_ks`` (one mapping per row, label -> K) adds the experiment's K to the measured points;
    ``random_draws`` permutations are averaged into the random anchor.
    """
    grid = check_grid(grid)
    unknown = [m for m in rankings if m not in RANKINGS]
    if unknown:
        raise GradSAEError(f"unknown rankings {unknown}: use {', '.join(RANKINGS)}")
    methods = tuple(dict.fromkeys([*rankings, "random", "ablation"]))
    layer = resolve_layer(sae, layer)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    rows = [input_ids[row, mask[row].bool()][None] for row in range(input_ids.shape[0])]  # padding dropped
    examples = tuple(
        example_curves(
            lm,
            sae,
            rows[row],
            torch.ones_like(rows[row]),
            layer=layer,
            mode=mode,
            methods=methods,
            grid=grid,
            top=top,
            seed=seed + row,
            batch_size=batch_size,
            skip_first=skip_first,
            experiment_ks=None if experiment_ks is None else experiment_ks[row],
            random_draws=random_draws,
            ig_steps=ig_steps,
        )
        for row in range(input_ids.shape[0])
    )
    return CurveResult(
        layer=layer, mode=mode, grid=grid, methods=methods, top=top, examples=examples, skip_first=skip_first
    )


def example_curves(
    lm: LoadedModel,
    sae: SAE,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    layer: int,
    mode: Mode,
    methods: Sequence[str],
    grid: Sequence[float],
    top: int,
    seed: int,
    batch_size: int,
    skip_first: bool = True,
    experiment_ks: dict[str, int] | None = None,
    random_draws: int = RANDOM_DRAWS,
    ig_steps: int = 10,
) -> ExampleCurves:
    """Everything for one row (``ids``, ``mask``: ``[1, pos]``); see the module docstring."""
    token = greedy_token(lm, sae, ids, mask, layer=layer, mode=mode, skip_first=skip_first)
    objective = pinned_token_prob(token)
    base = list(dict.fromkeys("gradsae" if m == "gradsae_sum" else m for m in methods))
    by = score_methods(
        lm,
        sae,
        ids,
        mask,
        objective,
        methods=base,
        options=ScoreOptions(
            layer=layer, mode=mode, seed=seed, ablation_batch=batch_size, skip_first=skip_first, ig_steps=ig_steps
        ),
    )
    active = torch.nonzero(by["ablation"].mean_act[0] > 0).squeeze(-1)
    scores = {m: method_scores(by, m) for m in methods}
    orders = {m: [full_order(scores[m], active)] for m in methods}
    if "random" in orders:  # the anchor: the seeded ranking and random_draws - 1 more permutations
        orders["random"] += random_orders(active, draws=random_draws - 1, seed=seed)
    ks = grid_ks(grid, len(active))
    labelled = dict(experiment_ks or {})
    fixed = fixed_k_values(len(active), list(labelled.values()))
    labelled = {label: min(k, len(active)) for label, k in labelled.items() if len(active)}
    deletion_sets = {m: [[o[:k] for k in ks] for o in orders[m]] for m in methods}
    sufficiency_sets = {m: [[o[k:] for k in ks] for o in orders[m]] for m in methods}
    deletion_fixed = {m: [[o[:k] for k in fixed] for o in orders[m]] for m in methods}
    sufficiency_fixed = {m: [[o[k:] for k in fixed] for o in orders[m]] for m in methods}
    every = [
        s
        for sets in (deletion_sets, sufficiency_sets, deletion_fixed, sufficiency_fixed)
        for m in methods
        for draw in sets[m]
        for s in draw
    ]
    prefix = compute_prefix(lm, ids, mask, layer)
    values = zeroed_objectives(lm, sae, prefix, mask, objective, every, mode, batch_size, skip_first=skip_first)
    k = top if len(active) >= top else 0  # fewer active latents than ``top``: recall and budget are trivial, nan
    exact = orders["ablation"][0]
    effect = scores["ablation"]
    clean = float(by["ablation"].objective[0])
    targets = [threshold_targets(effect, active, x * clean) for x in THRESHOLDS]

    def mean_over_draws(sets: dict[str, list[list[list[int]]]], m: str) -> tuple[float, ...]:
        return tuple(float(np.mean(col)) for col in zip(*([values[_key(s)] for s in d] for d in sets[m]), strict=True))

    return ExampleCurves(
        token=token,
        clean=clean,
        n_active=len(active),
        ks=ks,
        deletion={m: mean_over_draws(deletion_sets, m) for m in methods},
        sufficiency={m: mean_over_draws(sufficiency_sets, m) for m in methods},
        spearman={m: _spearman(scores[m], effect, active) for m in methods},
        recall={m: float(np.mean([recall(o, exact, k) for o in orders[m]])) if k else math.nan for m in methods},
        budget={m: float(np.mean([budget(o, exact[:k]) for o in orders[m]])) if k else math.nan for m in methods},
        fixed_ks=fixed,
        deletion_at={m: mean_over_draws(deletion_fixed, m) for m in methods},
        sufficiency_at={m: mean_over_draws(sufficiency_fixed, m) for m in methods},
        experiment_ks=labelled,
        random_draws=len(orders.get("random", [[]])),
        spearman_abs={m: _spearman(scores[m], effect.abs(), active) for m in methods},
        spearman_top={m: _spearman(scores[m], effect, torch.tensor(exact[:TOP_RHO])) for m in methods},
        spearman_top_abs={m: _spearman(scores[m], effect.abs(), top_by_size(effect, active)) for m in methods},
        thresholds=THRESHOLDS,
        threshold_targets=tuple(len(t) for t in targets),
        threshold_budget={  # nan where no latent reaches the threshold: no budget to spend
            m: tuple(float(np.mean([budget(o, t) for o in orders[m]])) if t else math.nan for t in targets)
            for m in methods
        },
    )


def random_orders(active: torch.Tensor, *, draws: int, seed: int) -> list[list[int]]:
    """``draws`` seeded uniform permutations of the ``active`` latents."""
    latents = active.sort().values.cpu()
    gen = torch.Generator().manual_seed(10_007 * (seed + 1))
    return [latents[torch.randperm(len(latents), generator=gen)].tolist() for _ in range(max(0, draws))]


def fixed_k_values(n_active: int, experiment: Sequence[int] = ()) -> tuple[int, ...]:
    """:data:`LOG_KS` and the experiment's K, each clipped to ``[1, a]``, sorted and distinct (``()`` for ``a = 0``)."""
    if n_active == 0:
        return ()
    return tuple(sorted({min(max(1, int(k)), n_active) for k in (*LOG_KS, *experiment)}))


def threshold_targets(effect: torch.Tensor, active: torch.Tensor, bar: float) -> list[int]:
    """Active latents whose exact effect has ``|Y_0 - Y({c})| >= bar``."""
    return [int(c) for c in active.tolist() if abs(float(effect[c])) >= bar]


def top_by_size(effect: torch.Tensor, active: torch.Tensor, n: int = TOP_RHO) -> torch.Tensor:
    """The ``n`` active latents with the largest ``|effect|`` (ties: lower index first)."""
    return torch.tensor(full_order(effect.abs(), active)[:n], dtype=torch.long)


def method_scores(by: dict[str, Scores], method: str) -> torch.Tensor:
    """``[d_sae]`` scores of ranking ``method`` for the one row of ``by``."""
    if method not in SUMMED:
        return by[method].per_latent[0]
    grad = by["gradsae" if method == "gradsae_sum" else method]
    total = torch.zeros_like(grad.per_latent[0])
    return total.index_add_(0, grad.token_index[:, 2], grad.token_score.to(total.dtype))


def _spearman(score: torch.Tensor, exact: torch.Tensor, active: torch.Tensor) -> float:
    if len(active) < 3:
        return math.nan
    a, b = score[active].detach().cpu(), exact[active].detach().cpu()
    if bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return math.nan  # a constant has no rank correlation
    return spearman(a, b)


def _key(latents: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted(latents))


def zeroed_objectives(
    lm: LoadedModel,
    sae: SAE,
    prefix: Prefix,
    mask: torch.Tensor,
    objective: CustomObjective,
    sets: Sequence[Sequence[int]],
    mode: Mode,
    batch_size: int,
    *,
    skip_first: bool = True,
) -> dict[tuple[int, ...], float]:
    """``Y(E)`` for each distinct set ``E`` of ``sets`` (zeroed at every spliced position), ``batch_size`` sets a
    forward; ``skip_first`` as in the run."""
    unique = list(dict.fromkeys(_key(s) for s in sets))
    out: dict[tuple[int, ...], float] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        copies = prefix.expand(len(chunk))
        edit = Edit(latents=padded(chunk).to(prefix.input_ids.device), op="zero", positions="all")
        with (
            splice(lm, sae, prefix.layer, mode=mode, edits=[edit], record=False, skip_first=skip_first),
            replay_prefix(lm, copies),
            torch.no_grad(),
        ):
            y = objective_value(lm, copies.input_ids, mask.expand(len(chunk), -1), objective)
        out.update(zip(chunk, y.tolist(), strict=True))
    return out


def kept_curves(
    lm: LoadedModel,
    sae: SAE,
    kept: Sequence[KeptExample],
    cfg: ExperimentConfig,
    journal: Journal | None = None,
) -> dict[str, Any]:
    """The curves of the kept examples at their answer steps, as ``CurveResult.to_dict()`` (``{}`` if none).

    Each example is measured alone (its numbers do not depend on the others: the random
    permutations are seeded by its index in ``kept``) and, with a ``journal``, kept as a
    unit of its own, so an interrupted run resumes from the next example. Under torchrun the
    examples not yet journaled are shared among the ranks, one per rank per round, and gathered
    after each round (rank 0 journals them), so every example is measured once, by one rank.
    """
    kept = kept[: cfg.curves_n] if cfg.curves_n is not None else kept
    if not kept:
        return {}
    rankings = (*DEFAULT_RANKINGS, *(m for m in cfg.methods if m in ESTIMATORS))

    def measure(index: int) -> ExampleCurves:
        example = kept[index]
        ids, mask = answer_inputs(lm.tokenizer, [example.generation], [example.step])
        measured = faithfulness(
            lm,
            sae,
            ids.to(lm.device),
            mask.to(lm.device),
            layer=cfg.layer,
            mode=cfg.mode,
            seed=cfg.seed + index,
            skip_first=cfg.skip_first,
            experiment_ks=[{str(k): k_value(k, example) for k in cfg.ks}],
            rankings=rankings,
            ig_steps=cfg.ig_steps,
        )
        log.info("layer %s: curves of kept example %d measured (rank %d)", cfg.layer, index, distributed.rank())
        return measured.examples[0]

    keys = [journaling.unit_key(cfg.layer, "curve", index) for index in range(len(kept))]
    done = {index: value for index, key in enumerate(keys) if (value := journaling.recall(journal, key)) is not None}
    todo = [index for index in range(len(kept)) if index not in done]
    size = distributed.world_size()
    for start in range(0, len(todo), size):
        rounds = todo[start : start + size]
        measured = distributed.gather([measure(index) for index in distributed.shard(rounds)], len(rounds))
        for index, result in zip(rounds, measured, strict=True):
            done[index] = journaling.record(journal, keys[index], result)
    examples = [from_data(ExampleCurves, done[index]) for index in range(len(kept))]
    merged = CurveResult(
        layer=resolve_layer(sae, cfg.layer),
        mode=cfg.mode,
        grid=check_grid(DEFAULT_GRID),
        methods=tuple(dict.fromkeys([*rankings, "random", "ablation"])),
        top=TOP_K,
        examples=tuple(examples),
        skip_first=cfg.skip_first,
    )
    return merged.to_dict()


# -- output ---------------------------------------------------------------------------------------------
