"""Evaluate SAEs on held-out text and write them out with their figures.

On held-out sequences ``[BOS, t_1, ..., t_{P-1}]``, at positions ``1..P-1`` (BOS
is never encoded, replaced nor ablated) with residual ``x`` after layer ``l``:

* ``FVU = sum ||x - x^||^2 / sum ||x - mean(x)||^2`` (mean over the held-out tokens);
* ``L0`` = mean number of active latents per token;
* ``dead`` = share of latents never active on the held-out tokens;
* ``CE`` = mean next-token cross-entropy over targets ``t_2..t_{P-1}`` (the
  predictions the replaced positions can change) with the residual after layer
  ``l`` left alone (``CE_clean``), replaced by ``x^`` (``CE_sae``), or set to 0
  (``CE_zero``); ``CE recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gradsae import _files
from gradsae.models import LoadedModel, block_output, residuals, with_block_output
from gradsae.sae import SAE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    """Held-out figures of one SAE."""

    layer: int
    """Layer whose residual the SAE reads."""
    tokens: int
    """Held-out tokens evaluated (BOS excluded)."""
    fvu: float
    """Fraction of variance unexplained."""
    l0: float
    """Mean active latents per token."""
    dead_fraction: float
    """Share of latents never active on the held-out tokens."""
    ce_clean: float
    """Cross-entropy of the unmodified model (nats/token)."""
    ce_sae: float
    """Cross-entropy with the residual replaced by the reconstruction."""
    ce_zero: float
    """Cross-entropy with the residual zero-ablated."""
    ce_recovered: float
    """``(ce_zero - ce_sae) / (ce_zero - ce_clean)``."""

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        _files.write_json(path, asdict(self), sort_keys=False)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        return cls(**_files.read_json(path))


@dataclass
class _Stats:
    """Running sums for FVU, L0 and dead latents of one SAE."""

    d_sae: int
    n: int = 0
    err: float = 0.0
    sq: float = 0.0
    l0: float = 0.0
    total: torch.Tensor | None = None
    fired: torch.Tensor | None = None

    def add(self, sae: SAE, x: torch.Tensor) -> None:
        """Accumulate ``x`` (``[n, d_model]``)."""
        h = sae.encode(x)
        self.err += float((x - sae.decode(h)).double().pow(2).sum())
        self.sq += float(x.double().pow(2).sum())
        total = x.double().sum(0)
        self.total = total if self.total is None else self.total + total
        active = h > 0
        fired = active.any(0)
        self.fired = fired if self.fired is None else self.fired | fired
        self.l0 += float(active.sum())
        self.n += x.shape[0]

    def fvu(self) -> float:
        assert self.total is not None
        variance = self.sq - float(self.total.pow(2).sum()) / self.n
        return self.err / variance


def evaluate_saes(
    lm: LoadedModel, saes: dict[int, SAE], ids: torch.Tensor, *, batch: int = 16
) -> dict[int, EvalResult]:
    """Held-out figures of each SAE (by layer) on ``ids`` (``[n, pos]``, BOS first)."""
    stats = _reconstruction_stats(lm, saes, ids, batch)
    clean = cross_entropy(lm, ids, batch=batch)
    results = {}
    for layer, sae in saes.items():
        with patch_residual(lm, layer, torch.zeros_like):
            zero = cross_entropy(lm, ids, batch=batch)
        with patch_residual(lm, layer, _reconstruct(sae)):
            spliced = cross_entropy(lm, ids, batch=batch)
        s = stats[layer]
        assert s.fired is not None
        results[layer] = EvalResult(
            layer=layer,
            tokens=s.n,
            fvu=s.fvu(),
            l0=s.l0 / s.n,
            dead_fraction=1.0 - float(s.fired.float().mean()),
            ce_clean=clean,
            ce_sae=spliced,
            ce_zero=zero,
            ce_recovered=(zero - spliced) / (zero - clean),
        )
        log.info("layer %d: %s", layer, results[layer])
    return results


def _reconstruct(sae: SAE) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return sae(x.float()).to(x.dtype)

    return fn


def _reconstruction_stats(lm: LoadedModel, saes: dict[int, SAE], ids: torch.Tensor, batch: int) -> dict[int, _Stats]:
    stats = {layer: _Stats(sae.cfg.d_sae) for layer, sae in saes.items()}
    with torch.no_grad():
        for chunk in ids.split(batch):
            found = residuals(lm, chunk, torch.ones_like(chunk), list(saes))
            for layer, sae in saes.items():
                stats[layer].add(sae, found[layer][:, 1:].reshape(-1, lm.d_model).float())
    return stats


def cross_entropy(lm: LoadedModel, ids: torch.Tensor, *, batch: int = 16) -> float:
    """Mean next-token loss over targets ``ids[:, 2:]`` (nats/token)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for chunk in ids.split(batch):
            logits = lm.model(input_ids=chunk, attention_mask=torch.ones_like(chunk), use_cache=False).logits
            logits, targets = logits[:, 1:-1].float(), chunk[:, 2:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
            count += targets.numel()
    return total / count


@contextmanager
def patch_residual(lm: LoadedModel, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the residual after block ``layer`` at positions ``1..`` by ``fn(residual)``."""

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        z = block_output(output)
        return with_block_output(output, torch.cat([z[:, :1], fn(z[:, 1:])], dim=1))

    handle = lm.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def rounded(sae: SAE, dtype: torch.dtype) -> SAE:
    """A float32 copy of ``sae`` with its weights rounded through ``dtype``."""
    copy_ = copy.deepcopy(sae)
    with torch.no_grad():
        for param in copy_.parameters():
            param.copy_(param.to(dtype).float())
    return copy_
