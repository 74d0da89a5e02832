"""Rank each kept example's latents by every method, and pick Top / Bottom K.

For kept example ``i`` the objective is ``Y_i = p(greedy token)`` at the step
that opens the answer, with the prompt plus the tokens generated before that step
as input. Each ranking method ``m`` (gradsae, activation, random, optionally
ablation) scores the latents; among latents with a positive score, ``Top_m(i, K)``
are the ``K`` best and ``Bottom_m(i, K)`` the ``K`` worst; ``K = 50%`` is half
the latents active at the last input token (at least 1).

Overlap (the paper's appendix), at ``K = 10``, in % of K:
``cross/a-b = mean_i |Top_a(i) & Top_b(i)| / K`` and ``within/m`` = the mean over
pairs of examples sharing a label (classification) or a context (SQuAD) of
``|Top_m(i) & Top_m(j)| / K``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gradsae import distributed
from gradsae.experiments.config import ExperimentConfig, KSpec
from gradsae.experiments.controls import CONTROLS, NOSINK, control_scores
from gradsae.experiments.stats import spearman
from gradsae.generate import Generation, answer_inputs, answer_step
from gradsae.models import LoadedModel
from gradsae.objectives import NextTokenProb
from gradsae.prefix import compute_prefix
from gradsae.sae import SAE
from gradsae.scores import ScoreOptions, Scores, score_latents, score_methods
from gradsae.tasks import Example, Task


@dataclass(frozen=True)
class KeptExample:
    """A correctly answered example and its rankings."""

    example: Example
    generation: Generation
    step: int
    """Generation step whose token opens the answer."""
    rankings: dict[str, list[int]]
    """Method -> latents with a positive score, best first."""
    active_last: int
    donor_values: dict[str, dict[int, float]] = field(default_factory=dict)
    """Ranking method -> latent -> value injected when this example is a donor (clamped)."""
    decoded_norm: dict[int, float] = field(default_factory=dict)
    """Active latent -> ``H_c ||W_dec[c]||`` (``H_c``: mean activation over the spliced positions)."""

    def removed_norm(self, latents: Sequence[int]) -> float:
        """``sum_{c in latents} H_c ||W_dec[c]||``: a bound on the residual norm zeroing ``latents`` removes."""
        return float(sum(self.decoded_norm.get(c, 0.0) for c in latents))


def objective_description(answer_marker: str | None) -> str:
    """What ``Y`` is in :func:`rank_examples`, as ``results.json`` records it: the greedy token's probability at
    the answer step (the first generated token holding ``answer_marker``, else the first generated token)."""
    if answer_marker is None:
        return "p(greedy token) at the answer step"
    return f"p(greedy token) at the answer step (the first generated token holding {answer_marker!r}, else the first)"


def rank_examples(
    lm: LoadedModel,
    sae: SAE,
    task: Task,
    examples: Sequence[Example],
    gens: Sequence[Generation],
    cfg: ExperimentConfig,
    *,
    on_batch: Callable[[range, torch.Tensor, torch.Tensor, dict[str, Scores]], None] | None = None,
) -> tuple[list[KeptExample], dict[str, Any]]:
    """Score every kept example with every method at its answer step.

    ``on_batch(rows, ids, mask, scores_by_method)``, when given, sees each batch's scores
    (:class:`~gradsae.experiments.record.ExampleRecorder` keeps the per-token values). Under
    torchrun each batch is scored by one rank, and only that rank's hook sees it.
    """
    steps = [answer_step(lm.tokenizer, gen, task.answer_marker) for gen in gens]
    scored = list(dict.fromkeys(["activation" if m in CONTROLS else m for m in cfg.methods]))
    norms = sae.W_dec.detach().float().norm(dim=-1).cpu()

    def score_batch(start: int) -> _BatchRanks:
        rows = range(start, min(start + cfg.batch_size, len(examples)))
        ids, mask = answer_inputs(lm.tokenizer, [gens[i] for i in rows], [steps[i] for i in rows])
        by_method = score_methods(
            lm,
            sae,
            ids,
            mask,
            NextTokenProb(),
            methods=scored,
            options=ScoreOptions(
                layer=cfg.layer,
                mode=cfg.mode,
                seed=[example_seed(cfg.seed, examples[i].id) for i in rows],
                skip_first=cfg.skip_first,
                ig_steps=cfg.ig_steps,
            ),
        )
        by_method = _with_controls(lm, by_method, ids, mask, cfg)
        if on_batch is not None:
            on_batch(rows, ids, mask, by_method)  # on the rank that scores the batch
        offsets = range(len(rows))
        first = next(iter(by_method.values()))
        ablation = by_method.get("ablation")
        return _BatchRanks(
            rankings=[{m: s.ranking(offset).tolist() for m, s in by_method.items()} for offset in offsets],
            active_last=[int(first.active_last[offset]) for offset in offsets],
            donor_values=[{m: _donor_values(s, offset, cfg) for m, s in by_method.items()} for offset in offsets],
            decoded_norm=[_decoded_norm(first.mean_act[offset], norms) for offset in offsets],
            spearman=_estimate_vs_exact(lm, sae, ids, mask, ablation, cfg) if ablation is not None else [],
        )

    starts = range(0, len(examples), cfg.batch_size)
    with tqdm(total=len(distributed.shard(starts)), desc=f"scoring latents (layer {cfg.layer})", disable=None) as bar:

        def tracked(start: int) -> _BatchRanks:
            ranks = score_batch(start)
            bar.update()
            return ranks

        batches = distributed.map_items(tracked, starts)  # each batch scored by one rank
    rankings = [r for b in batches for r in b.rankings]
    active_last = [a for b in batches for a in b.active_last]
    donor_values = [d for b in batches for d in b.donor_values]
    decoded = [d for b in batches for d in b.decoded_norm]
    spearman = [rho for b in batches for rho in b.spearman]
    kept = [
        KeptExample(example=ex, generation=gen, step=step, rankings=r, active_last=a, donor_values=d, decoded_norm=n)
        for ex, gen, step, r, a, d, n in zip(
            examples, gens, steps, rankings, active_last, donor_values, decoded, strict=True
        )
    ]
    diagnostics: dict[str, Any] = {"answer_steps": steps}
    if spearman:
        diagnostics["spearman_gradsae_sum_vs_ablation"] = {
            "mean": float(np.mean(spearman)),
            "min": float(np.min(spearman)),
            "n": len(spearman),
        }
    return kept, diagnostics


def example_seed(seed: int, example_id: str) -> int:
    """The random ranking's seed for one example: a hash of the run's seed and the example's id.

    It depends on the example alone, not on the batch it was scored in (nor on the batch size).
    """
    digest = hashlib.sha256(f"{seed}/{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class _BatchRanks:
    """What :func:`rank_examples` keeps of one scored batch (gathered across ranks)."""

    rankings: list[dict[str, list[int]]]
    active_last: list[int]
    donor_values: list[dict[str, dict[int, float]]]
    decoded_norm: list[dict[int, float]]
    spearman: list[float]


def _with_controls(
    lm: LoadedModel, by_method: dict[str, Scores], ids: torch.Tensor, mask: torch.Tensor, cfg: ExperimentConfig
) -> dict[str, Scores]:
    """``by_method`` with the activation controls of ``cfg.methods`` added (:mod:`.controls`), in its order."""
    wanted = [m for m in cfg.methods if m in CONTROLS]
    if not wanted:
        return by_method
    residual = compute_prefix(lm, ids, mask, cfg.layer).residual if NOSINK in wanted else None
    extra = {
        m: control_scores(by_method["activation"], m, residual=residual, mask=mask, skip_first=cfg.skip_first)
        for m in wanted
    }
    return {m: by_method[m] if m in by_method else extra[m] for m in cfg.methods}


def _decoded_norm(mean_act: torch.Tensor, norms: torch.Tensor) -> dict[int, float]:
    """Active latent -> ``H_c ||W_dec[c]||``."""
    active = torch.nonzero(mean_act > 0).squeeze(-1).cpu()
    return {int(c): float(mean_act[c].float().cpu() * norms[c]) for c in active}


def _donor_values(scores: Scores, row: int, cfg: ExperimentConfig) -> dict[int, float]:
    """Value each active latent is injected with, clamped to ``cfg.clamp``.

    ``activation``: its activation at the last input token, else its mean activation.
    ``score``: its score under this ranking method (the authors' code; ``random`` uses the mean activation).
    """
    last, mean = scores.last_act[row], scores.mean_act[row]
    if cfg.donor_value == "score" and scores.method not in ("random", "activation"):
        value = scores.per_latent[row].clamp(*cfg.clamp)
    elif cfg.donor_value == "score":
        value = mean.clamp(*cfg.clamp)
    else:
        value = torch.where(last > 0, last, mean).clamp(*cfg.clamp)
    active = torch.nonzero(mean > 0).squeeze(-1)
    return {int(c): float(value[c]) for c in active}


def _estimate_vs_exact(
    lm: LoadedModel, sae: SAE, ids: torch.Tensor, mask: torch.Tensor, exact: Scores, cfg: ExperimentConfig
) -> list[float]:
    """Spearman correlation, per example, of the first-order estimate (sum over positions) and exact ablation."""
    options = ScoreOptions(layer=cfg.layer, mode=cfg.mode, aggregation="sum", skip_first=cfg.skip_first)
    estimate = score_latents(lm, sae, {"input_ids": ids, "attention_mask": mask}, NextTokenProb(), options=options)
    out = []
    for row in range(ids.shape[0]):
        active = exact.mean_act[row] > 0
        if int(active.sum()) > 2:
            out.append(spearman(estimate.per_latent[row, active], exact.per_latent[row, active]))
    return out


def k_value(k: KSpec, example: KeptExample) -> int:
    """K as a count for this example (``"50%"``: half the latents active at the last token)."""
    if isinstance(k, str):
        fraction = float(k.rstrip("%")) / 100
        return max(1, int(example.active_last * fraction))
    return int(k)


def chosen(example: KeptExample, method: str, which: str, k: KSpec) -> list[int]:
    """``Top`` or ``Bottom`` K latents of ``example`` under ``method`` (among positive scores)."""
    ranked = example.rankings[method]
    count = min(k_value(k, example), len(ranked))
    return ranked[:count] if which == "top" else ranked[::-1][:count]


def padded(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[batch, max_len]`` latent ids, ``-1`` padding (ignored by edits)."""
    width = max(1, max((len(r) for r in rows), default=1))
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def overlap_stats(kept: Sequence[KeptExample], cfg: ExperimentConfig, *, by: str, k: int = 10) -> dict[str, float]:
    """The appendix's overlap figures at K = ``k`` (in %).

    ``cross/a-b``: mean over examples of ``|Top_a & Top_b| / min(|Top_a|, |Top_b|)`` (= ``/ K`` when
    both methods chose K latents; an example with fewer positive scores is not counted as disagreement).
    ``within/<method>``: the same ratio, averaged over pairs of examples sharing a label (classification)
    or a context (SQuAD).
    """
    out: dict[str, float] = {}
    methods = [m for m in cfg.methods if m != "random"] + (["random"] if "random" in cfg.methods else [])
    for a, b in combinations(methods, 2):
        values = [_overlap(chosen(ex, a, "top", k), chosen(ex, b, "top", k)) for ex in kept]
        if present := [v for v in values if v is not None]:
            out[f"cross/{a}-{b}"] = 100 * float(np.mean(present))
    key = (lambda ex: ex.example.group) if by == "squad" else (lambda ex: ex.example.label)
    for method in methods:
        values = [
            _overlap(chosen(x, method, "top", k), chosen(y, method, "top", k))
            for x, y in combinations(kept, 2)
            if key(x) is not None and key(x) == key(y)
        ]
        if present := [v for v in values if v is not None]:
            out[f"within/{method}"] = 100 * float(np.mean(present))
    return out


def _overlap(a: Sequence[int], b: Sequence[int]) -> float | None:
    """``|a & b| / min(|a|, |b|)``; ``None`` when either set is empty."""
    if not a or not b:
        return None
    return len(set(a) & set(b)) / min(len(a), len(b))
