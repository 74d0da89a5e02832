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
``recall_m = |Top_m(k) & Top_ablation(k)| / k`` with ``k = min(top, a)``
(``top = 10``); and the AtP* budget ``B_m = max_{c in Top_ablation(k)} rank_m(c)``
(1-based): how many exact ablations, taken in ``m``'s order, it takes to have
found the exact top ``k`` (``k`` is perfect, ``a`` the worst).

Cost per example: one forward and backward (the scores), ``a`` ablation forwards,
and one forward per distinct edited set (at most ``2 J`` per ranking), all on the
prompt only, batched, and each past block ``l`` only (:mod:`gradsae.prefix`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradsae import _files
from gradsae.errors import GradSAEError
from gradsae.estimators import ESTIMATORS
from gradsae.experiments.config import ExperimentConfig
from gradsae.experiments.rank import KeptExample, padded
from gradsae.experiments.stats import spearman
from gradsae.generate import answer_inputs
from gradsae.models import LoadedModel, position_ids
from gradsae.objectives import CustomObjective
from gradsae.prefix import Prefix, compute_prefix, replay_prefix
from gradsae.sae import SAE
from gradsae.scores import Scores, objective_value, score_methods
from gradsae.splice import Edit, Mode, resolve_layer, splice

DEFAULT_RANKINGS = ("gradsae", "gradsae_sum", "activation", "random", "ablation")
RANKINGS = (*DEFAULT_RANKINGS, *ESTIMATORS)
SUMMED = ("gradsae_sum", *ESTIMATORS)
"""Rankings by ``sum_n a[n, c]`` of their per-token scores: first-order estimates of ``Y_0 - Y({c})``."""
DEFAULT_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
CURVES = ("deletion", "sufficiency")
NAMES = {
    "gradsae": "GradSAE",
    "gradsae_sum": "GradSAE (sum)",
    "activation": "activation",
    "random": "random",
    "ablation": "exact ablation",
    "ig": "integrated gradients (sum)",
    "relp": "RelP (sum)",
}
COLOURS = {
    "gradsae": "tab:red",
    "gradsae_sum": "tab:orange",
    "activation": "tab:blue",
    "random": "tab:gray",
    "ablation": "tab:green",
    "ig": "tab:purple",
    "relp": "tab:brown",
}


@dataclass(frozen=True)
class ExampleCurves:
    """The curves and estimate-vs-exact figures of one example."""

    token: int
    """The pinned token ``t*``."""
    clean: float
    """``Y_0``."""
    n_active: int
    """``a``: latents active at some spliced position."""
    ks: tuple[int, ...]
    """``K_j = round(f_j a)`` for each grid point."""
    deletion: dict[str, tuple[float, ...]]
    """Ranking -> ``Y(Top_m(K_j))`` per grid point (the drop ``D`` is ``clean`` minus this)."""
    sufficiency: dict[str, tuple[float, ...]]
    """Ranking -> ``S_m(f_j) = Y(A - Top_m(K_j))`` per grid point."""
    spearman: dict[str, float]
    """Ranking -> Spearman's rho with the exact effects (``nan`` with fewer than 3 active latents)."""
    recall: dict[str, float]
    """Ranking -> top-``k`` recall of the exact top ``k``."""
    budget: dict[str, int]
    """Ranking -> exact ablations in its order needed to find the exact top ``k``."""

    def curve(self, name: str, method: str) -> tuple[float, ...]:
        """``D_m`` (``deletion``, as a drop) or ``S_m`` (``sufficiency``) per grid point."""
        if name == "deletion":
            return tuple(self.clean - y for y in self.deletion[method])
        return self.sufficiency[method]


@dataclass(frozen=True)
class CurveResult:
    """Faithfulness curves of every ranking on a set of examples at one layer."""

    layer: int
    mode: str
    grid: tuple[float, ...]
    """Fractions ``f_j`` of the active latents, from 0 to 1."""
    methods: tuple[str, ...]
    top: int
    """``k`` of the recall and the budget (at most ``a``)."""
    examples: tuple[ExampleCurves, ...]

    def areas(self, name: str, method: str) -> list[float]:
        """``AUC`` of curve ``name`` (``deletion`` or ``sufficiency``) for ``method``, per example."""
        return [auc(self.grid, ex.curve(name, method)) for ex in self.examples]

    def normalised_area(self, name: str, method: str) -> float:
        """``N_m``: 1 = the exact-ablation ranking, 0 = the random one (see the module docstring)."""
        if not self.examples:
            return math.nan
        low, high = sum(self.areas(name, "random")), sum(self.areas(name, "ablation"))
        return normalise(sum(self.areas(name, method)), low, high)

    def mean_curve(self, name: str, method: str) -> list[float]:
        """The curve averaged over examples, per grid point."""
        return [float(v) for v in np.mean([ex.curve(name, method) for ex in self.examples], axis=0)]

    def summary(self) -> dict[str, dict[str, float]]:
        """Per ranking: normalised areas, and the mean Spearman, recall and budget over examples."""
        out = {}
        for method in self.methods:
            rho = [ex.spearman[method] for ex in self.examples if not math.isnan(ex.spearman[method])]
            out[method] = {
                "deletion_area": self.normalised_area("deletion", method),
                "sufficiency_area": self.normalised_area("sufficiency", method),
                "spearman": float(np.mean(rho)) if rho else math.nan,
                "recall": _mean([ex.recall[method] for ex in self.examples]),
                "budget": _mean([float(ex.budget[method]) for ex in self.examples]),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CurveResult:
        examples = tuple(
            ExampleCurves(
                **{
                    **ex,
                    "ks": tuple(ex["ks"]),
                    "deletion": {m: tuple(v) for m, v in ex["deletion"].items()},
                    "sufficiency": {m: tuple(v) for m, v in ex["sufficiency"].items()},
                }
            )
            for ex in data["examples"]
        )
        return cls(
            layer=int(data["layer"]),
            mode=str(data["mode"]),
            grid=tuple(data["grid"]),
            methods=tuple(data["methods"]),
            top=int(data["top"]),
            examples=examples,
        )


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


# -- the maths --------------------------------------------------------------------------------------
def auc(grid: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid rule: ``sum_j (f_j - f_{j-1}) (C_{j-1} + C_j) / 2``."""
    points = list(zip(grid, values, strict=True))
    return float(sum((b - a) * (u + v) / 2 for (a, u), (b, v) in pairwise(points)))


def normalise(area: float, random_area: float, ablation_area: float) -> float:
    """``(area - random) / (ablation - random)``; ``nan`` when the last two are equal."""
    span = ablation_area - random_area
    return (area - random_area) / span if span != 0 else math.nan


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
def greedy_token(lm: LoadedModel, sae: SAE, ids: torch.Tensor, mask: torch.Tensor, *, layer: int, mode: Mode) -> int:
    """``t*``: the greedy next token of the spliced model without edits (one row)."""
    with splice(lm, sae, layer, mode=mode, record=False):
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
    top: int = 10,
    seed: int = 0,
    batch_size: int = 32,
    ig_steps: int = 10,
) -> CurveResult:
    """Deletion and sufficiency curves, estimate vs exact and budgets for each row of a left-padded batch.

    Each row is measured alone, without its padding, so its numbers do not depend on the batch.
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
            ig_steps=ig_steps,
        )
        for row in range(input_ids.shape[0])
    )
    return CurveResult(layer=layer, mode=mode, grid=grid, methods=methods, top=top, examples=examples)


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
    ig_steps: int = 10,
) -> ExampleCurves:
    """Everything for one row (``ids``, ``mask``: ``[1, pos]``); see the module docstring."""
    token = greedy_token(lm, sae, ids, mask, layer=layer, mode=mode)
    objective = pinned_token_prob(token)
    base = list(dict.fromkeys("gradsae" if m == "gradsae_sum" else m for m in methods))
    by = score_methods(
        lm,
        sae,
        ids,
        mask,
        objective,
        methods=base,
        layer=layer,
        mode=mode,
        seed=seed,
        ablation_batch=batch_size,
        ig_steps=ig_steps,
    )
    active = torch.nonzero(by["ablation"].mean_act[0] > 0).squeeze(-1)
    scores = {m: method_scores(by, m) for m in methods}
    orders = {m: full_order(scores[m], active) for m in methods}
    ks = grid_ks(grid, len(active))
    deletion_sets = {m: [orders[m][:k] for k in ks] for m in methods}
    sufficiency_sets = {m: [orders[m][k:] for k in ks] for m in methods}
    every = [s for sets in (deletion_sets, sufficiency_sets) for m in methods for s in sets[m]]
    values = zeroed_objectives(lm, sae, compute_prefix(lm, ids, mask, layer), mask, objective, every, mode, batch_size)
    k = min(top, len(active))
    exact = orders["ablation"]
    return ExampleCurves(
        token=token,
        clean=float(by["ablation"].objective[0]),
        n_active=len(active),
        ks=ks,
        deletion={m: tuple(values[_key(s)] for s in deletion_sets[m]) for m in methods},
        sufficiency={m: tuple(values[_key(s)] for s in sufficiency_sets[m]) for m in methods},
        spearman={m: _spearman(scores[m], scores["ablation"], active) for m in methods},
        recall={m: recall(orders[m], exact, k) for m in methods},
        budget={m: budget(orders[m], exact[:k]) for m in methods},
    )


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
    return spearman(score[active].detach().cpu(), exact[active].detach().cpu())


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
) -> dict[tuple[int, ...], float]:
    """``Y(E)`` for each distinct set ``E`` of ``sets`` (zeroed at every position), ``batch_size`` sets a forward."""
    unique = list(dict.fromkeys(_key(s) for s in sets))
    out: dict[tuple[int, ...], float] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        copies = prefix.expand(len(chunk))
        edit = Edit(latents=padded(chunk).to(prefix.input_ids.device), op="zero", positions="all")
        with (
            splice(lm, sae, prefix.layer, mode=mode, edits=[edit], record=False),
            replay_prefix(lm, copies),
            torch.no_grad(),
        ):
            y = objective_value(lm, copies.input_ids, mask.expand(len(chunk), -1), objective)
        out.update(zip(chunk, y.tolist(), strict=True))
    return out


