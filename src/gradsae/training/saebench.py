"""SAEBench's ``core`` evaluation JSON for an SAE trained here, written without SAEBench (it pins numpy < 2).

The shape follows SAEBench's ``CoreEvalOutput`` (``sae_bench/evals/core/eval_output.py``)::

    eval_type_id "core", eval_config, eval_id, datetime_epoch_millis,
    eval_result_metrics:
      model_behavior_preservation:    kl_div_score, kl_div_with_ablation, kl_div_with_sae
      model_performance_preservation: ce_loss_score, ce_loss_with_ablation, ce_loss_with_sae, ce_loss_without_sae
      reconstruction_quality:         explained_variance, explained_variance_legacy, mse, cossim
      shrinkage:                      l2_norm_in, l2_norm_out, l2_ratio, relative_reconstruction_bias
      sparsity:                       l0, l1
      token_stats:                    total_tokens_eval_reconstruction, total_tokens_eval_sparsity_variance
      misc_metrics:                   freq_over_1_percent, freq_over_10_percent, normalized_freq_over_{1,10}_percent,
                                      average_max_encoder_cosine_sim, average_max_decoder_cosine_sim, frac_alive
    eval_result_details: one row per latent (index, feature_density, consistent_activation_heuristic,
                         encoder_bias, encoder_norm, encoder_decoder_cosine_sim, max_{de,en}coder_cosine_sim)
    sae_bench_commit_hash, sae_lens_id, sae_lens_release_id, sae_lens_version, sae_cfg_dict,
    eval_result_unstructured

Scores as SAEBench defines them: ``kl_div_score = (KL_zero - KL_sae) / KL_zero``,
``ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean)`` (zero ablation),
``freq_over_p`` = share of latents whose density exceeds ``p``, ``normalized_freq_over_p`` =
their share of the summed density, ``frac_alive`` = share with density > 0. Where the
figures here differ from SAEBench's own run, ``eval_result_unstructured["notes"]`` says so.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gradsae import _files
from gradsae.sae import SAE
from gradsae.sae_formats import saelens_cfg
from gradsae.training.evaluate import CoreMetrics, EvalResult

NOTES = (
    "written by gradsae (training/saebench.py), not by SAEBench",
    "held-out text of the training corpus, not SAEBench's dataset; BOS excluded from every figure",
    "CE and KL over next-token predictions at positions 1..P-2 (those the spliced positions can change)",
    "explained_variance is 1 - FVU pooled over tokens; explained_variance_legacy is SAEBench's per-token ratio,"
    " centred on the mean of each pass batch (at most 4 sequences); mse is per entry",
)


def core_output(
    sae: SAE, result: EvalResult, core: CoreMetrics, *, dataset: str, context: int, batch: int
) -> dict[str, Any]:
    """The SAEBench ``core`` JSON of one SAE (module docstring)."""
    return {
        "eval_type_id": "core",
        "eval_config": _config(sae, dataset=dataset, context=context, batch=batch, core=core),
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": _metrics(sae, result, core),
        "eval_result_details": details(sae, core),
        "sae_bench_commit_hash": "none",
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_cfg_dict": saelens_cfg(sae.cfg),
        "eval_result_unstructured": {"notes": list(NOTES), "sequences": core.sequences},
    }


def write_core(path: str | Path, sae: SAE, result: EvalResult, core: CoreMetrics, **kwargs: Any) -> Path:
    """Write :func:`core_output` as JSON."""
    return _files.write_json(path, core_output(sae, result, core, **kwargs), sort_keys=False)


def _config(sae: SAE, *, dataset: str, context: int, batch: int, core: CoreMetrics) -> dict[str, Any]:
    n_batches = max(1, -(-core.sequences // batch))
    return {
        "model_name": sae.cfg.model_name,
        "llm_dtype": "float32",
        "batch_size_prompts": batch,
        "n_eval_reconstruction_batches": n_batches,
        "n_eval_sparsity_variance_batches": n_batches,
        "dataset": dataset,
        "context_size": context,
        "compute_kl": True,
        "compute_ce_loss": True,
        "compute_l2_norms": True,
        "compute_sparsity_metrics": True,
        "compute_variance_metrics": True,
        "compute_featurewise_density_statistics": True,
        "compute_featurewise_weight_based_metrics": True,
        "exclude_special_tokens_from_reconstruction": True,
    }


def _metrics(sae: SAE, result: EvalResult, core: CoreMetrics) -> dict[str, dict[str, float]]:
    return {
        "model_behavior_preservation": {
            "kl_div_score": (core.kl_zero - core.kl_sae) / core.kl_zero,
            "kl_div_with_ablation": core.kl_zero,
            "kl_div_with_sae": core.kl_sae,
        },
        "model_performance_preservation": {
            "ce_loss_score": result.ce_recovered,
            "ce_loss_with_ablation": result.ce_zero,
            "ce_loss_with_sae": result.ce_sae,
            "ce_loss_without_sae": result.ce_clean,
        },
        "reconstruction_quality": {
            "explained_variance": core.explained_variance,
            "explained_variance_legacy": core.explained_variance_legacy,
            "mse": core.mse,
            "cossim": core.cossim,
        },
        "shrinkage": {
            "l2_norm_in": core.l2_norm_in,
            "l2_norm_out": core.l2_norm_out,
            "l2_ratio": core.l2_ratio,
            "relative_reconstruction_bias": core.relative_reconstruction_bias,
        },
        "sparsity": {"l0": core.l0, "l1": core.l1},
        "token_stats": {
            "total_tokens_eval_reconstruction": result.tokens,
            "total_tokens_eval_sparsity_variance": core.tokens,
        },
        "misc_metrics": misc_metrics(sae, core),
    }


def misc_metrics(sae: SAE, core: CoreMetrics) -> dict[str, float]:
    """Density summaries and the mean of each latent's largest encoder / decoder cosine to another latent."""
    density = torch.tensor(core.density, dtype=torch.float64)
    total = float(density.sum())
    out = {"frac_alive": float((density > 0).double().mean())}
    for name, p in (("1", 0.01), ("10", 0.1)):
        over = density > p
        out[f"freq_over_{name}_percent"] = float(over.double().mean())
        out[f"normalized_freq_over_{name}_percent"] = float(density[over].sum()) / total if total > 0 else 0.0
    out["average_max_encoder_cosine_sim"] = float(max_cosine(sae.W_enc.detach().T).mean())
    out["average_max_decoder_cosine_sim"] = float(max_cosine(sae.W_dec.detach()).mean())
    return out


