"""Command line: ``gradsae score | train-sae | reproduce``.

Every user error ends as one line, ``error: <what and the fix>``, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from gradsae.errors import GradSAEError

log = logging.getLogger("gradsae")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradsae`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries(args.verbose)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except GradSAEError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: finished work is saved; run the same command again to continue\n")
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradsae", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and progress bars")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    score = sub.add_parser("score", help="rank a prompt's SAE latents by GradSAE and by activation")
    add_model_arguments(score)
    add_score_arguments(score)
    score.set_defaults(command=_score)
    _add_train(sub)
    _add_reproduce(sub)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--sae``, ``--layer``, ``--device``: shared by the commands."""
    parser.add_argument(
        "--model", default=None, help="HF model folder or id, or a .gguf file (default: embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--sae",
        default=None,
        help="SAE folder: SAELens, sparsify or Gemma Scope layout; {layer} in it becomes the layer (default: shipped)",
    )
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="decoder block whose output the SAE reads (default: the SAE's own, else 6)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default="What is the capital of France?", help="the input text")
    parser.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    parser.add_argument(
        "--objective",
        default="next-token",
        choices=["next-token", "target", "label"],
        help="next-token: p(greedy next token) (the paper's); target: log p(--target | prompt); "
        "label: log p(--label | --labels) at the next token",
    )
    parser.add_argument("--target", default=None, help="continuation for --objective target")
    parser.add_argument("--labels", default="", help="comma-separated label words for --objective label")
    parser.add_argument("--label", default=None, help="the label to score for --objective label")
    parser.add_argument(
        "--mode",
        default="error",
        choices=["error", "replace"],
        help="error: exact model + latents (default); replace: the paper's reconstruction splice",
    )
    parser.add_argument(
        "--aggregation",
        default="paper",
        choices=["paper", "signed", "abs", "sum", "last"],
        help="how per-token influence becomes per-latent (paper: mean of positive parts)",
    )
    parser.add_argument("--top", type=int, default=10, help="rows in the table")
    parser.add_argument("--ablation", action="store_true", help="also compute the exact ablation effect")
    parser.add_argument("--json", default=None, help="also write the table as JSON to this file")


def _score(args: argparse.Namespace) -> int:
    from gradsae.score_command import run_score

    sys.stdout.write(run_score(args))
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    try:
        from gradsae.train import add_train_sae_arguments, train_sae_command
    except ImportError:  # trainer not installed in this build
        return
    train = sub.add_parser("train-sae", help="train TopK SAEs on a model's residual stream")
    add_train_sae_arguments(train)
    train.set_defaults(command=train_sae_command)


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    try:
        from gradsae.reproduce import add_reproduce_arguments, reproduce_command
    except ImportError:
        return
    reproduce = sub.add_parser("reproduce", help="run the paper's two experiments and write tables and plots")
    add_model_arguments(reproduce)
    add_reproduce_arguments(reproduce)
    reproduce.set_defaults(command=reproduce_command)


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("gradsae").setLevel(logging.INFO)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if not verbose:
            hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
