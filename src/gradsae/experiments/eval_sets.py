"""The three held-out sets ``gradsae eval-sae`` measures an SAE on.

Each set is a batch of token sequences (``[n, pos]``, left-padded, with its attention
mask) and the positions whose figures count (:class:`EvalSet`). The SAE is spliced at
every real position but each row's first; the figures read the counted positions
(:func:`gradsae.training.evaluate.evaluate_all`). A set grows one sequence at a time
until its counted tokens reach the budget ``tokens`` (the last sequence may pass it).

1. ``news``: the held-out NewsArticles documents (every 20th: the split ``train-sae``
   holds out), joined with EOS and cut into ``[BOS, t_1, ..., t_{context-1}]`` in
   document order: the evaluation ``train-sae`` writes into the model cards.
   Counted: positions ``1..context-1``.
2. ``chat``: the experiments' own prompts, each the text :meth:`Task.render` feeds the
   model: every task in its default format and, where that is plain few-shot text (the
   generated tasks), also as one user turn of the chat template (``capitals-chat``),
   so the set is chat text throughout. Examples are drawn with ``seed`` as
   :func:`~gradsae.tasks.sample_examples` draws them; the variants take
   turns, one prompt each. Counted: every position but each row's first.
3. ``generated``: the model's own greedy continuations (at most ``new_tokens``; a stop
   token ends one) of held-out news openings (BOS and the first ``opening`` tokens of
   the held-out documents, the last document first) and of the ``chat`` prompts, the
   two taking turns batch by batch. A row is prompt + continuation; counted: the
   continuation's positions only (the prompt is context, spliced but not counted).

Rows are sorted by length (fewer padded columns per forward chunk); padding and the
order change no figure.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any

import torch

from gradsae.generate import encode_prompts, generate_batch, pad_id, pad_left
from gradsae.models import LoadedModel
from gradsae.tasks import Task, load_task, sample_examples, with_prompt_format
from gradsae.training.activations import heldout_tokens, tokenize

log = logging.getLogger(__name__)

SETS = ("news", "chat", "generated")
POOL = 1024
"""Examples drawn per task for the ``chat`` and ``generated`` prompts (all of a smaller task)."""


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set: left-padded sequences and the positions that count."""

    name: str
    input_ids: torch.Tensor
    """``[n, pos]`` token ids, left-padded."""
    attention_mask: torch.Tensor
    """``[n, pos]``: 1 on real tokens."""
    counted: torch.Tensor
    """``[n, pos]`` bool: the positions whose figures count."""
    sources: dict[str, int]
    """Counted tokens per source (``news``, or a task variant such as ``sst2`` or ``capitals-chat``)."""

    @property
    def tokens(self) -> int:
        return int(self.counted.sum())


def build(name: str, rows: Sequence[Sequence[int]], counts: Sequence[int], labels: Sequence[str], pad: int) -> EvalSet:
    """A set from token rows whose last ``counts[i]`` positions count, sorted by length and left-padded."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    ids, mask = pad_left([rows[i] for i in order], pad)
    counted = torch.zeros(ids.shape, dtype=torch.bool)
    for row, i in enumerate(order):
        counted[row, ids.shape[1] - counts[i] :] = True
    sources: Counter[str] = Counter()
    for label, count in zip(labels, counts, strict=True):
        sources[label] += count
    return EvalSet(name=name, input_ids=ids, attention_mask=mask, counted=counted, sources=dict(sources))


# -- the sets -------------------------------------------------------------------
def news_set(tokenizer: Any, heldout: Sequence[str], *, tokens: int, context: int) -> EvalSet:
    """Set 1: held-out news sequences of ``context`` tokens, as ``train-sae`` evaluates."""
    n = max(1, -(-tokens // (context - 1)))
    ids = heldout_tokens(tokenizer, heldout, context=context, n_sequences=n)
    rows = ids.tolist()
    return build("news", rows, [len(row) - 1 for row in rows], ["news"] * len(rows), pad_id(tokenizer))


def task_variants(names: Sequence[str], *, seed: int, pool: int = POOL) -> list[Task]:
    """Each task with ``pool`` examples drawn with ``seed``, in its default format, plus its chat
    rendering where the default is plain text."""
    out = []
    for name in names:
        full = load_task(name, n=None)
        task = replace(full, examples=sample_examples(full, min(pool, len(full)), seed))
        out.append(task)
        if task.prompt_format == "plain":
            out.append(with_prompt_format(task, "chat"))
    return out


def chat_prompts(variants: Sequence[Task], tokenizer: Any) -> Iterator[tuple[str, str]]:
    """``(variant, text)`` with the variants taking turns, one example each, until all run out."""
    longest = max((len(v) for v in variants), default=0)
    for index in range(longest):
        for variant in variants:
            if index < len(variant):
                yield variant.name, variant.render(variant.examples[index], tokenizer)


def chat_set(tokenizer: Any, variants: Sequence[Task], *, tokens: int, limit: int | None = None) -> EvalSet:
    """Set 2: the experiments' prompts as the tasks render them (prompts over ``limit`` tokens skipped)."""
    rows: list[list[int]] = []
    labels: list[str] = []
    total = 0
    for label, text in chat_prompts(variants, tokenizer):
        if total >= tokens:
            break
        row = _prompt_ids(tokenizer, text)
        if len(row) < 2 or (limit is not None and len(row) > limit):
            continue
        rows.append(row)
        labels.append(label)
        total += len(row) - 1
    _warn_short("chat", total, tokens)
    return build("chat", rows, [len(row) - 1 for row in rows], labels, pad_id(tokenizer))


