"""The fast exact ablation oracle against one plain, uncached forward per latent (the oracle's definition).

The reference splices the SAE with ``Edit(latents=[c])`` and runs the whole prompt
through the whole model, no prefix, no cache, no batching: what the oracle did before
it reused the clean keys and values. The models are sharp (large weights) so that
single-latent effects are far above the 1e-6 tolerance, and the SAEs sparse enough
that latents first fire at many different columns.
"""

from __future__ import annotations

import functools

import pytest
import torch

from gradsae import oracle
from gradsae.experiments.curves import greedy_token, pinned_token_prob
from gradsae.generate import generate_batch
from gradsae.models import LoadedModel, position_ids
from gradsae.objectives import NextTokenProb, Objective
from gradsae.sae import SAE
from gradsae.scores import ScoreOptions, score_methods
from gradsae.splice import Edit, Mode, splice
from tests.helpers import CharTokenizer, tiny_lm, tiny_sae

LAYER = 1


def sharp_lm(seed: int = 0) -> LoadedModel:
    """Three blocks (the splice in the middle one), weights scaled so single latents move the output."""
    lm = tiny_lm(layers=3, seed=seed, vocab=128, tokenizer=CharTokenizer())
    with torch.no_grad():
        for param in lm.model.parameters():
            if param.ndim == 2:
                param.mul_(20)
    return lm


