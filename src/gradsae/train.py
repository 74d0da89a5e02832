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

Checkpoints (``<out>/checkpoint.pt``) hold the SAEs, Adam states, dead-latent
counters and the stream position (block, step within block). Ctrl-C finishes
the current step, writes a checkpoint and exits; the same command resumes and
ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gradsae.activations import Block, StreamConfig, activation_blocks, load_texts, split_heldout
from gradsae.errors import GradSAEError
from gradsae.models import LoadedModel
from gradsae.sae import SAE, SAEConfig

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
#: Options that must match when a run resumes (``tokens`` and ``lr`` may change).
RESUME_KEYS = ("layers", "width", "k", "seed", "context", "buffer", "batch", "sae_batch", "model_name")


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

    def __post_init__(self) -> None:
        if not self.layers:
            raise GradSAEError("pass at least one layer with --layers")
        if not 0 < self.k <= self.width:
            raise GradSAEError(f"need 0 < --k <= --width, got k={self.k}, width={self.width}")
        if self.tokens <= 0 or self.sae_batch <= 0:
            raise GradSAEError("--tokens and --sae-batch must be positive")

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


# -- the run ------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where a run stands (live, mutable); saved in checkpoints."""

    trainers: dict[int, LayerTrainer]
    block: int = 0
    """Next block to read."""
    step_in_block: int = 0
    """Steps of that block already taken."""
    tokens: int = 0
    """Tokens seen per SAE."""
    initialised: bool = False
    """``b_dec`` set from data."""
    elapsed: float = 0.0
    """Seconds spent training, over all sessions."""
    last: dict[int, dict[str, float]] = field(default_factory=dict)
    """Latest smoothed ``fvu`` / ``l0`` / ``dead`` per layer."""


@dataclass(frozen=True)
class TrainResult:
    """What a call to :func:`train_saes` achieved."""

    saes: dict[int, SAE]
    """The SAEs, by layer (float32)."""
    tokens: int
    """Tokens seen per SAE."""
    finished: bool
    """False when the run stopped early; rerun to resume."""
    seconds: float
    """Training wall time over all sessions."""
    stats: dict[int, dict[str, float]]
    """Smoothed training ``fvu`` / ``l0`` / ``dead`` at the end, by layer."""


def train_saes(
    lm: LoadedModel,
    texts: Sequence[str],
    cfg: TrainConfig,
    *,
    checkpoint: str | Path | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    progress: bool = True,
) -> TrainResult:
    """Train one SAE per layer in ``cfg.layers`` on ``texts``, resuming from ``checkpoint``."""
    path = Path(checkpoint) if checkpoint is not None else None
    state = _load_or_create(path, cfg, lm.d_model)
    started, last_save = time.monotonic(), time.monotonic()
    bar = tqdm(
        total=cfg.tokens, initial=min(state.tokens, cfg.tokens), unit="tok", unit_scale=True, disable=not progress
    )
    stopped = False
    try:
        blocks = activation_blocks(lm, texts, cfg.layers, cfg.stream, start=state.block, should_stop=should_stop)
        for block in _until_done(blocks, state, cfg):
            stopped = _train_block(block, state, cfg, bar, should_stop)
            if stopped:
                break
            state.block, state.step_in_block = block.index + 1, 0
            if path is not None and time.monotonic() - last_save > cfg.checkpoint_seconds:
                state.elapsed += time.monotonic() - started
                started = last_save = time.monotonic()
                save_checkpoint(path, state, cfg)
        else:
            stopped = state.tokens < cfg.tokens
    finally:
        bar.close()
    state.elapsed += time.monotonic() - started
    if path is not None:
        save_checkpoint(path, state, cfg)
    saes = {layer: trainer.sae for layer, trainer in state.trainers.items()}
    return TrainResult(saes=saes, tokens=state.tokens, finished=not stopped, seconds=state.elapsed, stats=state.last)


def _until_done(blocks: Iterator[Block], state: TrainState, cfg: TrainConfig) -> Iterator[Block]:
    while state.tokens < cfg.tokens:
        block = next(blocks, None)
        if block is None:
            return
        yield block


