"""The first two steps of a run, timed, for ``reproduce --plan``: the keep filter and the ranking.

What an upper bound has to assume, a pilot measures on the run's own code: which examples are
kept, how long their answers are, and where each masked set first changes the prompt.

For a kept example of ``P`` prompt columns, a masking condition zeroes a set ``S`` of latents at
every spliced position. Its rows (:mod:`gradsae.experiments.decode`) run the prompt only from the
first change ``f(S) = min(P - 1, min_{c in S} first_c)``, ``first_c`` the first prompt column
where latent ``c`` is active (earlier columns are the unedited context's, by causal attention), so
the columns a condition computes past block ``l`` are ``P - f(S)``. ``first_c`` is read from the
ranking's own spliced pass (the answer-step input begins with the prompt, and causality makes its
prompt columns the prompt's). The decoder groups rows into at most a few stages per chunk, each
starting at its earliest row's first change, so the count is a lower bound on the columns run.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from gradsae.experiments.config import SETS, ExperimentConfig
from gradsae.experiments.rank import KeptExample, chosen, rank_examples
from gradsae.experiments.run import keep_filter
from gradsae.generate import Generation
from gradsae.models import LoadedModel
from gradsae.plan import Pilot
from gradsae.sae import SAE
from gradsae.scores import Scores
from gradsae.tasks import Task


def run_pilot(lm: LoadedModel, sae: SAE, task: Task, cfg: ExperimentConfig) -> Pilot:
    """The keep filter and the ranking at ``cfg.layer``, timed, and what they tell of the rest of the run."""
    began = time.perf_counter()
    _, clean, spliced, correct = keep_filter(lm, sae, task, cfg)
    keep_seconds = time.perf_counter() - began
    kept = tuple(i for i, ok in enumerate(correct) if ok)
    firsts: dict[int, dict[int, int]] = {}

    def on_batch(rows: range, _ids: torch.Tensor, mask: torch.Tensor, by: dict[str, Scores]) -> None:
        for offset, columns in enumerate(first_active_columns(next(iter(by.values())), mask)):
            firsts[rows[offset]] = columns

    began = time.perf_counter()
    examples = [task.examples[i] for i in kept]
    ranked, _ = rank_examples(lm, sae, task, examples, [spliced[i] for i in kept], cfg, on_batch=on_batch)
    rank_seconds = time.perf_counter() - began
    prompts = [len(spliced[i].prompt_ids) for i in kept]  # the decoded prompt, as the masked rows see it
    return Pilot(
        seconds=keep_seconds,
        generated=tuple(len(gen.token_ids) for gen in clean),
        kept=kept,
        answer_steps=tuple(answer_steps(task, lm.tokenizer, spliced[i]) for i in kept),
        rank_seconds=rank_seconds,
        masked_columns=tuple(
            masked_columns(example, firsts.get(n, {}), prompt, cfg)
            for n, (example, prompt) in enumerate(zip(ranked, prompts, strict=True))
        ),
    )


def first_active_columns(scores: Scores, mask: torch.Tensor) -> list[dict[int, int]]:
    """Per row of a left-padded batch: latent -> the first column (padding removed) where it is active."""
    pads = (mask == 0).sum(dim=1).tolist()
    out: list[dict[int, int]] = [{} for _ in pads]
    for row, pos, latent in scores.token_index.tolist():
        column = pos - pads[row]
        if column < out[row].get(latent, column + 1):
            out[row][latent] = column
    return out


def masked_columns(example: KeptExample, first: dict[int, int], prompt: int, cfg: ExperimentConfig) -> int:
    """Prompt columns every masking condition of ``example`` runs past block ``l`` (the module docstring's
    ``P - f(S)``, summed; the unedited ``K = 0`` condition runs the last column only)."""
    total = 1
    for method in cfg.methods:
        for which in SETS:
            for k in cfg.ks:
                latents = chosen(example, method, which, k)
                start = min([prompt - 1, *(first[c] for c in latents if c in first)])
                total += prompt - max(0, start)
    return total


def answer_steps(task: Task, tokenizer: Any, generation: Generation) -> int:
    """Decode steps until the parsed answer of ``generation`` is final (its length if never)."""
    ids = generation.token_ids
    for step in range(1, len(ids) + 1):
        if task.answered(tokenizer.decode(ids[:step], skip_special_tokens=True)):
            return step
    return len(ids)
