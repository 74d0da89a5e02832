"""``gradsae train-sae``: train (or resume) TopK SAEs, then evaluate and save each one.

The training options come from :class:`gradsae.training.trainer.TrainConfig`
itself (one ``--option`` per field, its docstring as the help); the rest say
where the text and the outputs are.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from gradsae import _files
from gradsae.cli import options, validate
from gradsae.cli.common import dataclass_arguments, parse_count, parse_layers
from gradsae.errors import GradSAEError
from gradsae.models import DEFAULT_NAMES, LoadedModel, check_layers, load_model
from gradsae.training import taskmix
from gradsae.training.activations import Corpus, Mixture, load_texts, split_heldout
from gradsae.training.chatmix import CHAT_SHARE, conversations, user_turns
from gradsae.training.export import finish_run
from gradsae.training.loop import CHECKPOINT, stop_on_sigint, train_saes
from gradsae.training.trainer import TrainConfig

log = logging.getLogger(__name__)


def parse_counts(text: str) -> tuple[int, ...]:
    """Comma-separated token counts, e.g. ``100k,200k,400k``."""
    return tuple(sorted({parse_count(part) for part in text.split(",") if part.strip()}))


COUNTS = {
    "tokens": parse_count,
    "warmup_tokens": parse_count,
    "dead_tokens": parse_count,
    "keep_checkpoints": parse_counts,
}
NOT_OPTIONS = ("layers", "model_name", "corpus")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gradsae train-sae``."""
    add = parser.add_argument
    options.model(parser)
    options.layers(parser, default="6", help="comma-separated layers, e.g. 6,15,24 (one SAE each, trained together)")
    add(
        "--corpus",
        default="news",
        help="news (embedded NewsArticles); chatmix (news + chat conversations in the model's template with its "
        "own replies, see gradsae.training.chatmix); taskmix (news + chat + plain few-shot text in the generated "
        "tasks' style from items no evaluation row uses, see gradsae.training.taskmix); "
        "a .txt/.jsonl/.csv/.parquet file; or a HF dataset",
    )
    add("--column", default="text", help="text column of a .jsonl/.csv/.parquet/HF corpus")
    add("--split", default="train", help="split of a Hugging Face dataset")
    options.out(parser, default="runs/sae", help="output folder: layer_<l>/ per SAE, plus checkpoint.pt")
    dataclass_arguments(parser, TrainConfig, skip=NOT_OPTIONS, types=COUNTS)
    add(
        "--model-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="dtype of the model while training (bfloat16 helps on GPUs and CPUs with native bf16; on an AVX2-only "
        "CPU its matrix products run about 6x slower than float32)",
    )
    add("--save-dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="dtype of the saved SAEs")
    add("--eval-tokens", type=parse_count, default=32_768, help="held-out tokens for evaluation (0: skip)")
    add("--eval-batch", type=int, default=16, help="sequences per forward pass in evaluation")
    options.threads(parser)
    add("--no-progress", action="store_true", help="hide the progress bar")


def config_from_args(args: argparse.Namespace, model_name: str) -> TrainConfig:
    """The :class:`TrainConfig` an argparse namespace describes."""
    import dataclasses

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in NOT_OPTIONS}
    return TrainConfig(layers=parse_layers(args.layers), model_name=model_name, corpus=str(args.corpus), **options)


def sae_model_name(name: str | None) -> str:
    """The name recorded in the SAEs' config."""
    return "SmolLM2-135M-Instruct" if name in DEFAULT_NAMES else str(name)


def run(args: argparse.Namespace) -> int:
    """Check everything, train (or resume), then evaluate and save each SAE."""
    cfg = check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    mix = args.corpus.lower() if args.corpus.lower() in MIXES else None
    corpus = None if mix else args.corpus
    train_texts, heldout = split_heldout(load_texts(corpus, column=args.column, split=args.split))
    out = Path(args.out)
    with _files.locked_folder(out, command="train-sae"):
        lm = load_model(args.model)
        check_layers(lm, cfg.layers)
        corpus_in: Corpus = MIXES[mix](lm, train_texts, out) if mix else train_texts
        if args.model_dtype != "float32":
            lm.model.to(getattr(torch, args.model_dtype))
        with stop_on_sigint() as should_stop:
            result = train_saes(
                lm,
                corpus_in,
                cfg,
                checkpoint=out / CHECKPOINT,
                should_stop=should_stop,
                progress=not args.no_progress,
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


CHATMIX = "chatmix"


def chat_mixture(lm: LoadedModel, news: list[str], out: Path) -> Mixture:
    """News documents and chat conversations (replies generated once, cached in ``out``)."""
    chats = conversations(lm, user_turns(), cache=out / "chat_replies.json")
    return Mixture(texts=tuple(news), framed=tuple(chats), framed_share=CHAT_SHARE)


def task_mixture(lm: LoadedModel, news: list[str], out: Path) -> Mixture:
    """News, chat conversations (with a chat template) and few-shot text (:mod:`gradsae.training.taskmix`)."""
    if getattr(lm.tokenizer, "chat_template", None):
        chats = conversations(lm, user_turns(), cache=out / "chat_replies.json")
        docs = taskmix.few_shot_docs(len(chats))
        return Mixture(texts=tuple(news), framed=(*chats, *docs), framed_share=taskmix.FRAMED_SHARE_CHAT)
    docs = taskmix.few_shot_docs(taskmix.FEW_SHOT_DOCS)
    return Mixture(
        texts=tuple(news),
        framed=tuple(docs),
        framed_share=taskmix.FRAMED_SHARE_PLAIN,
        framed_bos=taskmix.adds_bos(lm.tokenizer),
    )


MIXES: dict[str, Callable[[LoadedModel, list[str], Path], Mixture]] = {
    CHATMIX: chat_mixture,
    "taskmix": task_mixture,
}


def interrupted(args: argparse.Namespace) -> str:
    """What a second Ctrl-C leaves: the last checkpoint, if one was written."""
    checkpoint = Path(args.out) / CHECKPOINT
    if checkpoint.is_file():
        return f"the last checkpoint, {checkpoint}, is kept; run the same command again to resume from it"
    return "no checkpoint had been written yet, so nothing is saved; run the same command again to start over"


def check_arguments(args: argparse.Namespace) -> TrainConfig:
    """Refuse any bad option, input path or output folder before a model loads; return the config."""
    cfg = config_from_args(args, sae_model_name(args.model))
    for option, low in (("--batch", 1), ("--buffer", 1), ("--context", 2), ("--dead-tokens", 1)):
        validate.at_least(option, getattr(args, option[2:].replace("-", "_")), low)
    validate.positive("--lr", args.lr)
    validate.at_least("--aux-k", args.aux_k, 1)
    validate.at_least("--aux-coef", args.aux_coef, 0)
    validate.at_least("--warmup-tokens", args.warmup_tokens, 0)
    validate.at_least("--checkpoint-seconds", args.checkpoint_seconds, 0)
    validate.at_least("--eval-batch", args.eval_batch, 1)
    validate.at_least("--threads", args.threads, 1)
    if not 0 <= args.decay_fraction <= 1:
        raise GradSAEError(f"--decay-fraction must be between 0 and 1, got {args.decay_fraction:g}: pass e.g. 0.2")
    validate.model_and_device(args.model)
    validate.layers(cfg.layers, args.model, option="--layers")
    validate.out_folder(args.out)
    return cfg
