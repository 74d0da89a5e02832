"""Write a finished training run: each SAE (SAELens layout), its ``eval.json`` and a model card.

``<out>/layer_<l>/`` gets ``cfg.json`` + ``sae_weights.safetensors`` (the
evaluation figures also go into ``cfg.json``'s metadata), ``eval.json``,
``saebench_core.json`` (the same evaluation in SAEBench's ``core`` shape) and a
``README.md`` model card. When the SAE is saved in a lower precision, the
evaluated SAE is the saved one (weights rounded first).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from gradsae import _files
from gradsae.models import LoadedModel
from gradsae.sae import SAE
from gradsae.sae_formats import save_sae
from gradsae.training.activations import heldout_tokens
from gradsae.training.evaluate import CoreMetrics, EvalResult, evaluate_all, rounded
from gradsae.training.loop import TrainResult
from gradsae.training.saebench import write_core
from gradsae.training.trainer import TrainConfig

log = logging.getLogger(__name__)


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
    saes = {layer: rounded(sae, save_dtype) for layer, sae in result.saes.items()}
    both: dict[int, tuple[EvalResult, CoreMetrics]] = {}
    if eval_tokens > 0:
        n_seq = max(1, -(-eval_tokens // (cfg.context - 1)))
        ids = heldout_tokens(lm.tokenizer, heldout, context=cfg.context, n_sequences=n_seq).to(lm.device)
        both = evaluate_all(lm, saes, ids, batch=eval_batch)
    evals = {layer: result for layer, (result, _) in both.items()}
    recipe = training_metadata(result, cfg)
    for layer, sae in result.saes.items():
        folder = Path(out) / f"layer_{layer}"
        meta: dict[str, Any] = {"training": recipe, "context_size": cfg.context, "dataset_path": cfg.corpus}
        if layer in evals:
            meta["eval"] = asdict(evals[layer])
        save_sae(with_metadata(sae, **meta), folder, dtype=save_dtype)
        if layer in both:
            evals[layer].save(folder / "eval.json")
            core = both[layer][1]
            write_core(
                folder / "saebench_core.json",
                saes[layer],
                evals[layer],
                core,
                dataset=cfg.corpus,
                context=cfg.context,
                batch=eval_batch,
            )
        _files.write_text(folder / "README.md", model_card(sae, recipe, evals.get(layer)))
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
        *_corpus_lines(recipe),
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
    lines += ["Load with `gradsae.load_sae(folder)` or SAELens (`cfg.json` + `sae_weights.safetensors`).", ""]
    if result is not None:
        lines += ["The evaluation in SAEBench's `core` JSON shape: `saebench_core.json`.", ""]
    return "\n".join(lines)


def _corpus_lines(recipe: dict[str, Any]) -> list[str]:
    """What the ``chatmix`` / ``taskmix`` corpus is made of (nothing for other corpora)."""
    corpus = str(recipe.get("corpus", "")).lower()
    if corpus == "taskmix":
        return _taskmix_lines()
    if corpus != "chatmix":
        return []
    from gradsae.training.chatmix import CHAT_SHARE, PER_SOURCE, REPLY_TOKENS, SOURCES

    return [
        f"- Corpus `chatmix`: {1 - CHAT_SHARE:.0%} of the sequences are NewsArticles text (BOS + 127 tokens), "
        f"{CHAT_SHARE:.0%} are chat conversations in the model's template, each opening its sequence at position 0 "
        f"as an experiment prompt does: a user turn ({PER_SOURCE} per source from {len(SOURCES)} `sae-probes` "
        "datasets, none of them a set the experiments evaluate on, wrapped in classification / question / summary "
        f"instructions) and the model's own greedy reply (at most {REPLY_TOKENS} tokens); "
        "see `gradsae.training.chatmix`. Position 0 is never trained on.",
    ]


def _taskmix_lines() -> list[str]:
    from gradsae.training import taskmix

    sizes = taskmix.sizes()
    return [
        "- Corpus `taskmix` (see `gradsae.training.taskmix`): by the sequences each kind opens, 1/3 NewsArticles "
        "text (BOS + 127 tokens), 1/3 the `chatmix` chat conversations (a user turn and the model's own greedy "
        "reply), 1/3 plain few-shot text in the generated tasks' formats (capitals, plural, past_tense, facts; "
        "3 to 6 answered blocks each); without a chat template, 1/2 news and 1/2 few-shot text. Framed documents "
        "open their sequence at position 0 as an experiment prompt does; position 0 is never trained on. The "
        "few-shot items are the data the tasks' pools leave out, so no item is a row any evaluation can draw "
        f"({sizes['capitals']} countries, {sizes['plural']} nouns, {sizes['past_tense']} verbs; facts with "
        f"{sizes['facts_names']} first names and {sizes['facts_cities']} cities the facts task never uses).",
    ]


def with_metadata(sae: SAE, **metadata: Any) -> SAE:
    """The same SAE with ``metadata`` merged into its config."""
    sae.cfg = replace(sae.cfg, metadata={**sae.cfg.metadata, **metadata})
    return sae
