"""Feature cards: what one latent reads on a corpus, what it writes to the output, and where a run chose it.

For latent ``c`` of the SAE at layer ``l`` and held-out corpus sequences
``x^(s) = [BOS, t_1, ..., t_{P-1}]``:

1. Forward with the SAE spliced (``error`` mode: the model's output stays exact) and one
   backward of the next-token objective on the text itself, teacher-forced:
   ``Y_s = sum_{n=1}^{P-1} log p(t_n | t_<n)`` (:class:`~gradsae.objectives.TargetLogProb`
   over the tokens after BOS).
2. Per token ``n``: the activation ``H[s, n, c]`` and the GradSAE influence
   ``g[s, n, c] = H[s, n, c] * dY_s/dH[s, n, c]``, the first-order change of the sequence's
   log-likelihood when ``c`` is zeroed at ``n`` (BOS is never spliced).
3. Density: the share of corpus tokens (BOS excluded) with ``H > 0``; a histogram of the
   nonzero activations.
4. Top contexts by activation: sequences ranked by ``max_n H[s, n, c]``; by influence: by
   ``max_n g[s, n, c]``, over ``n >= 2``. Each is shown as a window of tokens around that
   maximum. The first token after BOS is left out of these rankings (not of the statistics):
   it behaves as a second attention sink, so a latent there moves every later prediction
   (on SmolLM2 layer 6 it held 21% of the top contexts by influence, against 1.6% by chance).
5. Logit lens of the decoder direction: ``v = W_U (gamma * W_dec[c])`` over the vocabulary,
   ``gamma`` the final norm's weight when the model has one (``1 + weight`` for Gemma's
   norm). The norm's division by the residual's RMS is a positive per-token scale and is
   left out: it does not change which tokens rank first. Largest ``v``: promoted tokens;
   smallest: suppressed.
6. In a run: the kept examples whose GradSAE TopK, and whose activation TopK, hold ``c``
   (from ``examples.json``).

:class:`CardSet` is saved as ``cards_layer{l}.json`` next to a run; :mod:`gradsae.report.neuronpedia`
writes the same cards in Neuronpedia's upload format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gradsae.errors import GradSAEError
from gradsae.experiments.record import significant
from gradsae.experiments.results import TRACED, CardSet, Context, FeatureCard, LayerExamples
from gradsae.lens import logit_lens
from gradsae.models import LoadedModel
from gradsae.objectives import TargetLogProb
from gradsae.sae import SAE
from gradsae.scores import ScoreOptions, score_methods

BEFORE, AFTER = 12, 4
"""Tokens shown before and after a context's maximum."""
RANK_FROM = 2
"""First position a context's maximum may sit at (BOS and the token after it are left out)."""
BINS = 24


def run_latents(part: LayerExamples) -> list[int]:
    """Every latent in some example's GradSAE or activation TopK, ascending (the other rankings'
    TopK sets, random's included, are not carded)."""
    return sorted({c for ex in part.examples for m in TRACED for c, _ in ex.top.get(m, ())})


def corpus_tokens(tokenizer: Any, corpus: str | None, *, n_sequences: int, context: int) -> torch.Tensor:
    """``[n_sequences, context]`` held-out sequences (every 20th document) of ``corpus``, in document order."""
    from gradsae.training.activations import heldout_tokens, load_texts, split_heldout

    _, heldout = split_heldout(load_texts(corpus))
    return heldout_tokens(tokenizer, heldout, context=context, n_sequences=n_sequences)


# -- computing ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Traces:
    """Dense per-token values of the chosen latents: ``[n_latents, n_seq, pos]`` each."""

    activation: torch.Tensor
    influence: torch.Tensor


def compute_cards(
    lm: LoadedModel,
    sae: SAE,
    ids: torch.Tensor,
    latents: Sequence[int],
    *,
    layer: int,
    label: str = "",
    corpus: str = "",
    examples: LayerExamples | None = None,
    top: int = 8,
    n_tokens: int = 10,
    batch: int = 8,
) -> CardSet:
    """Cards of ``latents`` from corpus sequences ``ids`` ``[n_seq, pos]`` (BOS first); see the module docstring."""
    if not latents:
        raise GradSAEError("no latents to describe: pass --latents 1,2,3 or a run whose examples chose some")
    bad = [c for c in latents if not 0 <= c < sae.cfg.d_sae]
    if bad:
        raise GradSAEError(f"latents {bad} are out of range: this SAE has latents 0..{sae.cfg.d_sae - 1}")
    traces = _corpus_traces(lm, sae, ids.to(lm.device), list(latents), layer=layer, batch=batch)
    words = [[_token(lm.tokenizer, t) for t in row] for row in ids.tolist()]
    lens, note = logit_lens(lm, sae, list(latents))
    cards = tuple(
        _card(c, traces.activation[j], traces.influence[j], words, lens[j], lm.tokenizer, examples, top, n_tokens)
        for j, c in enumerate(latents)
    )
    return CardSet(
        model=lm.name,
        layer=layer,
        sae=label,
        corpus=corpus,
        n_sequences=int(ids.shape[0]),
        context=int(ids.shape[1]),
        objective="sum over the text of log p(next token), teacher-forced; influence = H * dY/dH per token",
        logit_lens=note,
        cards=cards,
    )


