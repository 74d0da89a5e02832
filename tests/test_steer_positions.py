"""Steering at the last position while decoding: newest-only and cumulative, against uncached references.

The references re-run the whole sequence (prompt + tokens so far) without a
cache at every step, with a hand-written hook on the spliced block that splices
every real position but the first (replace mode) and edits only chosen columns:

* newest (the authors' code): only the last column of each step's sequence;
* cumulative: every column that has ever been last (the last prompt token on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from gradsae.errors import GradSAEError
from gradsae.generate import encode_prompts, generate_batch
from gradsae.models import LoadedModel
from gradsae.prefix import compute_prefix, replay_prefix
from gradsae.sae import SAE
from gradsae.splice import Edit, splice
from tests.helpers import CharTokenizer, tiny_lm, tiny_sae

PROMPTS = ["hello there", "a", "the quick brown fox", "zz top [x]", "steer me"]
STEPS = 8
LAYER = 0
OWN = [[3, 7, -1], [5, -1, -1], [1, 2, 4], [9, -1, -1], [10, 6, -1]]
"""Per row: latents zeroed (``-1`` pads)."""
DONOR = [[11, 12], [13, -1], [14, 15], [16, 17], [18, -1]]
"""Per row: latents set to ``DONOR_VALUES`` (``-1`` pads)."""
DONOR_VALUES = [[6.0, 4.0], [8.0, 0.0], [5.0, 7.0], [9.0, 3.0], [6.5, 0.0]]

Columns = Callable[[int, int], range]
"""``(prompt width, sequence width) -> edited columns`` of one uncached step."""


def newest_columns(_prompt: int, width: int) -> range:
    return range(width - 1, width)


def cumulative_columns(prompt: int, width: int) -> range:
    return range(prompt - 1, width)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    """A 2-layer random Llama, d_model 32, with large weights so greedy tokens vary."""
    return tiny_lm(
        vocab=128,
        tokenizer=CharTokenizer(),
        hidden=32,
        intermediate=64,
        heads=4,
        kv_heads=2,
        max_positions=128,
        init_range=0.3,
    )


@pytest.fixture(scope="module")
def sae32() -> SAE:
    return tiny_sae(d_sae=48, d_in=32, layer=LAYER)


def steering(kinds: Sequence[str], positions: Any = "last") -> list[Edit]:
    """Zero each row's own latents and / or set its donor latents (rows padded with ``-1``)."""
    edits = []
    if "zero" in kinds:
        edits.append(Edit(latents=torch.tensor(OWN), op="zero", positions=positions))
    if "set" in kinds:
        edits.append(
            Edit(latents=torch.tensor(DONOR), op="set", values=torch.tensor(DONOR_VALUES), positions=positions)
        )
    return edits


def edit_by_hand(h: torch.Tensor, columns: range, kinds: Sequence[str]) -> torch.Tensor:
    """``h`` ``[batch, pos, d_sae]`` with the steering edits applied at ``columns``, element by element."""
    h = h.clone()
    for row in range(h.shape[0]):
        for col in columns:
            if "zero" in kinds:
                for latent in OWN[row]:
                    if latent >= 0:
                        h[row, col, latent] = 0.0
            if "set" in kinds:
                for latent, value in zip(DONOR[row], DONOR_VALUES[row], strict=True):
                    if latent >= 0:
                        h[row, col, latent] = value
    return h


