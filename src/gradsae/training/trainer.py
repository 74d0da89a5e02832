"""Train TopK SAEs on the residual stream of several layers in one pass.

For a batch of token states ``x`` (``[batch, d_model]``) and each layer's SAE
(Gao et al. 2024, "Scaling and evaluating sparse autoencoders"; EleutherAI sparsify)::

    pre   = relu((x - b_dec) @ W_enc + b_enc)                        [batch, d_sae]
    h     = TopK_k(pre)            (the k largest, the rest zero)
    x^    = h @ W_dec + b_dec                                        [batch, d_model]
    e     = x - x^
    FVU   = sum ||e||^2 / sum ||x - mean(x)||^2
    AuxK  = sum ||e - TopK_kaux(pre restricted to dead latents) @ W_dec||^2 / sum ||x - mean(x)||^2
    loss  = FVU + aux_coef * min(n_dead / k_aux, 1) * AuxK

A latent is *dead* once it has not fired for ``dead_tokens`` tokens; AuxK makes
the dead latents model the main reconstruction's error, which pulls them back.

Practice: ``W_dec`` rows start random at unit norm, ``W_enc = W_dec^T``,
``b_enc = 0``, ``b_dec`` = geometric median of the first block. Before each Adam
step the gradient of each decoder row loses its component along the row; after
it the rows are renormalised to unit norm. The learning rate warms up linearly
over ``warmup_tokens`` and decays linearly to zero over the last
``decay_fraction`` of the run (a schedule in tokens, so a run may be lengthened
on resume). Default ``lr = 2e-4 / sqrt(d_sae / 2**14)`` (Gao et al.'s scaling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from gradsae.errors import GradSAEError
from gradsae.sae import SAE, SAEConfig
from gradsae.training.activations import StreamConfig


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how."""

    layers: tuple[int, ...]
    """Layers whose residual stream (after the block) the SAEs read."""
    width: int = 4608
    """Latents per SAE (``d_sae``)."""
    k: int = 32
    """Active latents per token."""
    tokens: int = 2_000_000
    """Training tokens per SAE (BOS excluded)."""
    lr: float | None = None
    """Adam learning rate; default ``2e-4 / sqrt(width / 2**14)``."""
    sae_batch: int = 1024
    """Tokens per optimiser step."""
    warmup_tokens: int = 100_000
    """Linear warm-up length."""
    decay_fraction: float = 0.2
    """Final share of the run over which the learning rate falls linearly to 0."""
    aux_k: int | None = None
    """Dead latents used by AuxK; default ``d_model // 2``."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int = 50_000
    """A latent silent for this many tokens counts as dead."""
    seed: int = 0
    """Seeds the SAE initialisation, the document order and the shuffles."""
    context: int = 128
    """Tokens per sequence, BOS included."""
    batch: int = 16
    """Sequences per model forward pass."""
    buffer: int = 256
    """Sequences per shuffled block of activations."""
    model_name: str = ""
    """Model the SAEs are trained on (recorded in their config)."""
    corpus: str = "news"
    """Where the text came from (recorded in the SAEs' metadata)."""
    checkpoint_seconds: float = 300.0
    """Write a checkpoint at the first block boundary this long after the last."""
    keep_checkpoints: tuple[int, ...] = ()
    """Also keep the state at the first step that reaches each of these token counts, as
    ``checkpoint-<tokens>.pt``; resuming a copy with a smaller ``--tokens`` branches off that run's
    learning-rate decay (a shorter run's schedule is the same up to 80% of its tokens)."""

    def __post_init__(self) -> None:
        if not self.layers:
            raise GradSAEError("pass at least one layer with --layers")
        if not 0 < self.k <= self.width:
            raise GradSAEError(
                f"need 0 < --k <= --width, got k={self.k}, width={self.width}: lower --k or raise --width"
            )
        if self.tokens <= 0 or self.sae_batch <= 0:
            raise GradSAEError(
                f"--tokens and --sae-batch must be positive, got {self.tokens} and {self.sae_batch}: "
                "pass e.g. --tokens 2M --sae-batch 1024"
            )

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.width / 2**14)

    @property
    def stream(self) -> StreamConfig:
        return StreamConfig(context=self.context, batch=self.batch, buffer=self.buffer, seed=self.seed)

    def lr_at(self, tokens: int) -> float:
        """Learning rate for the step that starts after ``tokens`` tokens."""
        warm = min(1.0, (tokens + 1) / max(self.warmup_tokens, 1))
        decay = min(1.0, (self.tokens - tokens) / max(self.decay_fraction * self.tokens, 1))
        return self.learning_rate * warm * max(decay, 0.0)


class StepOut(NamedTuple):
    """Loss and statistics of one training batch for one SAE."""

    loss: torch.Tensor
    """``FVU + aux_coef * scale * AuxK``, to back-propagate."""
    fvu: float
    """Fraction of the batch's variance left unexplained."""
    l0: float
    """Mean active latents per token."""
    dead: float
    """Share of latents counted dead before this batch."""
    fired: torch.Tensor
    """``[d_sae]`` bool: latents active on some token of the batch."""


