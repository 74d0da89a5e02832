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

Left-padded rows of different lengths (an ``attention_mask``) follow the same rule
with each row's first real token in the role of BOS: it and the padding are never
encoded, replaced nor ablated, and padding changes no figure. ``counted`` narrows
the tokens that enter the figures (e.g. only a generated continuation) while the
replacement still covers every spliced position: the residual figures average over
the counted positions, CE and KL over the next-token predictions made at counted
positions that have a next token (for the rows above: positions ``1..P-2``).
Each edited pass replays the clean pass's blocks ``0..l`` (:mod:`gradsae.prefix`).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gradsae import _files
from gradsae.models import LoadedModel, block_output, capture_residuals, position_ids, with_block_output
from gradsae.prefix import Prefix, replay_prefix
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
    fvu_typical: float = float("nan")
    """FVU over the tokens whose ``|x|`` is at most ``typical`` x the median ``|x|`` (NaN unless asked)."""
    outliers: int = 0
    """Tokens left out of :attr:`fvu_typical` (massive activations)."""
    explained_variance_legacy: float = float("nan")
    """SAEBench's per-token ratio: the mean over tokens of ``1 - |x - x^|^2 / |x - mean(x)|^2``, the mean
    over the counted tokens of the same pass batch (NaN in files written before it was measured)."""


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
    legacy: float = 0.0
    """Sum over tokens of ``1 - |x - x^|^2 / |x - mean_batch(x)|^2`` (SAEBench's legacy explained variance)."""
    total: torch.Tensor | None = None
    fired: torch.Tensor | None = None
    """``[d_sae]`` tokens on which each latent fired."""
    fired_seq: torch.Tensor | None = None
    """``[d_sae]`` sequences on which each latent fired."""
    keep_tokens: bool = False
    """Keep each token's ``x`` and squared error (for :meth:`typical_fvu`)."""
    tokens: list[torch.Tensor] = field(default_factory=list)
    """``[n, d_model + 1]`` chunks: ``x`` and ``|x - x^|^2`` per token (``keep_tokens``)."""

    def add(self, sae: SAE, xs: torch.Tensor, keep: torch.Tensor) -> None:
        """Accumulate the rows of ``xs`` (``[batch, pos, d_model]``) where ``keep`` (``[batch, pos]``) is true."""
        x = xs[keep]
        h = sae.encode(x)
        out = sae.decode(h)
        self.err += float((x - out).double().pow(2).sum())
        centred = (x.double() - x.double().mean(0)).pow(2).sum(-1)
        self.legacy += float((1 - (x - out).double().pow(2).sum(-1) / centred).sum())
        self.sq += float(x.double().pow(2).sum())
        self.total = _plus(self.total, x.double().sum(0))
        active = h > 0
        self.fired = _plus(self.fired, active.sum(0).long())
        per_row = torch.zeros(xs.shape[0], h.shape[-1], device=h.device).index_add_(
            0, keep.nonzero()[:, 0], active.float()
        )
        self.fired_seq = _plus(self.fired_seq, (per_row > 0).sum(0).long())
        if self.keep_tokens:
            self.tokens.append(torch.cat([x, (x - out).pow(2).sum(-1, keepdim=True)], dim=-1).float().cpu())
        self.l0 += float(active.sum())
        self.l1 += float(h.double().abs().sum())
        self._shrinkage(x.double(), out.double())
        self.n += x.shape[0]
        self.sequences += int(keep.any(1).sum())

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

    def typical_fvu(self, factor: float) -> tuple[float, int]:
        """FVU without the tokens whose norm exceeds ``factor`` x the median norm, and how many those are."""
        rows = torch.cat(self.tokens).double()
        x, err = rows[:, :-1], rows[:, -1]
        norm = x.norm(dim=-1)
        kept = norm <= factor * norm.median()
        xk = x[kept]
        return float(err[kept].sum() / (xk - xk.mean(0)).pow(2).sum()), int((~kept).sum())

    def core(self, kl_sae: float, kl_zero: float, typical: float | None = None) -> CoreMetrics:
        assert self.fired is not None and self.fired_seq is not None and self.total is not None
        fvu_typical, outliers = self.typical_fvu(typical) if typical is not None else (float("nan"), 0)
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
            fvu_typical=fvu_typical,
            outliers=outliers,
            explained_variance_legacy=self.legacy / self.n,
        )