def uncached_reference(
    lm: LoadedModel,
    sae: SAE,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    columns: Columns | None,
    kinds: Sequence[str] = ("zero", "set"),
    steps: int = STEPS,
) -> list[list[int]]:
    """Greedy tokens, re-running the full left-padded sequence without a cache at every step."""
    prompt = input_ids.shape[1]
    first = mask.int().argmax(dim=1)  # each row's first real token: not spliced
    seq, seq_mask = input_ids, mask
    state: dict[str, Any] = {}

    def hook(_module: Any, _inputs: Any, out: Any) -> Any:
        z = out[0] if isinstance(out, tuple) else out
        h = sae.encode(z)
        if state["columns"] is not None:
            h = edit_by_hand(h, state["columns"], kinds)
        cols = torch.arange(z.shape[1])
        keep = state["mask"].bool() & (cols[None, :] != first[:, None])
        new = torch.where(keep[..., None], sae.decode(h).to(z.dtype), z)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = lm.layers[LAYER].register_forward_hook(hook)
    try:
        for _ in range(steps):
            width = seq.shape[1]
            state["columns"] = columns(prompt, width) if columns else None
            state["mask"] = seq_mask
            positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = lm.model(
                    input_ids=seq, attention_mask=seq_mask, position_ids=positions, use_cache=False
                ).logits[:, -1]
            token = logits.argmax(-1)
            seq = torch.cat([seq, token[:, None]], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], dim=1)
    finally:
        handle.remove()
    return seq[:, prompt:].tolist()


def decoded(
    lm: LoadedModel, sae: SAE, input_ids: torch.Tensor, mask: torch.Tensor, edits: list[Edit], *, newest: bool
) -> list[list[int]]:
    with splice(lm, sae, LAYER, mode="replace", edits=edits, record=False) as sp:
        gens = generate_batch(
            lm, input_ids, mask, max_new_tokens=STEPS, stop=frozenset(), newest_only=sp if newest else None
        )
        assert sp.edits_on
    return [list(g.token_ids) for g in gens]


@pytest.mark.parametrize("kinds", [("zero", "set"), ("zero",), ("set",)])
def test_newest_equals_uncached_last_position_reference(tiny, sae32, kinds):
    ids, mask = encode_prompts(tiny.tokenizer, PROMPTS)
    assert (mask == 0).any()  # really left-padded
    newest = decoded(tiny, sae32, ids, mask, steering(kinds), newest=True)
    assert newest == uncached_reference(tiny, sae32, ids, mask, columns=newest_columns, kinds=kinds)
    unsteered = uncached_reference(tiny, sae32, ids, mask, columns=None)
    assert newest != unsteered  # the edits do something
    assert len({tuple(row) for row in newest}) > 1


@pytest.mark.parametrize("positions", ["cumulative", "last"])
def test_cumulative_equals_reference_editing_every_former_last_position(tiny, sae32, positions):
    """Plain cached decoding keeps each newest token's edit in the cache ("last" is the same per pass)."""
    ids, mask = encode_prompts(tiny.tokenizer, PROMPTS)
    cumulative = decoded(tiny, sae32, ids, mask, steering(("zero", "set"), positions), newest=False)
    assert cumulative == uncached_reference(tiny, sae32, ids, mask, columns=cumulative_columns)


def test_newest_and_cumulative_differ(tiny, sae32):
    ids, mask = encode_prompts(tiny.tokenizer, PROMPTS)
    newest = decoded(tiny, sae32, ids, mask, steering(("zero", "set")), newest=True)
    cumulative = decoded(tiny, sae32, ids, mask, steering(("zero", "set"), "cumulative"), newest=False)
    assert newest != cumulative
    # they agree on the first token: both edit only the last prompt position so far
    assert [row[0] for row in newest] == [row[0] for row in cumulative]


def test_newest_without_edits_is_plain_decoding(tiny, sae32):
    ids, mask = encode_prompts(tiny.tokenizer, PROMPTS)
    assert decoded(tiny, sae32, ids, mask, [], newest=True) == decoded(tiny, sae32, ids, mask, [], newest=False)


