"""``gradsae cards``: feature cards of chosen latents, or of every latent a run chose, as JSON.

``--latents 1,2,3 --out FILE`` describes those latents; ``--run RUN_DIR`` describes every
latent in the GradSAE or activation TopK of some example in ``RUN_DIR/examples.json``
and writes ``RUN_DIR/cards_layer{l}.json``, which ``gradsae report RUN_DIR --html`` shows.
``--neuronpedia FILE`` also writes them in Neuronpedia's upload format (``{modelId, source, features}``;
``--neuronpedia-model-id`` and ``--neuronpedia-source-set`` name the model and the source set).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradsae.cli import options
from gradsae.cli.common import parse_layers
from gradsae.errors import GradSAEError
from gradsae.experiments.cards import compute_cards, corpus_tokens, run_latents
from gradsae.experiments.results import EXAMPLES, ExampleDump, LayerExamples, cards_path
from gradsae.models import load_model, sae_device
from gradsae.pretrained import resolve_sae, sae_folder
from gradsae.report.neuronpedia import SOURCE_SET, write_neuronpedia


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gradsae cards``."""
    options.model_arguments(parser)
    parser.add_argument("--latents", default=None, help="comma-separated latent ids, e.g. 12,80,4001")
    parser.add_argument(
        "--run", default=None, help="a folder written by `gradsae reproduce`: describe every latent its TopK sets hold"
    )
    options.out(parser, help="output JSON (default with --run: RUN_DIR/cards_layer{l}.json)")
    parser.add_argument("--corpus", default="news", help="text corpus (held-out documents are used): news or a file")
    parser.add_argument("--sequences", type=int, default=64, help="corpus sequences to scan")
    parser.add_argument("--context", type=int, default=64, help="tokens per corpus sequence, BOS included")
    parser.add_argument("--top", type=int, default=8, help="top contexts kept per latent and ranking")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward and backward pass")
    parser.add_argument(
        "--neuronpedia", default=None, help="also write the cards here in Neuronpedia's upload format (one JSON file)"
    )
    parser.add_argument(
        "--neuronpedia-model-id", default=None, help="Neuronpedia's model id, e.g. smollm2-135m (default: --model)"
    )
    parser.add_argument(
        "--neuronpedia-source-set",
        default=SOURCE_SET,
        help="Neuronpedia source-set name; the source id is {layer}-{source set}",
    )


def run(args: argparse.Namespace) -> int:
    """Compute and write the cards of each layer asked for."""
    if not args.latents and not args.run:
        raise GradSAEError("say which latents: pass --latents 1,2,3 or --run RUN_DIR")
    if args.sequences < 1 or args.context < 2:
        raise GradSAEError("--sequences must be at least 1 and --context at least 2")
    dump = _examples(args.run)
    layers = _layers(args, dump)
    if args.out and len(layers) > 1:
        raise GradSAEError("--out names one file but the run has several layers: pass --layer")
    if args.neuronpedia and len(layers) > 1 and "{layer}" not in args.neuronpedia:
        raise GradSAEError("--neuronpedia names one file (one source) but the run has several layers: put {layer} in")
    lm = load_model(args.model, device=args.device, device_map=args.device_map)
    ids = corpus_tokens(lm.tokenizer, args.corpus, n_sequences=args.sequences, context=args.context)
    for layer in layers:
        sae, used, label = resolve_sae(lm, sae_folder(args.sae, layer), layer)
        part = dump.layer(used) if dump else None
        latents = parse_layers(args.latents, option="--latents") if args.latents else _chosen(part, used)
        cards = compute_cards(
            lm,
            sae.to(sae_device(lm, used, sae.cfg.hook_point)),
            ids,
            latents,
            layer=used,
            label=label,
            corpus=args.corpus,
            examples=part,
            top=args.top,
            batch=args.batch_size,
        )
        out = Path(args.out) if args.out else cards_path(args.run or ".", used)
        cards.save(out)
        sys.stdout.write(f"wrote {len(cards.cards)} feature cards of layer {used} to {out}\n")
        if args.neuronpedia:
            path = write_neuronpedia(
                args.neuronpedia.replace("{layer}", str(used)),
                cards,
                model_id=args.neuronpedia_model_id,
                source_set=args.neuronpedia_source_set,
            )
            sys.stdout.write(f"wrote {path} (Neuronpedia upload format)\n")
    return 0


def _examples(run_dir: str | None) -> ExampleDump | None:
    if run_dir is None:
        return None
    path = Path(run_dir) / EXAMPLES
    if not path.is_file():
        raise GradSAEError(f"{path} does not exist: rerun `gradsae reproduce` (it writes {EXAMPLES}) or pass --latents")
    return ExampleDump.load(path)


def _layers(args: argparse.Namespace, dump: ExampleDump | None) -> list[int | None]:
    if args.layer is not None or dump is None:
        return [args.layer]
    return [part.layer for part in dump.layers]


def _chosen(part: LayerExamples | None, layer: int) -> list[int]:
    if part is None:
        raise GradSAEError(f"the run has no examples at layer {layer}: pass --layer one of its layers, or --latents")
    return run_latents(part)
