"""Batched cached greedy decoding equals unbatched decoding and ``model.generate``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gradsae.generate import (
    Generation,
    answer_inputs,
    answer_step,
    encode_prompts,
    generate,
    generate_batch,
    pad_left,
    position_ids,
    stop_ids,
)
from gradsae.models import LoadedModel, block_output
from tests.helpers import EOS, PAD, CharTokenizer, tiny_lm

PROMPTS = ["hello there", "a", "the quick brown fox", "zz top [x]"]


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


def reference(lm: LoadedModel, text: str, max_new_tokens: int) -> list[int]:
    """``model.generate`` on one unpadded prompt, cut after the first stop token."""
    input_ids, mask = encode_prompts(lm.tokenizer, [text])
    out = lm.model.generate(
        input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=PAD
    )
    tokens = out[0, input_ids.shape[1] :].tolist()
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def greedy(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """The argmax next token after each left-padded row, one uncached forward (the reference)."""
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    return out.logits[:, -1].argmax(-1).tolist()


def replace_output(out: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def test_pad_left_and_positions() -> None:
    ids, mask = pad_left([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_batched_equals_unbatched_and_generate(tiny: LoadedModel) -> None:
    batched = generate(tiny, PROMPTS, max_new_tokens=12, batch_size=4)
    for text, gen in zip(PROMPTS, batched, strict=True):
        alone = generate(tiny, [text], max_new_tokens=12)[0]
        assert gen.token_ids == alone.token_ids
        assert list(gen.token_ids) == reference(tiny, text, 12)
        assert gen.prompt_ids == tuple(tiny.tokenizer(text)["input_ids"])
    assert len({g.token_ids for g in batched}) > 1  # the rows really differ


def test_stops_at_eos(tiny: LoadedModel) -> None:
    tokens = [g.token_ids for g in generate(tiny, PROMPTS, max_new_tokens=12)]
    some = next(t for t in tokens if len(t) > 1)
    forced = frozenset({some[0], EOS})  # also stop at the first generated token
    ids, mask = encode_prompts(tiny.tokenizer, PROMPTS)
    gens = generate_batch(tiny, ids, mask, max_new_tokens=12, stop=forced)
    for gen, full in zip(gens, tokens, strict=True):
        cut = next((i for i, t in enumerate(full) if t in forced), None)
        assert list(gen.token_ids) == list(full[: cut + 1] if cut is not None else full)
        assert gen.stopped == (cut is not None)
    assert stop_ids(tiny) == frozenset({EOS})


def test_hooks_see_every_step(tiny: LoadedModel) -> None:
    lengths: list[int] = []
    handle = tiny.layers[0].register_forward_hook(lambda _m, _i, out: lengths.append(block_output(out).shape[1]))
    try:
        ids, mask = encode_prompts(tiny.tokenizer, PROMPTS[:2])
        gens = generate_batch(tiny, ids, mask, max_new_tokens=5, stop=frozenset())
    finally:
        handle.remove()
    assert all(len(g.token_ids) == 5 for g in gens)
    assert lengths == [ids.shape[1], 1, 1, 1, 1]  # the last token needs no forward pass


def test_hook_edit_acts_on_cached_steps(tiny: LoadedModel) -> None:
    """An edit applied on every pass gives the same tokens as the uncached reference loop."""

    def hook(_m: Any, _i: Any, out: Any) -> Any:
        return replace_output(out, block_output(out) * 0.5)

    handle = tiny.layers[0].register_forward_hook(hook)
    try:
        gens = generate(tiny, PROMPTS, max_new_tokens=8)
        for text, gen in zip(PROMPTS, gens, strict=True):
            ids, mask = encode_prompts(tiny.tokenizer, [text])
            expected: list[int] = []
            for _ in range(len(gen.token_ids)):  # no cache: the hook sees whole sequences
                expected.append(greedy(tiny, ids, mask)[0])
                ids = torch.cat([ids, torch.tensor([[expected[-1]]])], dim=1)
                mask = torch.ones_like(ids)
            assert list(gen.token_ids) == expected
    finally:
        handle.remove()


def test_answer_inputs_predict_the_generated_token(tiny: LoadedModel) -> None:
    gens = generate(tiny, PROMPTS, max_new_tokens=6)
    steps = [min(2, len(g.token_ids) - 1) for g in gens]
    ids, mask = answer_inputs(tiny.tokenizer, gens, steps)
    assert greedy(tiny, ids, mask) == [g.token_ids[s] for g, s in zip(gens, steps, strict=True)]


def test_answer_step() -> None:
    gen = Generation(prompt_ids=(1, 65), token_ids=(66, ord("["), 67, EOS), text="B[C", stopped=True)
    tok = CharTokenizer()
    assert answer_step(tok, gen, "[") == 1
    assert answer_step(tok, gen, None) == 0
    assert answer_step(tok, gen, "#") == 0
    assert gen.prefix(1) == (1, 65, 66)
