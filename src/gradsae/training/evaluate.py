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

The same passes also give :class:`CoreMetrics`, the figures of SAEBench's ``core``
evaluation (written as its JSON by :mod:`gradsae.training.saebench`): at the same
prediction positions ``KL(p_clean || p_sae)`` and ``KL(p_clean || p_zero)`` and
``KL score = (KL_zero - KL_sae) / KL_zero``; per token the cosine of ``x`` and ``x^``,
``|x^| / |x|`` and ``|h|_1``; ``relative reconstruction bias = mean |x^|^2 / mean x.x^``;
per latent the share of tokens (density) and of sequences on which it fires.
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

KL_BATCH = 4
"""Sequences per pass for CE and KL (the clean log-probabilities are held while the edited ones are computed)."""


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


@dataclass(frozen=True)
class CoreMetrics:
    """SAEBench ``core`` figures of one SAE from the same held-out passes (see the module docstring)."""

    kl_sae: float
    """Mean ``KL(p_clean || p_sae)`` per prediction (nats)."""
    kl_zero: float
    """Mean ``KL(p_clean || p_zero)`` per prediction."""
    explained_variance: float
    """``1 - FVU`` (pooled over tokens)."""
    mse: float
    """Mean squared error per activation entry."""
    cossim: float
    """Mean cosine of ``x`` and ``x^`` per token."""
    l2_norm_in: float
    l2_norm_out: float
    l2_ratio: float
    """Mean ``|x^| / |x|`` per token."""
    relative_reconstruction_bias: float
    l0: float
    l1: float
    """Mean ``sum_c h_c`` per token."""
    tokens: int
    sequences: int
    density: tuple[float, ...]
    """Per latent: share of tokens on which it fires."""
    sequence_density: tuple[float, ...]
    """Per latent: share of sequences on which it fires at least once."""


@dataclass
class _Stats:
    """Running sums over held-out tokens for one SAE."""

    d_sae: int
    n: int = 0
    sequences: int = 0
    err: float = 0.0
    sq: float = 0.0
    l0: float = 0.0
    l1: float = 0.0
    cos: float = 0.0
    norm_in: float = 0.0
    norm_out: float = 0.0
    ratio: float = 0.0
    dot: float = 0.0
    sq_out: float = 0.0
    total: torch.Tensor | None = None
    fired: torch.Tensor | None = None
    """``[d_sae]`` tokens on which each latent fired."""
    fired_seq: torch.Tensor | None = None
    """``[d_sae]`` sequences on which each latent fired."""

    def add(self, sae: SAE, xs: torch.Tensor) -> None:
        """Accumulate ``xs`` (``[batch, pos, d_model]``, BOS already dropped)."""
        x = xs.reshape(-1, xs.shape[-1])
        h = sae.encode(x)
        out = sae.decode(h)
        self.err += float((x - out).double().pow(2).sum())
        self.sq += float(x.double().pow(2).sum())
        self.total = _plus(self.total, x.double().sum(0))
        active = h > 0
        self.fired = _plus(self.fired, active.sum(0).long())
        self.fired_seq = _plus(self.fired_seq, active.view(*xs.shape[:2], -1).any(1).sum(0).long())
        self.l0 += float(active.sum())
        self.l1 += float(h.double().abs().sum())
        self._shrinkage(x.double(), out.double())
        self.n += x.shape[0]
        self.sequences += xs.shape[0]

    def _shrinkage(self, x: torch.Tensor, out: torch.Tensor) -> None:
        n_in, n_out = x.norm(dim=-1), out.norm(dim=-1)
        self.norm_in += float(n_in.sum())
        self.norm_out += float(n_out.sum())
        self.ratio += float((n_out / n_in.clamp(min=1e-4)).sum())
        self.cos += float(F.cosine_similarity(x, out, dim=-1).sum())
        self.dot += float((x * out).sum())
        self.sq_out += float(out.pow(2).sum())

    def fvu(self) -> float:
        assert self.total is not None
        variance = self.sq - float(self.total.pow(2).sum()) / self.n
        return self.err / variance

    def core(self, kl_sae: float, kl_zero: float) -> CoreMetrics:
        assert self.fired is not None and self.fired_seq is not None and self.total is not None
        return CoreMetrics(
            kl_sae=kl_sae,
            kl_zero=kl_zero,
            explained_variance=1.0 - self.fvu(),
            mse=self.err / (self.n * self.total.numel()),
            cossim=self.cos / self.n,
            l2_norm_in=self.norm_in / self.n,
            l2_norm_out=self.norm_out / self.n,
            l2_ratio=self.ratio / self.n,
            relative_reconstruction_bias=self.sq_out / self.dot,
            l0=self.l0 / self.n,
            l1=self.l1 / self.n,
            tokens=self.n,
            sequences=self.sequences,
            density=tuple((self.fired.double() / self.n).tolist()),
            sequence_density=tuple((self.fired_seq.double() / self.sequences).tolist()),
        )