def details(sae: SAE, core: CoreMetrics) -> list[dict[str, float]]:
    """One row per latent, as SAEBench's ``CoreFeatureMetric`` (``-1`` where a ratio has no value)."""
    w_enc, w_dec = sae.W_enc.detach().float().T, sae.W_dec.detach().float()
    enc_norm, bias = w_enc.norm(dim=-1), sae.b_enc.detach().float()
    enc_dec = F.cosine_similarity(w_enc, w_dec, dim=-1)
    max_enc, max_dec = max_cosine(w_enc), max_cosine(w_dec)
    rows = []
    for c in range(sae.cfg.d_sae):
        tokens, seqs = core.density[c] * core.tokens, core.sequence_density[c] * core.sequences
        rows.append(
            {
                "index": c,
                "feature_density": core.density[c],
                "consistent_activation_heuristic": tokens / seqs if seqs > 0 else -1.0,
                "encoder_bias": float(bias[c]),
                "encoder_norm": float(enc_norm[c]),
                "encoder_decoder_cosine_sim": float(enc_dec[c]),
                "max_decoder_cosine_sim": float(max_dec[c]),
                "max_encoder_cosine_sim": float(max_enc[c]),
            }
        )
    return rows


def max_cosine(rows: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``[n]``: each row's largest cosine similarity with another row (chunked, never ``n x n`` at once)."""
    unit = F.normalize(rows.float(), dim=-1)
    out = torch.empty(unit.shape[0])
    for start in range(0, unit.shape[0], chunk):
        sims = unit[start : start + chunk] @ unit.T
        idx = torch.arange(start, min(start + chunk, unit.shape[0]))
        sims[idx - start, idx] = -float("inf")
        out[start : start + chunk] = sims.max(dim=-1).values
    return out
