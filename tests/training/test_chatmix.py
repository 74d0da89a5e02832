"""The chatmix corpus: framed sequences, the exact mixing share, resumable blocks, its sources and replies."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gradsae.errors import GradSAEError
from gradsae.training import chatmix
from gradsae.training.activations import (
    Mixture,
    StreamConfig,
    activation_blocks,
    framed_sequences,
    mixed_sequences,
)
from gradsae.training.loop import train_saes
from tests.helpers import BOS, CharTokenizer, char_lm
from tests.training.test_train import tiny_cfg

NEWS = [f"news story {i}: " + "the council met and voted " * 3 for i in range(30)]
CHATS = [f"#{chr(65 + i)} user asks; bot says {i}." for i in range(12)]
STARTS = {ord(c[1]) for c in CHATS}


def test_framed_sequences_open_at_a_document_and_fill_the_context() -> None:
    stream = framed_sequences(CharTokenizer(), CHATS, context=40, seed=1)
    rows = [next(stream) for _ in range(30)]
    assert all(len(row) == 40 and row[0] == ord("#") and row[1] in STARTS for row in rows)
    firsts = [chr(row[1]) for row in rows[:12]]
    assert sorted(firsts) == sorted(c[1] for c in CHATS), "each epoch opens a sequence at every document once"
    again = framed_sequences(CharTokenizer(), CHATS, context=40, seed=1)
    assert [next(again) for _ in range(30)] == rows


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 1.0])
def test_mixed_sequences_follow_the_share_exactly(share: float) -> None:
    mix = Mixture(texts=tuple(NEWS), framed=tuple(CHATS), framed_share=share)
    stream = mixed_sequences(CharTokenizer(), mix, context=24, seed=0)
    rows = [next(stream) for _ in range(40)]
    framed = [row[0] == ord("#") for row in rows]
    assert sum(framed) == round(40 * share)
    assert all(row[0] == BOS for row, f in zip(rows, framed, strict=True) if not f)
    assert all(len(row) == 24 for row in rows)


def test_mixture_share_is_checked() -> None:
    with pytest.raises(GradSAEError, match="framed share"):
        Mixture(texts=(), framed=(), framed_share=1.5)


def test_mixture_blocks_restart_exactly() -> None:
    lm = char_lm(hidden=32, intermediate=64, heads=4, kv_heads=2)
    mix = Mixture(texts=tuple(NEWS), framed=tuple(CHATS), framed_share=0.5)
    cfg = StreamConfig(context=24, batch=4, buffer=8, seed=5)
    blocks = activation_blocks(lm, mix, [0, 1], cfg)
    first, second = next(blocks), next(blocks)
    resumed = next(activation_blocks(lm, mix, [0, 1], cfg, start=1))
    assert resumed.index == 1 and all(torch.equal(resumed.acts[k], second.acts[k]) for k in (0, 1))
    assert not torch.equal(first.acts[0], second.acts[0])
    assert first.n_tokens == 8 * 23, "position 0 of every sequence, framed or packed, is skipped"


def test_training_on_a_mixture_runs_and_resumes_identically(tmp_path) -> None:
    lm = char_lm(hidden=32, intermediate=64, heads=4, kv_heads=2)
    mix = Mixture(texts=tuple(NEWS), framed=tuple(CHATS), framed_share=0.5)
    cfg = dataclasses.replace(tiny_cfg(), tokens=1200)
    whole = train_saes(lm, mix, cfg, progress=False)
    calls = {"n": 0}

    def stop_soon() -> bool:
        calls["n"] += 1
        return calls["n"] == 9

    path = tmp_path / "checkpoint.pt"
    assert not train_saes(lm, mix, cfg, checkpoint=path, should_stop=stop_soon, progress=False).finished
    resumed = train_saes(lm, mix, cfg, checkpoint=path, progress=False)
    for name, value in whole.saes[0].state_dict().items():
        assert torch.equal(value, resumed.saes[0].state_dict()[name]), name


def test_user_turns_leave_out_the_evaluated_sets_and_hold_out_rows() -> None:
    banned = ("92_glue_sst2", "97_news_class", "113_movie_sent", "161_agnews_0", "162_agnews_1", "163_agnews_2")
    assert not set(banned) & set(chatmix.SOURCES)
    train = chatmix.user_turns(per_source=5, seed=0)
    held = chatmix.user_turns(per_source=5, seed=0, heldout=True)
    assert len(train) == len(held) == 5 * len(chatmix.SOURCES)
    assert all(t.row % chatmix.HELDOUT_EVERY for t in train)
    assert all(t.row % chatmix.HELDOUT_EVERY == 0 for t in held)
    assert train == chatmix.user_turns(per_source=5, seed=0)
    assert max(len(t.text) for t in train) < chatmix.MAX_CHARS + 200


def _chat_lm():
    lm = char_lm(hidden=32, intermediate=64, heads=4, kv_heads=2)
    tok = CharTokenizer()
    tok.chat_template = "x"  # type: ignore[assignment]
    tok.apply_chat_template = lambda messages, **_: f"#U {messages[0]['content']} #A "  # type: ignore[attr-defined]
    return dataclasses.replace(lm, tokenizer=tok)


def test_conversations_append_the_models_reply_and_reuse_the_cache(tmp_path, monkeypatch) -> None:
    lm = _chat_lm()
    turns = chatmix.user_turns(per_source=1, seed=0)[:3]
    cache = tmp_path / "replies.json"
    convs = chatmix.conversations(lm, turns, cache=cache, batch_size=2)
    from gradsae.generate import generate

    replies = [g.text for g in generate(lm, [f"#U {t.text} #A " for t in turns], max_new_tokens=chatmix.REPLY_TOKENS)]
    for conv, turn, reply in zip(convs, turns, replies, strict=True):
        assert conv == f"#U {turn.text} #A " + reply.split("</s>")[0].rstrip() + "</s>\n"
    import gradsae.generate

    monkeypatch.setattr(chatmix, "CACHE_EVERY", 2)
    cut = tmp_path / "cut.json"
    real = gradsae.generate.generate
    chatmix.conversations(lm, turns[:2], cache=cut)
    import json

    saved = json.loads(cut.read_text())
    whole_key = json.loads(cache.read_text())["key"]
    cut.write_text(json.dumps({"key": whole_key, "replies": saved["replies"]}))  # as if cut after 2 of 3
    asked = []
    monkeypatch.setattr(gradsae.generate, "generate", lambda lm_, p, **k: asked.append(len(p)) or real(lm_, p, **k))
    assert chatmix.conversations(lm, turns, cache=cut) == convs
    assert asked == [1], "a resumed cache generates only the missing replies"
    monkeypatch.setattr(gradsae.generate, "generate", lambda *a, **k: pytest.fail("the cache was not used"))
    assert chatmix.conversations(lm, turns, cache=cache) == convs


def test_conversations_need_a_chat_template() -> None:
    lm = char_lm(hidden=32, intermediate=64, heads=4, kv_heads=2)
    with pytest.raises(GradSAEError, match="chat template"):
        chatmix.conversations(lm, chatmix.user_turns(per_source=1)[:1])
