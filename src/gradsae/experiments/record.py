"""Per-example dump of a run: ``examples.json``, what the HTML report shows example by example.

For kept example ``i`` at layer ``l`` (input ``x_i``: the prompt plus the tokens generated
before the answer step, the same input the rankings scored) it keeps:

* the tokens of ``x_i`` as strings, the generated answer, the gold answers, the greedy
  token ``y*`` the objective ``Y_i = p(y*)`` read, and ``Y_i``;
* per ranking method ``m`` of the run (every one of its ``methods``: gradsae, activation,
  random, ig, relp, the activation controls, ablation) its TopK at the largest K of the
  run, ``Top_m(i, K_max)``, as ``(latent, score)`` best first;
* for each latent ``c`` in the union of those sets, its score under every method, and
  sparse per-token values at the positions ``n`` where it is active: the activation
  ``H[n, c]``, the GradSAE influence ``g[n, c] = H[n, c] * dY_i/dH[n, c]`` (signed, before
  the paper's clamp) and, for ``ig`` and ``relp``, their own per-token attribution;
* the answer text under each masking condition (``method/set/K``, and ``none``).

:class:`ExampleRecorder` collects these while :func:`~gradsae.experiments.run.run_layer`
runs (through the ``on_batch`` hook of :func:`~gradsae.experiments.rank.rank_examples` and
the ``on_answers`` hook of :func:`~gradsae.experiments.perturb.run_perturbation`);
:class:`ExampleDump` writes and reads the file. ``results.json`` is unchanged by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gradsae import distributed
from gradsae.experiments.config import KSpec
from gradsae.experiments.rank import KeptExample, chosen
from gradsae.experiments.results import ExampleDump, ExampleRecord, LatentTrace, LayerExamples
from gradsae.scores import Scores

PER_TOKEN = ("ig", "relp")
"""Estimators whose signed per-token attribution is kept beside GradSAE's influence."""


@dataclass(frozen=True)
class _Pending:
    """What the scoring pass leaves for one example until the layer is finished."""

    tokens: tuple[str, ...]
    entries: torch.Tensor
    """``[nnz, 2]`` (position in ``tokens``, latent) of each active entry."""
    activation: torch.Tensor
    influence: torch.Tensor
    per_latent: dict[str, torch.Tensor]
    """Method -> ``[d_sae]`` aggregated score (every ranking method of the run)."""
    per_token: dict[str, torch.Tensor]
    """Method of :data:`PER_TOKEN` -> ``[nnz]`` its per-token attribution at ``entries``."""
    target: str
    objective: float


@dataclass
class ExampleRecorder:
    """Collects :class:`ExampleRecord` s while a run goes; :meth:`dump` gives the file's content."""

    tokenizer: Any
    _pending: dict[int, _Pending] = field(default_factory=dict)
    _answers: dict[str, list[str]] = field(default_factory=dict)
    _layers: list[LayerExamples] = field(default_factory=list)

    def on_scores(self, rows: range, ids: torch.Tensor, mask: torch.Tensor, by_method: dict[str, Scores]) -> None:
        """Keep each row's tokens and per-token values (the ``on_batch`` hook of ``rank_examples``)."""
        for offset, i in enumerate(rows):
            self._pending[i] = _pending_row(self.tokenizer, offset, ids, mask, by_method)

    def on_answers(self, key: str, texts: Sequence[str]) -> None:
        """Keep the answers of one masking condition, in kept order (the hook of ``run_perturbation``)."""
        self._answers[key] = list(texts)

    def finish(self, layer: int, kept: Sequence[KeptExample], ks: Sequence[KSpec]) -> LayerExamples:
        """Turn what was collected for ``layer`` into records; reset for the next layer.

        Under torchrun every rank calls this: the rows scored on other ranks are gathered first.
        """
        self._pending = distributed.union(self._pending)
        records = tuple(self._record(i, ex, ks) for i, ex in enumerate(kept))
        part = LayerExamples(layer=layer, examples=records)
        self._layers.append(part)
        self._pending, self._answers = {}, {}
        return part

    def add(self, part: LayerExamples) -> None:
        """Keep a layer finished by an earlier invocation (recalled from the journal)."""
        self._layers.append(part)

    def dump(self) -> ExampleDump:
        return ExampleDump(layers=tuple(self._layers))

    def _record(self, i: int, kept: KeptExample, ks: Sequence[KSpec]) -> ExampleRecord:
        pending = self._pending[i]
        top = {}
        for method, scores in pending.per_latent.items():
            best = max((chosen(kept, method, "top", k) for k in ks), key=len, default=[])
            top[method] = tuple((c, significant(scores[c])) for c in best)
        latents = sorted({c for rows in top.values() for c, _ in rows})
        return ExampleRecord(
            id=kept.example.id,
            tokens=pending.tokens,
            prompt_len=len(kept.generation.prompt_ids),
            answer=kept.generation.text,
            gold=kept.example.answers,
            label=kept.example.label,
            target=pending.target,
            objective=pending.objective,
            top=top,
            traces=tuple(_trace(pending, c) for c in latents),
            masked={key: texts[i] for key, texts in self._answers.items() if i < len(texts)},
        )


