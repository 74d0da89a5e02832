"""Command line: ``gradsae score | train-sae | eval-sae | reproduce | sweep | report | cards | steer``.

Every user error ends as one line, ``error: <what and the fix>``, exit status 2,
also the parser's own (an unknown option, a bad choice). Each subcommand is a
module here with ``add_arguments(parser)``, ``run(args)`` and ``interrupted(args)``
(what Ctrl-C leaves behind, said truthfully); nothing below ``gradsae.cli``
imports ``argparse``.

Under ``torchrun --nproc_per_node N -m gradsae ...`` every rank runs the command
(see :mod:`gradsae.distributed`); rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import typing
from collections.abc import Sequence

from gradsae import distributed
from gradsae.cli.common import quiet_libraries
from gradsae.errors import GradSAEError

COMMANDS = {
    "score": ("score", "rank a prompt's SAE latents by GradSAE and by activation"),
    "train-sae": ("train_sae", "train TopK SAEs on a model's residual stream"),
    "eval-sae": ("eval_sae", "evaluate SAEs on held-out news, chat prompts and generated text, and task accuracy"),
    "reproduce": ("reproduce", "run the paper's two experiments and write tables and plots"),
    "report": ("report", "re-render a run's table and plots from its results.json"),
    "cards": ("cards", "feature cards: a latent's top contexts by activation and influence, logit lens, density"),
    "sweep": ("sweep", "reproduce over tasks x layers and write one consolidated sweep.md"),
    "steer": ("steer", "steer generation toward a concept with latents each selector picks, at matched strength"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradsae`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries(args.verbose)
    if hasattr(args, "device"):
        args.device = distributed.device_for(args.device)  # under torchrun: this rank's GPU
    try:
        distributed.init(getattr(args, "device", "cpu"))
        code = int(args.module.run(args))
        distributed.finish()
        return code
    except GradSAEError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"interrupted: {args.module.interrupted(args)}\n")
        return 130


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line naming the fix (``--help``)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {self.prog}: {message}: see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``gradsae`` parser with one subparser per command module."""
    parser = OneLineParser(prog="gradsae", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and progress bars")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"gradsae.cli.{module_name}")
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(module=module)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