def kept_curves(lm: LoadedModel, sae: SAE, kept: Sequence[KeptExample], cfg: ExperimentConfig) -> dict[str, Any]:
    """The curves of the kept examples at their answer steps, as ``CurveResult.to_dict()`` (``{}`` if none)."""
    kept = kept[: cfg.curves_n] if cfg.curves_n is not None else kept
    if not kept:
        return {}
    parts = []
    for start in range(0, len(kept), cfg.batch_size):
        rows = kept[start : start + cfg.batch_size]
        ids, mask = answer_inputs(lm.tokenizer, [k.generation for k in rows], [k.step for k in rows])
        parts.append(
            faithfulness(
                lm,
                sae,
                ids.to(lm.device),
                mask.to(lm.device),
                layer=cfg.layer,
                mode=cfg.mode,
                seed=cfg.seed + start,
                rankings=(*DEFAULT_RANKINGS, *(m for m in cfg.methods if m in ESTIMATORS)),
                ig_steps=cfg.ig_steps,
            )
        )
    first = parts[0]
    merged = CurveResult(
        layer=first.layer,
        mode=first.mode,
        grid=first.grid,
        methods=first.methods,
        top=first.top,
        examples=tuple(ex for part in parts for ex in part.examples),
    )
    return merged.to_dict()