def _pending_row(
    tokenizer: Any, row: int, ids: torch.Tensor, mask: torch.Tensor, by_method: dict[str, Scores]
) -> _Pending:
    """Row ``row`` of a scored batch: its tokens as strings and its active entries' values."""
    base = by_method.get("gradsae") or next(iter(by_method.values()))
    real = ids[row][mask[row].bool()].tolist()
    pad = int((mask[row] == 0).sum())
    here = base.token_index[:, 0] == row
    index = base.token_index[here]
    influence = by_method["gradsae"].token_score[here] if "gradsae" in by_method else torch.zeros(len(index))
    activation = by_method["activation"].token_score[here] if "activation" in by_method else influence * 0
    entries = torch.stack([index[:, 1] - pad, index[:, 2]], dim=1)
    target = "" if base.token is None else tokenizer.decode([int(base.token[row])])
    return _Pending(
        tokens=tuple(tokenizer.decode([t]) for t in real),
        entries=entries.cpu(),
        activation=activation.detach().float().cpu(),
        influence=influence.detach().float().cpu(),
        per_latent={m: s.per_latent[row].detach().float().cpu() for m, s in by_method.items()},
        per_token={
            m: s.token_score[here].detach().float().cpu()
            for m, s in by_method.items()
            if m in PER_TOKEN and torch.equal(s.token_index, base.token_index)
        },
        target=target,
        objective=float(base.objective[row]),
    )


def _trace(pending: _Pending, latent: int) -> LatentTrace:
    here = pending.entries[:, 1] == latent
    positions = pending.entries[here, 0]
    order = positions.argsort()
    scores = {m: significant(v[latent]) for m, v in pending.per_latent.items()}
    return LatentTrace(
        latent=latent,
        gradsae=scores.get("gradsae", 0.0),
        mean_activation=scores.get("activation", 0.0),
        positions=tuple(int(p) for p in positions[order]),
        activation=tuple(significant(v) for v in pending.activation[here][order]),
        influence=tuple(significant(v) for v in pending.influence[here][order]),
        scores=scores,
        token_scores={m: tuple(significant(v) for v in t[here][order]) for m, t in pending.per_token.items()},
    )


def significant(value: Any, digits: int = 5) -> float:
    """``value`` rounded to ``digits`` significant digits (keeps the JSON small)."""
    return float(f"{float(value):.{digits}g}")


def record_scores(
    tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, by_method: dict[str, Scores], *, top: int
) -> ExampleRecord:
    """One scored input (row 0) as a record, for ``gradsae score --html``: TopK = ``top`` per method."""
    pending = _pending_row(tokenizer, 0, ids, mask, by_method)
    tops = {}
    for method, scores in by_method.items():
        best = scores.ranking(0)[:top].tolist()
        tops[method] = tuple((int(c), significant(scores.per_latent[0, c])) for c in best)
    latents = sorted({c for rows in tops.values() for c, _ in rows})
    return ExampleRecord(
        id="prompt",
        tokens=pending.tokens,
        prompt_len=len(pending.tokens),
        answer=pending.target,
        gold=(),
        label=None,
        target=pending.target,
        objective=pending.objective,
        top=tops,
        traces=tuple(_trace(pending, c) for c in latents),
    )