def sparse_sae(activation: str) -> SAE:
    """A tiny SAE at block 1 whose latents fire rarely: first active columns spread over the prompt."""
    sae = tiny_sae(activation, d_sae=48, seed=2, layer=LAYER)
    with torch.no_grad():
        sae.W_enc.mul_(4)
        if activation == "relu":
            sae.b_enc.sub_(0.6)
    return sae


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts of 24 and 17 tokens (BOS first)."""
    tok = CharTokenizer()
    rows = [tok.encode("the quick brown fox jump"[:23]), tok.encode("a lazy dog sleeps")]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def reference_effects(
    lm: LoadedModel,
    sae: SAE,
    ids: torch.Tensor,
    mask: torch.Tensor,
    objective: Objective,
    latents: list[int],
    *,
    mode: Mode,
    skip_first: bool,
    layer: int = LAYER,
) -> torch.Tensor:
    """``Y(clean) - Y(c zeroed everywhere)`` for one row, one full uncached forward per latent."""

    def value(edits: list[Edit]) -> torch.Tensor:
        with splice(lm, sae, layer, mode=mode, edits=edits, record=False, skip_first=skip_first):
            logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        return objective(logits.logits, ids)[0]

    clean = value([])
    return torch.stack([clean - value([Edit(latents=[c])]) for c in latents])


def first_active(lm, sae, ids, mask, *, mode, skip_first, layer=LAYER) -> dict[int, int]:
    """Latent -> first column where it is active in the clean spliced pass."""
    with splice(lm, sae, layer, mode=mode, skip_first=skip_first) as sp, torch.no_grad():
        lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    out: dict[int, int] = {}
    for _, pos, c in sp.latents[0].index.tolist():
        out.setdefault(c, pos)
        out[c] = min(out[c], pos)
    return out


def check_varied(firsts: dict[int, int], width: int) -> None:
    """The check is only strong if the latents start at many columns, some late."""
    assert len(set(firsts.values())) >= 5, firsts
    assert max(firsts.values()) >= width // 2, firsts


@pytest.mark.parametrize("activation", ["relu", "topk"])
@pytest.mark.parametrize("skip_first", [True, False])
@pytest.mark.parametrize("mode", ["error", "replace"])
def test_ablation_scores_equal_one_forward_per_latent(mode, skip_first, activation):
    """``score_methods(..., 'ablation')`` on a left-padded batch, ``NextTokenProb`` pinned to the clean token."""
    lm, sae = sharp_lm(), sparse_sae(activation)
    ids, mask = prompts()
    kwargs = {"layer": LAYER, "mode": mode, "skip_first": skip_first}
    scores = score_methods(
        lm, sae, ids, mask, NextTokenProb(), methods=("ablation",), options=ScoreOptions(ablation_batch=5, **kwargs)
    )
    exact = scores["ablation"]
    for row in range(2):
        latents = torch.nonzero(exact.mean_act[row] > 0).squeeze(-1).tolist()
        firsts = first_active(lm, sae, ids[row : row + 1], mask[row : row + 1], mode=mode, skip_first=skip_first)
        assert sorted(firsts) == latents
        check_varied(firsts, int(mask[row].sum()))
        pinned = NextTokenProb().pinned(int(exact.token[row]))
        ref = reference_effects(
            lm, sae, ids[row : row + 1], mask[row : row + 1], pinned, latents, mode=mode, skip_first=skip_first
        )
        got = exact.per_latent[row, latents].double()
        assert ref.abs().max() > 1e-2, "effects this small could not tell a wrong oracle from a right one"
        assert torch.allclose(got, ref.double(), rtol=0, atol=1e-6), (got - ref).abs().max()
        assert (exact.per_latent[row].abs() > 0).sum() <= len(latents)


@pytest.mark.parametrize("batch_size", [1, 4, 64])
@pytest.mark.parametrize("mode", ["error", "replace"])
def test_answer_step_of_a_generation_with_the_answer_token_pinned(mode, batch_size):
    """The curves' oracle: a prompt plus generated tokens up to the answer step, ``p(pinned clean token)``."""
    lm, sae = sharp_lm(seed=1), sparse_sae("topk")
    prompt = torch.tensor([CharTokenizer().encode("question: colour of sky?")])
    with splice(lm, sae, LAYER, mode=mode):
        generated = generate_batch(lm, prompt, torch.ones_like(prompt), max_new_tokens=6, stop=frozenset())[0]
    ids = torch.tensor([generated.prefix(4)])  # the prompt and four generated tokens: the "answer" step is next
    mask = torch.ones_like(ids)
    token = greedy_token(lm, sae, ids, mask, layer=LAYER, mode=mode)
    objective = pinned_token_prob(token)
    firsts = first_active(lm, sae, ids, mask, mode=mode, skip_first=True)
    check_varied(firsts, ids.shape[1])
    latents = torch.tensor(sorted(firsts))
    got = oracle.ablation_effects(lm, sae, ids, mask, objective, latents, layer=LAYER, mode=mode, batch_size=batch_size)
    ref = reference_effects(lm, sae, ids, mask, objective, latents.tolist(), mode=mode, skip_first=True)
    assert ref.abs().max() > 1e-2
    assert torch.allclose(got.double(), ref.double(), rtol=0, atol=1e-6), (got - ref).abs().max()


def test_passes_start_at_each_batch_first_active_column():
    """Sorted by first active column, each batch's pass runs only the columns from its earliest one."""
    lm, sae = sharp_lm(), sparse_sae("topk")
    ids, mask = prompts()
    ids, mask = ids[:1], mask[:1]
    objective = NextTokenProb()
    clean = oracle.clean_pass(lm, sae, ids, mask, objective, layer=LAYER, mode="error")
    firsts = first_active(lm, sae, ids, mask, mode="error", skip_first=True)
    latents = torch.tensor(sorted(firsts))
    starts = oracle.first_columns(clean, latents, keep=objective.keep)
    assert starts.tolist() == [min(firsts[c], ids.shape[1] - 1) for c in latents.tolist()]
    seen: list[int] = []
    real = lm.model.forward

    @functools.wraps(real)
    def counting(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[1])
        return real(*args, **kwargs)

    lm.model.forward = counting
    try:
        oracle.ablation_effects(lm, sae, ids, mask, objective, latents, layer=LAYER, mode="error", batch_size=4)
    finally:
        del lm.model.forward
    ordered = sorted(starts.tolist())
    width = ids.shape[1]
    assert seen == [width, width] + [width - ordered[i] for i in range(0, len(ordered), 4)]  # prefix, clean, batches
    assert sum(seen[2:]) < 0.75 * width * len(seen[2:]), "the passes should be well under full length"