def test_newest_with_stop_tokens_equals_each_row_alone(tiny, sae32):
    """Rows that stop are fed padding; the others are unaffected (batched == one row at a time)."""
    ids, mask = encode_prompts(tiny.tokenizer, PROMPTS)
    free = decoded(tiny, sae32, ids, mask, steering(("zero", "set")), newest=True)
    stop = frozenset({free[0][2], free[3][1]})  # rows end early, at different steps
    edits = steering(("zero", "set"))
    with splice(tiny, sae32, LAYER, mode="replace", edits=edits, record=False) as sp:
        batched = generate_batch(tiny, ids, mask, max_new_tokens=STEPS, stop=stop, newest_only=sp)
    assert any(g.stopped for g in batched) and not all(g.stopped for g in batched)
    for row, text in enumerate(PROMPTS):
        one_ids, one_mask = encode_prompts(tiny.tokenizer, [text])
        one_edits = [_row_edit(edit, row) for edit in edits]
        with splice(tiny, sae32, LAYER, mode="replace", edits=one_edits, record=False) as sp:
            alone = generate_batch(tiny, one_ids, one_mask, max_new_tokens=STEPS, stop=stop, newest_only=sp)
        assert batched[row].token_ids == alone[0].token_ids


def _row_edit(edit: Edit, row: int) -> Edit:
    latents = torch.as_tensor(edit.latents)[row : row + 1]
    values = edit.values[row : row + 1] if isinstance(edit.values, torch.Tensor) else edit.values
    return Edit(latents=latents, op=edit.op, values=values, positions=edit.positions)


@pytest.mark.parametrize("layer", [0, 1])
def test_newest_works_with_prefix_replay(tiny, layer):
    """The prompt pass may replay blocks 0..l; the crop and the unedited refill then run them for real."""
    sae = tiny_sae(d_sae=48, d_in=32, layer=layer)
    for texts, special in ((PROMPTS, True), (["a", "b"], False)):  # the second: a one-token prompt
        ids, mask = encode_prompts(tiny.tokenizer, texts, add_special_tokens=special)
        edits = [Edit(latents=torch.tensor([[11, 12]] * len(texts)), op="set", values=6.0, positions="last")]
        prefix = compute_prefix(tiny, ids, mask, layer)
        with splice(tiny, sae, layer, mode="replace", edits=edits, skip_first=False, record=False) as sp:
            plain = generate_batch(tiny, ids, mask, max_new_tokens=STEPS, stop=frozenset(), newest_only=sp)
            with replay_prefix(tiny, prefix):
                reused = generate_batch(tiny, ids, mask, max_new_tokens=STEPS, stop=frozenset(), newest_only=sp)
        assert [g.token_ids for g in reused] == [g.token_ids for g in plain]


def test_newest_past_a_sliding_window():
    """Gemma 2's sliding-window cache layers can drop their newest position once the window is full."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        sliding_window=6,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = Gemma2ForCausalLM(config).eval().requires_grad_(False)
    assert "sliding_attention" in config.layer_types
    lm = LoadedModel(model=model, tokenizer=CharTokenizer(), name="tiny-gemma2")
    sae = tiny_sae(d_sae=48, d_in=32, layer=LAYER)
    ids, mask = encode_prompts(lm.tokenizer, PROMPTS)
    assert ids.shape[1] > config.sliding_window
    newest = decoded(lm, sae, ids, mask, steering(("zero", "set")), newest=True)
    assert newest == uncached_reference(lm, sae, ids, mask, columns=newest_columns)
    assert newest != uncached_reference(lm, sae, ids, mask, columns=None)


@pytest.mark.parametrize(
    "positions", ["all", "cumulative", torch.ones(len(PROMPTS), 4, dtype=torch.bool)], ids=["all", "cumulative", "mask"]
)
def test_newest_refuses_other_positions(tiny, sae32, positions):
    ids, mask = encode_prompts(tiny.tokenizer, PROMPTS)
    edits = [*steering(("zero",)), Edit(latents=[1], op="zero", positions=positions)]
    with splice(tiny, sae32, LAYER, mode="replace", edits=edits) as sp, pytest.raises(GradSAEError, match="'last'"):
        generate_batch(tiny, ids, mask, max_new_tokens=2, newest_only=sp)


def test_unknown_positions_are_refused():
    with pytest.raises(GradSAEError, match="cumulative"):
        Edit(latents=[1], positions="newest")  # type: ignore[arg-type]