def _corpus_traces(
    lm: LoadedModel, sae: SAE, ids: torch.Tensor, latents: list[int], *, layer: int, batch: int
) -> _Traces:
    n_seq, pos = ids.shape
    slot = torch.full((sae.cfg.d_sae,), -1, dtype=torch.long, device=ids.device)
    slot[torch.as_tensor(latents, device=ids.device)] = torch.arange(len(latents), device=ids.device)
    act = torch.zeros(len(latents), n_seq, pos)
    inf = torch.zeros(len(latents), n_seq, pos)
    objective = TargetLogProb(n_target=pos - 1)
    for start in tqdm(range(0, n_seq, batch), desc="feature cards: scoring the corpus", disable=None):
        chunk = ids[start : start + batch]
        by = score_methods(
            lm,
            sae,
            chunk,
            torch.ones_like(chunk),
            objective,
            methods=("gradsae", "activation"),
            options=ScoreOptions(layer=layer),
        )
        index = by["gradsae"].token_index
        here = slot[index[:, 2]]
        keep = here >= 0
        j, b, n = here[keep].cpu(), index[keep, 0].cpu() + start, index[keep, 1].cpu()
        act[j, b, n] = by["activation"].token_score[keep].detach().float().cpu()
        inf[j, b, n] = by["gradsae"].token_score[keep].detach().float().cpu()
    return _Traces(activation=act, influence=inf)


def _card(
    latent: int,
    act: torch.Tensor,
    inf: torch.Tensor,
    words: list[list[str]],
    lens: torch.Tensor,
    tokenizer: Any,
    examples: LayerExamples | None,
    top: int,
    n_tokens: int,
) -> FeatureCard:
    body = act[:, 1:]
    active = body > 0
    values = body[active].numpy()
    counts, edges = np.histogram(values, bins=BINS) if values.size else (np.zeros(0, int), np.zeros(0))
    l_counts, l_edges = np.histogram(lens.numpy(), bins=BINS)
    order = lens.argsort(descending=True)
    return FeatureCard(
        latent=latent,
        density=float(active.float().mean()) if body.numel() else 0.0,
        max_activation=significant(values.max()) if values.size else 0.0,
        mean_activation=significant(values.mean()) if values.size else 0.0,
        mean_influence=significant(inf[:, 1:][active].mean()) if values.size else 0.0,
        hist_edges=tuple(significant(e) for e in edges),
        hist_counts=tuple(int(c) for c in counts),
        top_activation=_contexts(act, act, inf, words, top),
        top_influence=_contexts(inf, act, inf, words, top),
        promoted=tuple((_token(tokenizer, int(t)), significant(lens[t])) for t in order[:n_tokens]),
        suppressed=tuple((_token(tokenizer, int(t)), significant(lens[t])) for t in order.flip(0)[:n_tokens]),
        logit_edges=tuple(significant(e) for e in l_edges),
        logit_counts=tuple(int(c) for c in l_counts),
        in_run=_in_run(latent, examples),
    )


def _contexts(
    rank_by: torch.Tensor, act: torch.Tensor, inf: torch.Tensor, words: list[list[str]], top: int
) -> tuple[Context, ...]:
    """The ``top`` sequences with the largest positive ``max_n rank_by[s, n]`` (``n >= RANK_FROM``), as windows."""
    best, where = rank_by[:, RANK_FROM:].max(dim=1)
    where = where + RANK_FROM
    out = []
    for s in best.argsort(descending=True, stable=True)[:top].tolist():
        if float(best[s]) <= 0:
            break
        peak = int(where[s])
        lo, hi = max(0, peak - BEFORE), min(act.shape[1], peak + AFTER + 1)
        out.append(
            Context(
                sequence=s,
                start=lo,
                tokens=tuple(words[s][lo:hi]),
                activation=tuple(significant(v) for v in act[s, lo:hi]),
                influence=tuple(significant(v) for v in inf[s, lo:hi]),
                peak=peak - lo,
                value=significant(best[s]),
            )
        )
    return tuple(out)


def _in_run(latent: int, examples: LayerExamples | None) -> dict[str, tuple[str, ...]]:
    if examples is None:
        return {}
    return {
        m: tuple(ex.id for ex in examples.examples if any(c == latent for c, _ in ex.top.get(m, ()))) for m in TRACED
    }


def _token(tokenizer: Any, token: int) -> str:
    return str(tokenizer.decode([token]))