def _plus(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


def evaluate_saes(
    lm: LoadedModel,
    saes: dict[int, SAE],
    ids: torch.Tensor,
    *,
    batch: int = 16,
    attention_mask: torch.Tensor | None = None,
    counted: torch.Tensor | None = None,
) -> dict[int, EvalResult]:
    """Held-out figures of each SAE (by layer) on ``ids`` (``[n, pos]``, BOS first); see :func:`evaluate_all`."""
    found = evaluate_all(lm, saes, ids, batch=batch, attention_mask=attention_mask, counted=counted)
    return {layer: result for layer, (result, _) in found.items()}


def evaluate_all(
    lm: LoadedModel,
    saes: dict[int, SAE],
    ids: torch.Tensor,
    *,
    batch: int = 16,
    attention_mask: torch.Tensor | None = None,
    counted: torch.Tensor | None = None,
    typical: float | None = None,
) -> dict[int, tuple[EvalResult, CoreMetrics]]:
    """:class:`EvalResult` and :class:`CoreMetrics` of each SAE, from one set of passes.

    ``ids``: ``[n, pos]`` token ids, left-padded where ``attention_mask`` (``[n, pos]``, default all
    ones) is 0. ``counted``: ``[n, pos]`` bool, the positions whose figures count (default: every
    spliced one); see the module docstring. ``typical``: also the FVU without the tokens whose norm
    exceeds ``typical`` x the median (:attr:`CoreMetrics.fvu_typical`; keeps every counted ``x``).
    """
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device)
    spliced = spliced_positions(mask)
    counted = spliced if counted is None else counted.to(ids.device).bool() & spliced
    stats = {layer: _Stats(sae.cfg.d_sae, keep_tokens=typical is not None) for layer, sae in saes.items()}
    sums = {layer: dict.fromkeys(("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"), 0.0) for layer in saes}
    count = 0
    step = max(1, min(batch, KL_BATCH))
    for first in range(0, ids.shape[0], step):
        rows = slice(first, first + step)
        chunk, chunk_mask, chunk_spliced, chunk_counted = _trimmed(ids[rows], mask[rows], spliced[rows], counted[rows])
        count += _add_chunk(lm, saes, chunk, chunk_mask, chunk_spliced, chunk_counted, stats, sums)
    results = {}
    for layer in saes:
        s, o = stats[layer], {k: v / max(count, 1) for k, v in sums[layer].items()}
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
        results[layer] = (result, s.core(o["kl_sae"], o["kl_zero"], typical))
    return results


def spliced_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[n, pos]`` bool: real tokens other than each row's first (the positions an SAE is spliced at)."""
    real = attention_mask.bool()
    first = real.int().argmax(dim=1)
    columns = torch.arange(real.shape[1], device=real.device)
    return real & (columns[None, :] != first[:, None])


def _trimmed(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors without the leading columns that are padding in every row (``tensors[1]`` is the mask)."""
    real = tensors[1].bool().any(0)
    start = int(real.int().argmax()) if bool(real.any()) else 0
    return tuple(t[:, start:] for t in tensors)


def _add_chunk(
    lm: LoadedModel,
    saes: dict[int, SAE],
    ids: torch.Tensor,
    mask: torch.Tensor,
    spliced: torch.Tensor,
    counted: torch.Tensor,
    stats: dict[int, _Stats],
    sums: dict[int, dict[str, float]],
) -> int:
    """Add one chunk of rows to ``stats`` and ``sums``; return its number of counted predictions."""
    predicted = counted[:, :-1]
    targets = ids[:, 1:][predicted][:, None]
    clean, found = _clean_pass(lm, ids, mask, predicted, list(saes))
    for layer, sae in saes.items():
        with torch.no_grad():
            stats[layer].add(sae, found[layer].float(), counted)
        sums[layer]["ce_clean"] += float(-clean.gather(-1, targets).sum())
        replay = Prefix(layer=layer, input_ids=ids, keys=(), values=(), residual=found[layer])
        for name, fn in (("zero", torch.zeros_like), ("sae", _reconstruct(sae))):
            with patch_residual(lm, layer, fn, keep=spliced), replay_prefix(lm, replay):
                edited = _log_probs(lm, ids, mask, predicted)
            sums[layer][f"ce_{name}"] += float(-edited.gather(-1, targets).sum())
            sums[layer][f"kl_{name}"] += float((clean.exp() * (clean - edited)).sum())
    return int(targets.numel())


def _clean_pass(
    lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, predicted: torch.Tensor, layers: list[int]
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The clean log-probabilities at ``predicted`` and the residual after each of ``layers``."""
    with capture_residuals(lm, layers, stop=False) as found:
        clean = _log_probs(lm, ids, mask, predicted)
    return clean, dict(found)


def _log_probs(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """``[n_predicted, vocab]`` next-token log-probabilities at positions ``predicted`` (``[batch, pos - 1]``).

    Uncached: a replayed prefix (:func:`gradsae.prefix.replay_prefix`) then never reads its empty keys/values.
    """
    with torch.inference_mode():
        logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
        return logits[:, :-1][predicted].float().log_softmax(dim=-1)


def _reconstruct(sae: SAE) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return sae(x.float()).to(x.dtype)

    return fn


@contextmanager
def patch_residual(
    lm: LoadedModel, layer: int, fn: Callable[[torch.Tensor], torch.Tensor], *, keep: torch.Tensor | None = None
) -> Iterator[None]:
    """Replace the residual after block ``layer`` by ``fn(residual)`` at ``keep`` (``[batch, pos]`` bool of the
    pass; default: positions ``1..``); elsewhere it stays as it is."""

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        z = block_output(output)
        if keep is None:
            return with_block_output(output, torch.cat([z[:, :1], fn(z[:, 1:])], dim=1))
        return with_block_output(output, torch.where(keep.to(z.device)[..., None], fn(z), z))

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