def _plus(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


def evaluate_saes(
    lm: LoadedModel, saes: dict[int, SAE], ids: torch.Tensor, *, batch: int = 16
) -> dict[int, EvalResult]:
    """Held-out figures of each SAE (by layer) on ``ids`` (``[n, pos]``, BOS first)."""
    return {layer: result for layer, (result, _) in evaluate_all(lm, saes, ids, batch=batch).items()}


def evaluate_all(
    lm: LoadedModel, saes: dict[int, SAE], ids: torch.Tensor, *, batch: int = 16
) -> dict[int, tuple[EvalResult, CoreMetrics]]:
    """:class:`EvalResult` and :class:`CoreMetrics` of each SAE, from one set of passes."""
    stats = _reconstruction_stats(lm, saes, ids, batch)
    outputs = _output_metrics(lm, saes, ids, batch)
    results = {}
    for layer in saes:
        s, o = stats[layer], outputs[layer]
        assert s.fired is not None
        result = EvalResult(
            layer=layer,
            tokens=s.n,
            fvu=s.fvu(),
            l0=s.l0 / s.n,
            dead_fraction=float((s.fired == 0).float().mean()),
            ce_clean=o["ce_clean"],
            ce_sae=o["ce_sae"],
            ce_zero=o["ce_zero"],
            ce_recovered=(o["ce_zero"] - o["ce_sae"]) / (o["ce_zero"] - o["ce_clean"]),
        )
        log.info("layer %d: %s", layer, result)
        results[layer] = (result, s.core(o["kl_sae"], o["kl_zero"]))
    return results


def _output_metrics(
    lm: LoadedModel, saes: dict[int, SAE], ids: torch.Tensor, batch: int
) -> dict[int, dict[str, float]]:
    """Per layer: mean CE clean / with the SAE / zero-ablated and mean KL from clean, over targets ``ids[:, 2:]``."""
    sums = {layer: dict.fromkeys(("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"), 0.0) for layer in saes}
    count = 0
    for chunk in ids.split(max(1, min(batch, KL_BATCH))):
        clean = _log_probs(lm, chunk)
        targets = chunk[:, 2:].reshape(-1, 1)
        for layer, sae in saes.items():
            sums[layer]["ce_clean"] += float(-clean.gather(-1, targets).sum())
            for name, fn in (("zero", torch.zeros_like), ("sae", _reconstruct(sae))):
                with patch_residual(lm, layer, fn):
                    edited = _log_probs(lm, chunk)
                sums[layer][f"ce_{name}"] += float(-edited.gather(-1, targets).sum())
                sums[layer][f"kl_{name}"] += float((clean.exp() * (clean - edited)).sum())
        count += targets.numel()
    return {layer: {k: v / count for k, v in values.items()} for layer, values in sums.items()}


def _log_probs(lm: LoadedModel, chunk: torch.Tensor) -> torch.Tensor:
    """``[batch * (pos - 2), vocab]`` next-token log-probabilities at positions ``1..pos-2``."""
    with torch.inference_mode():
        logits = lm.model(input_ids=chunk, attention_mask=torch.ones_like(chunk), use_cache=False).logits
        return logits[:, 1:-1].float().log_softmax(dim=-1).reshape(-1, logits.shape[-1])


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
                stats[layer].add(sae, found[layer][:, 1:].float())
    return stats


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