def _train_block(block: Block, state: TrainState, cfg: TrainConfig, bar: Any, should_stop: Callable[[], bool]) -> bool:
    """Train on the remaining steps of ``block``; True when stopped early."""
    if not state.initialised:
        _init_from_data(state, block)
    starts = range(0, block.n_tokens, cfg.sae_batch)
    for step, start in enumerate(starts):
        if step < state.step_in_block:
            continue
        if state.tokens >= cfg.tokens:
            return False
        n = min(cfg.sae_batch, block.n_tokens - start, cfg.tokens - state.tokens)
        lr = cfg.lr_at(state.tokens)
        for layer, trainer in state.trainers.items():
            x = block.acts[layer][start : start + n]
            out = trainer.step(x, lr=lr, cfg=cfg)
            trainer.record_firing(out.fired, n)
            _smooth(state.last.setdefault(layer, {}), out)
        state.tokens += n
        state.step_in_block = step + 1
        bar.update(n)
        bar.set_postfix_str(_postfix(state.last), refresh=False)
        if should_stop():
            return True
    return False


def _init_from_data(state: TrainState, block: Block) -> None:
    for layer, trainer in state.trainers.items():
        with torch.no_grad():
            trainer.sae.b_dec.copy_(geometric_median(block.acts[layer][:8192]))
    state.initialised = True


def _smooth(stats: dict[str, float], out: StepOut, beta: float = 0.9) -> None:
    for key in ("fvu", "l0", "dead"):
        value = getattr(out, key)
        stats[key] = value if key not in stats else beta * stats[key] + (1 - beta) * value


def _postfix(last: dict[int, dict[str, float]]) -> str:
    return " ".join(
        f"L{layer}: fvu {s['fvu']:.3f} l0 {s['l0']:.0f} dead {100 * s['dead']:.1f}%" for layer, s in last.items()
    )


# -- checkpoints ------------------------------------------------------------------
def save_checkpoint(path: Path, state: TrainState, cfg: TrainConfig) -> None:
    """Write the run's state atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "cfg": asdict(cfg),
        "block": state.block,
        "step_in_block": state.step_in_block,
        "tokens": state.tokens,
        "initialised": state.initialised,
        "elapsed": state.elapsed,
        "last": state.last,
        "trainers": {layer: trainer.state_dict() for layer, trainer in state.trainers.items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    tmp.replace(path)
    log.info("checkpoint at %d tokens -> %s", state.tokens, path)


def _load_or_create(path: Path | None, cfg: TrainConfig, d_model: int) -> TrainState:
    trainers = {layer: LayerTrainer.create(cfg, layer, d_model) for layer in cfg.layers}
    state = TrainState(trainers=trainers)
    if path is None or not path.exists():
        return state
    data = torch.load(path, weights_only=True)
    _check_resumable(data["cfg"], cfg, path)
    for layer, trainer in trainers.items():
        trainer.load_state_dict(data["trainers"][layer])
    for key in ("block", "step_in_block", "tokens", "initialised", "elapsed", "last"):
        setattr(state, key, data[key])
    log.info("resuming %s at %d tokens (block %d, step %d)", path, state.tokens, state.block, state.step_in_block)
    return state


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    now = asdict(cfg)
    for key in RESUME_KEYS:
        if tuple_or(saved[key]) != tuple_or(now[key]):
            raise GradSAEError(
                f"{path} was written with {key}={saved[key]!r}, not {now[key]!r}: "
                "rerun with the original options or choose a new --out"
            )


def tuple_or(value: Any) -> Any:
    """Lists and tuples compare alike."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


