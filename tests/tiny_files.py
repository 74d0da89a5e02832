"""A tiny random model, tokenizer, SAE and task saved as real files, for commands run in a subprocess.

:func:`tiny_run_files` writes to a folder::

    model/     a random Llama (2 layers, d_model 16) + a WordLevel tokenizer (PreTrainedTokenizerFast)
    sae/       a random TopK SAE at layer 0 (SAELens layout)
    task.jsonl eight prompts; half are answered with what the model says (kept), half are not
    corpus.txt a few paragraphs for ``train-sae``

so ``gradsae reproduce --model DIR/model --sae DIR/sae --task DIR/task.jsonl`` runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gradsae.sae_formats import save_sae
from tests.helpers import tiny_sae

WORDS = [f"w{i}" for i in range(60)]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
PROMPTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10", "w11 w12", "w13 w14 w15", "w16 w17", "w18 w19 w20"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer: one token per whitespace-separated word, BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    """A random Llama over the tokenizer's vocabulary, with large enough weights to vary its answers."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_run_files(folder: Path, *, max_new_tokens: int = 3) -> Path:
    """Write model/, sae/, task.jsonl and corpus.txt under ``folder``; return ``folder``."""
    from gradsae.generate import encode_prompts, generate_batch
    from gradsae.models import load_model

    tiny_model().save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "model")
    save_sae(tiny_sae("topk", d_sae=48, seed=2, layer=0), folder / "sae")
    lm = load_model(folder / "model")
    ids, mask = encode_prompts(lm.tokenizer, PROMPTS)
    said = [g.text for g in generate_batch(lm, ids, mask, max_new_tokens=max_new_tokens)]
    rows = [
        {
            "id": f"q{i}",
            "prompt": prompt,
            "answer": text.strip().splitlines()[0] if i % 2 == 0 else "never said",
            "group": f"g{i // 4}",
        }
        for i, (prompt, text) in enumerate(zip(PROMPTS, said, strict=True))
    ]
    (folder / "task.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    paragraphs = [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(40)) for i in range(12)]
    (folder / "corpus.txt").write_text("\n\n".join(paragraphs) + "\n")
    return folder