def news_openings(tokenizer: Any, heldout: Sequence[str], *, opening: int) -> Iterator[list[int]]:
    """BOS (when the tokenizer has one) and the first ``opening`` tokens of each held-out document, last first."""
    bos = getattr(tokenizer, "bos_token_id", None)
    for text in reversed(heldout):
        ids = tokenize(tokenizer, [text])[0][:opening]
        if len(ids) == opening:
            yield ids if bos is None else [bos, *ids]


def generated_set(
    lm: LoadedModel,
    heldout: Sequence[str],
    variants: Sequence[Task],
    *,
    tokens: int,
    new_tokens: int,
    opening: int = 16,
    batch: int = 16,
) -> EvalSet:
    """Set 3: greedy continuations of news openings and task prompts; only the continuations count."""
    pad = pad_id(lm.tokenizer)
    limit = context_limit(lm) - new_tokens
    prompts_ids = ((label, _prompt_ids(lm.tokenizer, text)) for label, text in chat_prompts(variants, lm.tokenizer))
    sources = [
        (("news", row) for row in news_openings(lm.tokenizer, heldout, opening=opening)),
        ((label, row) for label, row in prompts_ids if len(row) <= limit),
    ]
    rows: list[list[int]] = []
    counts: list[int] = []
    labels: list[str] = []
    turn = 0
    while sum(counts) < tokens and sources:
        source = sources[turn % len(sources)]
        prompts = list(islice(source, batch))
        if not prompts:
            sources.remove(source)
            continue
        turn += 1
        ids, mask = pad_left([row for _, row in prompts], pad)
        gens = generate_batch(lm, ids.to(lm.device), mask.to(lm.device), max_new_tokens=new_tokens)
        for (label, _), gen in zip(prompts, gens, strict=True):
            if sum(counts) >= tokens:
                break
            rows.append(list(gen.prompt_ids) + list(gen.token_ids))
            counts.append(len(gen.token_ids))
            labels.append(label)
        log.info("generated set: %d of %d tokens", sum(counts), tokens)
    _warn_short("generated", sum(counts), tokens)
    return build("generated", rows, counts, labels, pad)


def context_limit(lm: LoadedModel) -> int:
    """The model's context in tokens (``max_position_embeddings``; very large when it does not say)."""
    return int(getattr(lm.model.config, "max_position_embeddings", None) or 1 << 30)


def _prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """The prompt's token ids exactly as the experiments encode it (:func:`gradsae.generate.encode_prompts`)."""
    ids, mask = encode_prompts(tokenizer, [text])
    return [int(t) for t in ids[0][mask[0].bool()].tolist()]


def _warn_short(name: str, total: int, tokens: int) -> None:
    if total < tokens:
        log.warning("the %s set ran out of text at %d of %d tokens", name, total, tokens)