@dataclass
class LayerTrainer:
    """One SAE with its optimiser and dead-latent counter (live, mutable state)."""

    sae: SAE
    opt: torch.optim.Adam
    since_fired: torch.Tensor
    """``[d_sae]`` tokens since each latent last fired."""
    aux_k: int

    @classmethod
    def create(cls, cfg: TrainConfig, layer: int, d_model: int) -> LayerTrainer:
        sae_cfg = SAEConfig(
            d_in=d_model,
            d_sae=cfg.width,
            activation="topk",
            k=cfg.k,
            hook_layer=layer,
            model_name=cfg.model_name,
            apply_b_dec_to_input=True,
        )
        sae = SAE.random(sae_cfg, seed=cfg.seed * 1000 + layer)
        with torch.no_grad():
            sae.b_enc.zero_()
        opt = torch.optim.Adam(sae.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)
        aux_k = cfg.aux_k if cfg.aux_k is not None else d_model // 2
        return cls(sae=sae, opt=opt, since_fired=torch.zeros(cfg.width, dtype=torch.long), aux_k=aux_k)

    def step(self, x: torch.Tensor, *, lr: float, cfg: TrainConfig) -> StepOut:
        """One Adam step on ``x`` (``[batch, d_model]``)."""
        out = sae_loss(self.sae, x, dead=self.since_fired > cfg.dead_tokens, aux_k=self.aux_k, aux_coef=cfg.aux_coef)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        project_decoder_grad(self.sae)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        normalise_decoder(self.sae)
        return out

    def record_firing(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Advance the dead-latent counter by a step of ``n_tokens`` with ``fired`` latents."""
        self.since_fired += n_tokens
        self.since_fired[fired] = 0

    def state_dict(self) -> dict[str, Any]:
        return {"sae": self.sae.state_dict(), "opt": self.opt.state_dict(), "since_fired": self.since_fired}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.since_fired = state["since_fired"].clone()


# -- maths ------------------------------------------------------------------------
class _GatherPre(torch.autograd.Function):
    """``pre[i, indices[i, j]]`` for ``pre = x @ W_enc + c``, with a sparse backward.

    Forward reuses the dense ``pre`` already computed for the top-k choice; the
    backward touches only the chosen latents: ``dW_enc[:, s] = sum_i x_i g_is``
    as a sparse-dense product, ``dc[s] = sum_i g_is``.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, W_enc: torch.Tensor, c: torch.Tensor, pre: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(x, indices)
        ctx.d_sae = W_enc.shape[1]
        return pre.gather(1, indices)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, indices = ctx.saved_tensors
        batch, m = indices.shape
        rows = torch.arange(batch, device=x.device).repeat_interleave(m)
        coded = torch.sparse_coo_tensor(
            torch.stack([indices.flatten(), rows]), grad.flatten(), (ctx.d_sae, batch), check_invariants=False
        )
        grad_w = torch.sparse.mm(coded, x).T
        grad_c = torch.zeros(ctx.d_sae, dtype=grad.dtype, device=grad.device).index_add_(
            0, indices.flatten(), grad.flatten()
        )
        return None, grad_w, grad_c, None, None


def encoder_bias(sae: SAE) -> torch.Tensor:
    """``c = b_enc - b_dec @ W_enc`` so that ``pre = x @ W_enc + c`` (``[d_sae]``)."""
    if sae.cfg.apply_b_dec_to_input:
        return sae.b_enc - sae.b_dec @ sae.W_enc
    return sae.b_enc


def topk_encode(sae: SAE, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pre [batch, d_sae] detached, values [batch, k], indices [batch, k])`` of the TopK encoder."""
    c = encoder_bias(sae)
    with torch.no_grad():
        pre = torch.addmm(c.detach(), x, sae.W_enc.detach())
    indices = pre.topk(k, dim=-1, sorted=False).indices
    values = torch.relu(_GatherPre.apply(x, sae.W_enc, c, pre, indices))
    return pre, values, indices


def sparse_decode(W_dec: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``sum_j values[:, j] * W_dec[indices[:, j]]`` (``[batch, d_model]``), without a dense ``h``."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")


def sae_loss(sae: SAE, x: torch.Tensor, *, dead: torch.Tensor, aux_k: int, aux_coef: float) -> StepOut:
    """FVU + weighted AuxK loss (module docstring) with batch statistics."""
    k = sae.cfg.k
    assert k is not None
    pre, values, indices = topk_encode(sae, x, k)
    error = x - (sparse_decode(sae.W_dec, values, indices) + sae.b_dec)
    total_var = (x - x.mean(0)).pow(2).sum()
    fvu = error.pow(2).sum() / total_var
    loss = fvu
    n_dead = int(dead.sum())
    if n_dead and aux_coef:
        k_aux = min(aux_k, n_dead)
        dead_latents = dead.nonzero().squeeze(1)
        aux_indices = dead_latents[pre[:, dead_latents].topk(k_aux, dim=-1, sorted=False).indices]
        aux_values = torch.relu(_GatherPre.apply(x, sae.W_enc, encoder_bias(sae), pre, aux_indices))
        error_hat = sparse_decode(sae.W_dec, aux_values, aux_indices)
        aux = (error.detach() - error_hat).pow(2).sum() / total_var
        loss = fvu + aux_coef * min(n_dead / aux_k, 1.0) * aux
    active = values.detach() > 0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    fired[indices[active]] = True
    l0 = float(active.sum(-1).float().mean())
    return StepOut(loss=loss, fvu=float(fvu.detach()), l0=l0, dead=n_dead / dead.numel(), fired=fired)


def project_decoder_grad(sae: SAE) -> None:
    """Remove from each decoder row's gradient its component along the (unit) row."""
    grad = sae.W_dec.grad
    if grad is not None:
        w = sae.W_dec.detach()
        grad -= (grad * w).sum(-1, keepdim=True) * w


def normalise_decoder(sae: SAE) -> None:
    """Rescale each decoder row to unit norm."""
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-8))


def geometric_median(x: torch.Tensor, *, iters: int = 30, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's iteration for ``argmin_m sum_i ||x_i - m||`` (``x``: ``[n, d]``)."""
    median = x.mean(0)
    for _ in range(iters):
        weights = 1.0 / (x - median).norm(dim=-1).clamp(min=eps)
        median = (weights[:, None] * x).sum(0) / weights.sum()
    return median