# -- interruption -----------------------------------------------------------------
@contextmanager
def stop_on_sigint() -> Iterator[Callable[[], bool]]:
    """Yield ``should_stop``: true after the first Ctrl-C; a second Ctrl-C aborts at once."""
    flag = {"stop": False}

    def handler(_signum: int, _frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        log.warning("interrupted: finishing the step and writing a checkpoint (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: flag["stop"]
    finally:
        signal.signal(signal.SIGINT, previous)


# -- command line -----------------------------------------------------------------
def add_train_sae_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gradsae train-sae``."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    add = parser.add_argument
    add("--model", default=None, help="model name, folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    add("--layers", default="6", help="comma-separated layers, e.g. 6,15,24 (one SAE each, trained together)")
    add(
        "--corpus",
        default="news",
        help="news (embedded NewsArticles), a .txt/.jsonl/.csv/.parquet file, or a HF dataset",
    )
    add("--column", default="text", help="text column of a .jsonl/.csv/.parquet/HF corpus")
    add("--split", default="train", help="split of a Hugging Face dataset")
    add("--width", type=int, default=defaults["width"], help="latents per SAE")
    add("--k", type=int, default=defaults["k"], help="active latents per token")
    add("--tokens", type=_count, default=defaults["tokens"], help="training tokens per SAE, e.g. 2M or 500k")
    add("--out", default="runs/sae", help="output folder: layer_<l>/ per SAE, plus checkpoint.pt")
    add("--seed", type=int, default=defaults["seed"])
    add("--batch", type=int, default=defaults["batch"], help="sequences per model forward pass")
    add("--sae-batch", type=int, default=defaults["sae_batch"], help="tokens per optimiser step")
    add("--buffer", type=int, default=defaults["buffer"], help="sequences per shuffled activation block")
    add("--context", type=int, default=defaults["context"], help="tokens per sequence, BOS included")
    add("--lr", type=float, default=None, help="learning rate (default 2e-4/sqrt(width/16384))")
    add("--warmup-tokens", type=_count, default=defaults["warmup_tokens"])
    add("--dead-tokens", type=_count, default=defaults["dead_tokens"], help="silent this long = dead (AuxK target)")
    add("--aux-coef", type=float, default=defaults["aux_coef"], help="weight of the AuxK loss")
    add("--model-dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the model while training")
    add("--save-dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="dtype of the saved SAEs")
    add("--eval-tokens", type=_count, default=32_768, help="held-out tokens for evaluation (0: skip)")
    add("--eval-batch", type=int, default=16, help="sequences per forward pass in evaluation")
    add("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy small machine)")
    add("--no-progress", action="store_true", help="hide the progress bar")


def _count(text: str) -> int:
    """``2M``, ``500k``, ``1_000`` -> int."""
    text = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (use e.g. 2M, 500k, 100000)") from None


def parse_layers(text: str) -> tuple[int, ...]:
    """``"6,15,24"`` -> ``(6, 15, 24)``."""
    try:
        layers = tuple(sorted({int(part) for part in str(text).split(",") if part.strip()}))
    except ValueError:
        raise GradSAEError(f"--layers must be comma-separated integers, got {text!r}") from None
    if not layers:
        raise GradSAEError("pass at least one layer with --layers")
    return layers


def config_from_args(args: argparse.Namespace, model_name: str) -> TrainConfig:
    """The :class:`TrainConfig` an argparse namespace describes."""
    return TrainConfig(
        layers=parse_layers(args.layers),
        width=args.width,
        k=args.k,
        tokens=args.tokens,
        lr=args.lr,
        sae_batch=args.sae_batch,
        warmup_tokens=args.warmup_tokens,
        aux_coef=args.aux_coef,
        dead_tokens=args.dead_tokens,
        seed=args.seed,
        context=args.context,
        batch=args.batch,
        buffer=args.buffer,
        model_name=model_name,
        corpus=str(args.corpus),
    )


def train_sae_command(args: argparse.Namespace) -> int:
    """``gradsae train-sae``: train (or resume), then evaluate and save each SAE."""
    from gradsae.evaluate_sae import finish_run
    from gradsae.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    model_name = sae_model_name(args.model)
    cfg = config_from_args(args, model_name)
    for layer in cfg.layers:
        if not 0 <= layer < lm.n_layers:
            raise GradSAEError(f"layer {layer} is out of range: this model has layers 0..{lm.n_layers - 1}")
    train_texts, heldout = split_heldout(load_texts(args.corpus, column=args.column, split=args.split))
    out = Path(args.out)
    if args.model_dtype != "float32":
        lm.model.to(getattr(torch, args.model_dtype))
    with stop_on_sigint() as should_stop:
        result = train_saes(
            lm, train_texts, cfg, checkpoint=out / CHECKPOINT, should_stop=should_stop, progress=not args.no_progress
        )
    if not result.finished:
        log.warning("stopped at %d of %d tokens; rerun the same command to resume", result.tokens, cfg.tokens)
        return 130
    if args.model_dtype != "float32":
        lm = load_model(args.model)  # evaluate the model as users run it, not the rounded copy
    finish_run(
        lm,
        result,
        cfg,
        heldout,
        out=out,
        save_dtype=getattr(torch, args.save_dtype),
        eval_tokens=args.eval_tokens,
        eval_batch=args.eval_batch,
    )
    return 0


def sae_model_name(name: str | None) -> str:
    """The name recorded in the SAEs' config."""
    from gradsae.models import DEFAULT_NAMES

    return "SmolLM2-135M-Instruct" if name in DEFAULT_NAMES else str(name)


def with_metadata(sae: SAE, **metadata: Any) -> SAE:
    """The same SAE with ``metadata`` merged into its config."""
    sae.cfg = replace(sae.cfg, metadata={**sae.cfg.metadata, **metadata})
    return sae