# -- output ---------------------------------------------------------------------------------------------
def curves_markdown(result: CurveResult) -> list[str]:
    """A markdown section: one row per ranking (normalised areas, estimate vs exact, budget)."""
    k = result.top
    lines = [
        f"### Faithfulness curves ({len(result.examples)} examples; objective p(pinned clean token))",
        "",
        f"Normalised areas: 1 = exact-ablation ranking, 0 = random. Spearman, top-{k} recall and the budget "
        f"(exact ablations in that order until the exact top-{k} are found; mean active latents "
        f"{_mean([float(ex.n_active) for ex in result.examples]):.0f}) are means over examples.",
        "",
        f"| ranking | deletion area | sufficiency area | Spearman vs exact | top-{k} recall | budget for top-{k} |",
        "|---|---|---|---|---|---|",
    ]
    for method, row in result.summary().items():
        cells = [row["deletion_area"], row["sufficiency_area"], row["spearman"], row["recall"]]
        text = " | ".join("n/a" if math.isnan(v) else f"{v:.2f}" for v in cells)
        lines.append(f"| {NAMES.get(method, method)} | {text} | {row['budget']:.1f} |")
    return [*lines, ""]


def plot_curves(result: CurveResult, path: str | Path) -> Path:
    """Two panels (deletion drop, sufficiency) of the mean curves vs the fraction of active latents, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    titles = {"deletion": "deletion: Y_0 - Y(top K zeroed)", "sufficiency": "sufficiency: Y(all but top K zeroed)"}
    for ax, name in zip(axes, CURVES, strict=True):
        for method in result.methods:
            area = result.normalised_area(name, method)
            label = f"{NAMES.get(method, method)} (area {area:.2f})"
            ax.plot(result.grid, result.mean_curve(name, method), "-o", ms=3, color=COLOURS.get(method), label=label)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0, 1)
        ax.set_title(f"layer {result.layer}: {titles[name]}")
        ax.set_xlabel("fraction of active latents (K / a)")
        ax.set_ylabel("drop in p(pinned token)" if name == "deletion" else "p(pinned token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with _files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
