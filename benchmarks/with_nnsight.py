"""GradSAE scoring written with nnsight, the library a user would reach for, against ``score_latents``.

The nnsight version is what its documented gradient pattern gives: inside
``model.trace``, encode the block-``l`` output into dense latents ``H``, make
them require grad, write ``decode(H) + sg(Z - decode(H))`` back (the library's
``error`` mode), read the logits, and in ``with Y.sum().backward():`` save
``H.grad`` (dense, ``[batch, pos, d_sae]``); then ``mean_n relu(H * H.grad)``.

Importing nnsight replaces ``torch.Tensor.backward`` for the whole process, so
this runs in a child process (``python -m benchmarks.with_nnsight``); there the
two are timed interleaved on the same batch, ``score_latents`` with the original
``backward`` put back around each call, and their scores are compared. ``--wide`` uses a random
131,072-latent TopK SAE instead of the benchmark's, where the dense gradient
costs most.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    WIDE,
    WIDE_K,
    Figure,
    Timing,
    child_parser,
    compare,
    load_sae,
    set_threads,
    text_batch,
    wide_sae,
)
from benchmarks.reference import spliced_positions
from gradsae.models import LoadedModel, position_ids
from gradsae.objectives import NextTokenProb
from gradsae.sae import SAE


def nnsight_scores(net: Any, sae: SAE, ids: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
    """``[batch, d_sae]`` paper-aggregated GradSAE scores, computed through nnsight."""
    valid = spliced_positions(mask)[:, :, None]
    w_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
    block = net.model.layers[layer]
    with net.trace(
        input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False, logits_to_keep=1
    ):
        z = block.output
        with torch.no_grad():
            h = sae.encode(z) * valid
        h.requires_grad_(True)
        recon = h @ w_dec + b_dec
        block.output = torch.where(valid, recon + (z - recon).detach(), z)
        y = NextTokenProb()(net.lm_head.output, ids)
        with y.sum().backward():
            grad = h.grad.save()
        latents = h.detach().save()
    return (latents * grad).clamp(min=0).sum(dim=1) / valid.sum(dim=1).clamp(min=1)


@contextmanager
def plain_backward(original: Any) -> Iterator[None]:
    """Undo nnsight's ``torch.Tensor.backward`` replacement for the body."""
    patched = torch.Tensor.backward
    torch.Tensor.backward = original  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.backward = patched  # type: ignore[method-assign]


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Time ``score_latents`` (nnsight's patch undone) and the nnsight version, interleaved."""
    from benchmarks.core import gradsae_scores
    from gradsae.models import load_model

    set_threads(args.threads)
    lm: LoadedModel = load_model(args.model)
    sae = wide_sae(lm.d_model, args.layer) if args.wide else load_sae(lm, args.sae, args.layer, args.model)[0]
    ids, mask = text_batch(lm.tokenizer, args.batch, args.seq)
    original = torch.Tensor.backward
    from nnsight import NNsight

    net = NNsight(lm.model)
    out: dict[str, Any] = {}

    def ours() -> None:
        with plain_backward(original):
            out["ours"] = gradsae_scores(lm, sae, ids, mask, args.layer).per_latent

    def theirs() -> None:
        out["nnsight"] = nnsight_scores(net, sae, ids, mask, args.layer)

    times = compare({"ours": ours, "nnsight": theirs}, args.repeats)
    diff = float((out["ours"] - out["nnsight"]).abs().max())
    scale = float(out["ours"].abs().max().clamp(min=1e-30))
    runs = {"ours_s": list(times["ours"].runs), "nnsight_s": list(times["nnsight"].runs)}
    return {**runs, "max_rel_score_diff": diff / scale}


def speedup_vs_nnsight(root: Path, *, wide: bool = False, **kwargs: Any) -> Figure:
    """nnsight time / ours (``_131k``: with a random wide SAE), or ``unavailable`` with the reason."""
    name = "speedup_vs_nnsight_131k" if wide else "speedup_vs_nnsight"
    if importlib.util.find_spec("nnsight") is None:
        return Figure(name, None, detail="nnsight is not installed: pip install nnsight")
    cmd = [sys.executable, "-m", "benchmarks.with_nnsight"] + (["--wide"] if wide else [])
    for key, value in kwargs.items():
        if value is not None:
            cmd += [f"--{key}", str(value)]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Figure(name, None, detail=f"nnsight could not run this model: {last}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ours, theirs = Timing(tuple(result["ours_s"])).median, Timing(tuple(result["nnsight_s"])).median
    sae = f"random topk SAE d_sae={WIDE} k={WIDE_K}" if wide else "the benchmark's SAE"
    detail = (
        f"nnsight {theirs:.3f} s / ours {ours:.3f} s, {sae} (interleaved, in a child process), "
        f"max relative score difference {result['max_rel_score_diff']:.1e}"
    )
    return Figure(name, theirs / ours, detail=detail, extra=result)


def main() -> None:
    parser = child_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--wide", action="store_true", help=f"a random {WIDE}-latent SAE instead")
    print(json.dumps(child(parser.parse_args())))


if __name__ == "__main__":
    main()
