"""Shared fixtures: a tiny random 2-layer Llama and random SAEs (CPU, seeded)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gradsae.models import LoadedModel
from gradsae.sae import SAE, SAEConfig

D_MODEL = 16
VOCAB = 64
PAD, BOS, EOS = 0, 1, 2


class CharTokenizer:
    """One token per printable ASCII character; ids 0-2 are pad, BOS and EOS."""

    pad_token, bos_token, eos_token, unk_token = "<pad>", "<s>", "</s>", None
    pad_token_id, bos_token_id, eos_token_id, unk_token_id = PAD, BOS, EOS, None
    chat_template = None
    padding_side = "left"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) for c in text if 32 <= ord(c) < 127]
        return {"input_ids": ([BOS] if add_special_tokens else []) + ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        special = {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}
        parts = [chr(i) if i >= 32 else ("" if skip_special_tokens else special.get(i, "?")) for i in ids]
        return "".join(parts)

    def get_vocab(self) -> dict[str, int]:
        return {"<pad>": PAD, "<s>": BOS, "</s>": EOS} | {chr(i): i for i in range(32, 127)}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run tests that load the real embedded model")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="real-model test: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def tiny_lm(
    dtype: torch.dtype = torch.float32, seed: int = 0, *, vocab: int = VOCAB, tokenizer: Any = None
) -> LoadedModel:
    """A 2-layer Llama with random weights, frozen."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=D_MODEL,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.requires_grad_(False)
    if dtype == torch.float64:
        _rmsnorm_in_float64(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name="tiny-llama")


def _rmsnorm_in_float64(model: torch.nn.Module) -> None:
    """Llama's RMSNorm computes in float32 whatever the model dtype; keep float64 for exact checks."""

    def forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = forward.__get__(module)


def tiny_sae(
    activation: str = "relu", *, d_sae: int = 48, seed: int = 0, dtype: torch.dtype = torch.float32, layer: int = 0
) -> SAE:
    """A random SAE on the tiny model's residual; about half the latents fire per token."""
    k = 6 if activation == "topk" else None
    sae = SAE.random(SAEConfig(d_in=D_MODEL, d_sae=d_sae, activation=activation, k=k, hook_layer=layer), seed=seed)
    with torch.no_grad():
        if activation == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=torch.Generator().manual_seed(seed)) * 0.3)
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return sae.to(dtype)


@pytest.fixture
def lm() -> LoadedModel:
    return tiny_lm()


@pytest.fixture
def lm64() -> LoadedModel:
    return tiny_lm(torch.float64)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded rows: lengths 10 and 7."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 10), generator=gen)
    mask = torch.ones(2, 10, dtype=torch.long)
    ids[1, :3] = 0
    mask[1, :3] = 0
    return ids, mask
