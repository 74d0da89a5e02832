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

:func:`finish_run` saves each trained SAE (SAELens layout), its ``eval.json``
and a model card ``README.md`` to ``<out>/layer_<l>/``; the figures also go
into ``cfg.json``'s metadata. When the SAE is saved in a lower precision, the
evaluated SAE is the saved one (weights rounded first).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from gradsae.activations import heldout_tokens
from gradsae.models import LoadedModel, block_output, residuals
from gradsae.sae import SAE

if TYPE_CHECKING:
    from gradsae.train import TrainConfig, TrainResult

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
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        return cls(**json.loads(Path(path).read_text()))


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
        new = torch.cat([z[:, :1], fn(z[:, 1:])], dim=1)
        return (new, *output[1:]) if isinstance(output, tuple) else new

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


# -- writing a finished run --------------------------------------------------------
def finish_run(
    lm: LoadedModel,
    result: TrainResult,
    cfg: TrainConfig,
    heldout: Sequence[str],
    *,
    out: str | Path,
    save_dtype: torch.dtype = torch.float32,
    eval_tokens: int = 32_768,
    eval_batch: int = 16,
) -> dict[int, EvalResult]:
    """Evaluate the trained SAEs on ``heldout`` and write ``<out>/layer_<l>/``."""
    from gradsae.train import with_metadata

    saes = {layer: rounded(sae, save_dtype) for layer, sae in result.saes.items()}
    evals: dict[int, EvalResult] = {}
    if eval_tokens > 0:
        n_seq = max(1, -(-eval_tokens // (cfg.context - 1)))
        ids = heldout_tokens(lm.tokenizer, heldout, context=cfg.context, n_sequences=n_seq).to(lm.device)
        evals = evaluate_saes(lm, saes, ids, batch=eval_batch)
    recipe = training_metadata(result, cfg)
    for layer, sae in result.saes.items():
        folder = Path(out) / f"layer_{layer}"
        meta: dict[str, Any] = {"training": recipe, "context_size": cfg.context, "dataset_path": cfg.corpus}
        if layer in evals:
            meta["eval"] = asdict(evals[layer])
        with_metadata(sae, **meta).save(folder, dtype=save_dtype)
        if layer in evals:
            evals[layer].save(folder / "eval.json")
        (folder / "README.md").write_text(model_card(sae, recipe, evals.get(layer)))
        log.info("wrote %s", folder)
    return evals


def training_metadata(result: TrainResult, cfg: TrainConfig) -> dict[str, Any]:
    """How the SAEs were trained, as JSON-able data."""
    return {
        **{key: value for key, value in asdict(cfg).items() if key != "checkpoint_seconds"},
        "layers": list(cfg.layers),
        "lr": cfg.learning_rate,
        "tokens_seen": result.tokens,
        "train_seconds": round(result.seconds, 1),
        "schedule": f"Adam, linear warm-up {cfg.warmup_tokens} tokens, linear decay over the last "
        f"{cfg.decay_fraction:.0%}",
    }


def model_card(sae: SAE, recipe: dict[str, Any], result: EvalResult | None) -> str:
    """A short ``README.md`` for one SAE folder."""
    c = sae.cfg
    lines = [
        f"# TopK SAE: {c.model_name}, residual stream after layer {c.hook_layer}",
        "",
        f"- Hook: `{c.hook_name}` (output of decoder block {c.hook_layer}); d_in {c.d_in}, "
        f"{c.d_sae} latents, TopK with k = {c.k}, `b_dec` subtracted from the input.",
        f"- Training: {recipe['tokens_seen']:,} tokens of `{recipe['corpus']}` (held-out documents excluded), "
        f"context {recipe['context']} (BOS skipped), {recipe['sae_batch']} tokens per step, "
        f"lr {recipe['lr']:.2e} ({recipe['schedule']}), AuxK (k_aux = d_in/2, coefficient "
        f"{recipe['aux_coef']:.4g}, dead after {recipe['dead_tokens']:,} silent tokens), seed {recipe['seed']}, "
        f"{recipe['train_seconds'] / 60:.0f} min on CPU.",
        "- Trained with `gradsae train-sae` (layers "
        + ", ".join(str(layer) for layer in recipe["layers"])
        + " from one pass).",
        "",
    ]
    if result is not None:
        lines += [
            f"## Evaluation ({result.tokens:,} held-out tokens, weights as saved)",
            "",
            "| FVU | L0 | dead latents | CE clean | CE with SAE | CE zero-ablated | CE loss recovered |",
            "|---|---|---|---|---|---|---|",
            f"| {result.fvu:.3f} | {result.l0:.1f} | {100 * result.dead_fraction:.1f}% | {result.ce_clean:.3f} | "
            f"{result.ce_sae:.3f} | {result.ce_zero:.3f} | {100 * result.ce_recovered:.1f}% |",
            "",
        ]
    lines += ["Load with `gradsae.sae.load_sae(folder)` or SAELens (`cfg.json` + `sae_weights.safetensors`).", ""]
    return "\n".join(lines)