def test_objective_reading_every_column_starts_at_zero():
    """An objective over all columns (``keep=None``) cannot reuse the cache: every pass is the whole prompt."""
    from gradsae.objectives import TargetLogProb

    lm, sae = sharp_lm(), sparse_sae("topk")
    ids, mask = prompts()
    ids, mask = ids[:1], mask[:1]
    objective = TargetLogProb(5)
    firsts = first_active(lm, sae, ids, mask, mode="error", skip_first=True)
    latents = torch.tensor(sorted(firsts))
    got = oracle.ablation_effects(lm, sae, ids, mask, objective, latents, layer=LAYER, mode="error", batch_size=7)
    ref = reference_effects(lm, sae, ids, mask, objective, latents.tolist(), mode="error", skip_first=True)
    assert torch.allclose(got.double(), ref.double(), rtol=0, atol=1e-5), (got - ref).abs().max()


@pytest.mark.slow
def test_fast_oracle_equals_one_forward_per_latent_on_smollm2():
    """SmolLM2-135M-Instruct with the shipped layer-15 SAE, one chat prompt, 40 latents spread over first columns.

    In float64 the oracle equals one full forward per latent to 1e-9: the same maths.
    In float32 both routes round differently through 30 blocks; on this prompt the
    previous oracle (full prompt, prefix replayed, 33 rows a batch) was itself up to
    6.4e-6 from the one-forward-per-latent reference, and this one 4.3e-6 (all 968
    latents), so float32 is held to 2e-5.
    """
    from gradsae.models import load_model
    from gradsae.pretrained import resolve_sae

    lm = load_model()
    sae, layer, _ = resolve_sae(lm, None, 15, default_model=True)
    text = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    mask = torch.ones_like(ids)
    firsts = first_active(lm, sae, ids, mask, mode="error", skip_first=True, layer=layer)
    by_first = sorted(firsts, key=lambda c: (firsts[c], c))
    latents = torch.tensor(by_first[:: max(1, len(by_first) // 40)])
    assert len({firsts[int(c)] for c in latents}) >= 10 and max(firsts[int(c)] for c in latents) >= ids.shape[1] // 2
    for dtype, tolerance in ((torch.float32, 2e-5), (torch.float64, 1e-9)):
        lm.model.to(dtype)
        sae = sae.to(dtype)
        for mode in ("error", "replace"):
            token = greedy_token(lm, sae, ids, mask, layer=layer, mode=mode)
            objective = pinned_token_prob(token)
            got = oracle.ablation_effects(lm, sae, ids, mask, objective, latents, layer=layer, mode=mode)
            ref = reference_effects(
                lm, sae, ids, mask, objective, latents.tolist(), mode=mode, skip_first=True, layer=layer
            )
            assert ref.abs().max() > 1e-3
            assert torch.allclose(got.double(), ref.double(), rtol=0, atol=tolerance), (
                dtype,
                mode,
                (got - ref).abs().max(),
            )


def test_oracle_cost_figure_runs_on_the_tiny_model():
    """The benchmark figure: per-latent oracle time over the plain forward, with its floor, target and ``met``."""
    from benchmarks.oracle import ORACLE_TARGET, oracle_cost

    lm, sae = sharp_lm(), sparse_sae("topk")
    ids, _ = prompts()
    figure = oracle_cost(lm, sae, [ids[:1]], LAYER, repeats=1, slow_repeats=1, batch_size=8)
    assert figure.name == "oracle_cost" and figure.target == ORACLE_TARGET == 0.5
    assert figure.value is not None and figure.value > 0 and figure.met in (True, False)
    assert figure.extra["floor_s"] > 0 and figure.extra["active_latents"] == [
        len(first_active(lm, sae, ids[:1], torch.ones_like(ids[:1]), mode="error", skip_first=True))
    ]
    assert "floor: one plain forward" in figure.line()
