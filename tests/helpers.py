"""The one tiny model and the one tokenizer every test uses (CPU, seeded).

* :class:`CharTokenizer`: one token per printable ASCII character (id = ``ord``),
  ids 0-2 are pad, BOS and EOS; vocabulary 128.
* :func:`tiny_lm`: a small random Llama (default 2 layers, d_model 16), frozen.
* :func:`tiny_sae`: a random SAE on that residual stream; about half the latents fire.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gradsae.models import LoadedModel
from gradsae.sae import SAE, SAEConfig

D_MODEL = 16
VOCAB = 64
CHAR_VOCAB = 128
PAD, BOS, EOS = 0, 1, 2


class CharTokenizer:
    """One token per printable ASCII character; ids 0-2 are pad, BOS and EOS."""

    pad_token, bos_token, eos_token, unk_token = "<pad>", "<s>", "</s>", None
    pad_token_id, bos_token_id, eos_token_id, unk_token_id = PAD, BOS, EOS, None
    chat_template = None
    padding_side = "left"

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, **_: Any) -> dict[str, Any]:
        if isinstance(text, list):
            return {"input_ids": [self(t, add_special_tokens)["input_ids"] for t in text]}
        ids = [ord(c) for c in text if 32 <= ord(c) < 127]
        return {"input_ids": ([BOS] if add_special_tokens else []) + ids}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens)["input_ids"]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        special = {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}
        parts = [chr(i) if i >= 32 else ("" if skip_special_tokens else special.get(i, "?")) for i in ids]
        return "".join(parts)

    def get_vocab(self) -> dict[str, int]:
        return {"<pad>": PAD, "<s>": BOS, "</s>": EOS} | {chr(i): i for i in range(32, 127)}


def tiny_lm(
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    *,
    vocab: int = VOCAB,
    tokenizer: Any = None,
    hidden: int = D_MODEL,
    intermediate: int = 32,
    heads: int = 2,
    kv_heads: int = 2,
    layers: int = 2,
    max_positions: int = 64,
    init_range: float = 0.02,
) -> LoadedModel:
    """A random Llama, frozen; ``tokenizer=CharTokenizer()`` needs ``vocab >= 128``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=init_range,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.requires_grad_(False)
    if dtype == torch.float64:
        _rmsnorm_in_float64(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name="tiny-llama")


def char_lm(seed: int = 0, **kwargs: Any) -> LoadedModel:
    """:func:`tiny_lm` with the :class:`CharTokenizer` (vocabulary 128)."""
    return tiny_lm(seed=seed, vocab=CHAR_VOCAB, tokenizer=CharTokenizer(), **kwargs)


def _rmsnorm_in_float64(model: torch.nn.Module) -> None:
    """Llama's RMSNorm computes in float32 whatever the model dtype; keep float64 for exact checks."""

    def forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = forward.__get__(module)


def tiny_sae(
    activation: str = "relu",
    *,
    d_sae: int = 48,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    layer: int = 0,
    d_in: int = D_MODEL,
) -> SAE:
    """A random SAE on the tiny model's residual; about half the latents fire per token."""
    k = 6 if activation == "topk" else None
    sae = SAE.random(SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, k=k, hook_layer=layer), seed=seed)
    with torch.no_grad():
        if activation == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=torch.Generator().manual_seed(seed)) * 0.3)
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return sae.to(dtype)


def padded_batch(vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded rows ``[2, 10]``: lengths 10 and 7."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 10), generator=gen)
    mask = torch.ones(2, 10, dtype=torch.long)
    ids[1, :3] = 0
    mask[1, :3] = 0
    return ids, mask


def save_tiny_hf(folder: Any, *, seed: int = 0, layers: int = 2, hidden: int = D_MODEL) -> Any:
    """A tiny random Llama and a real byte-level tokenizer saved as a Hugging Face folder (for the CLI)."""
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS} | {ch: i + 3 for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    lm = tiny_lm(seed=seed, vocab=len(vocab), hidden=hidden, layers=layers, max_positions=256, init_range=0.5)
    lm.model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
