"""The training run: stream activation blocks, step every layer's trainer, checkpoint, resume.

Checkpoints (``<out>/checkpoint.pt``) hold the SAEs, Adam states, dead-latent
counters and the stream position (block, step within block). Ctrl-C finishes
the current step, writes a checkpoint and exits; the same command resumes and
ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gradsae import _files
from gradsae.errors import GradSAEError
from gradsae.models import LoadedModel
from gradsae.sae import SAE
from gradsae.training.activations import Block, Corpus, activation_blocks
from gradsae.training.trainer import LayerTrainer, StepOut, TrainConfig, geometric_median

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
#: Options that must match when a run resumes (``tokens`` and ``lr`` may change).
RESUME_KEYS = ("layers", "width", "k", "seed", "context", "buffer", "batch", "sae_batch", "model_name")


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
    texts: Corpus,
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
        keep = _keeper(path, state, cfg)
        for block in _until_done(blocks, state, cfg):
            stopped = _train_block(block, state, cfg, bar, should_stop, keep=keep)
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


def _train_block(
    block: Block,
    state: TrainState,
    cfg: TrainConfig,
    bar: Any,
    should_stop: Callable[[], bool],
    keep: Callable[[int], None] = lambda _before: None,
) -> bool:
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
        keep(state.tokens - n)
        bar.update(n)
        bar.set_postfix_str(_postfix(state.last), refresh=False)
        if should_stop():
            return True
    return False


def _keeper(path: Path | None, state: TrainState, cfg: TrainConfig) -> Callable[[int], None]:
    """After a step that began at ``before`` tokens: keep a copy of the state if it passed a kept count."""

    def keep(before: int) -> None:
        if path is not None and any(before < mark <= state.tokens for mark in cfg.keep_checkpoints):
            save_checkpoint(kept_checkpoint(path, state.tokens), state, cfg)

    return keep


def kept_checkpoint(path: Path, tokens: int) -> Path:
    """Where the state at ``tokens`` tokens is kept, next to the running checkpoint ``path``."""
    return path.with_name(f"{path.stem}-{tokens}{path.suffix}")


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
    with _files.atomic_path(path) as tmp:
        torch.save(data, tmp)
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
