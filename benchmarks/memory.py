"""Peak resident memory of GradSAE scoring over that of the plain forward + backward.

Each measurement runs in a fresh process (``python -m benchmarks.memory``): load
the model and the SAE, build the batch, run the workload once on a 2-token batch
(one-time allocations), return freed heap pages to the kernel
(``malloc_trim``), then take the resident set size as the baseline, reset
the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``), run the
workload once on the real batch and read ``VmHWM``. The figure is the ratio of
the two peaks above their baselines: the working memory of scoring over that of
the plain forward + backward; the weights (model and SAE) are in both baselines.

The children run with ``MALLOC_MMAP_THRESHOLD_=131072``, so that glibc returns
every freed tensor to the kernel and the peak RSS follows the peak of live
tensors. With glibc's defaults the threshold grows after the first large free
and later tensors come from a heap that keeps freed pages: the peak then
depends on allocation history (the same plain forward + backward measured
+365 and +468 MiB in two processes). That ratio is measured too and printed
beside the figure.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

from benchmarks.common import WIDE, WIDE_K, WIDEST, Figure, child_parser, load_sae, set_threads, text_batch, wide_sae

TARGET = 1.2
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}
"""glibc: serve every allocation over 128 KiB by mmap and return it on free (no dynamic threshold)."""


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    assert match, field
    return int(match.group(1))


def _release_free_heap() -> None:
    """Give freed heap pages back to the kernel (glibc), so they do not hide new allocations."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_above_baseline(fn: Any) -> tuple[int, int]:
    """``(baseline RSS, peak RSS - baseline)`` in KiB for one call of ``fn``."""
    gc.collect()
    _release_free_heap()
    baseline = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return baseline, _status_kib("VmHWM") - baseline


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement: ``plain`` or ``gradsae`` with the shipped or a wide random SAE (``--d-sae``)."""
    from benchmarks.core import gradsae_scores, plain_forward_backward
    from gradsae.models import load_model

    set_threads(args.threads)
    lm = load_model(args.model)
    sae = (
        wide_sae(lm.d_model, args.layer, args.d_sae)
        if args.d_sae
        else load_sae(lm, args.sae, args.layer, args.model)[0]
    )
    ids, mask = text_batch(lm.tokenizer, args.batch, args.seq)

    def work(i: Any, m: Any) -> Any:
        if args.which == "plain":
            return plain_forward_backward(lm, i, m, args.layer)
        return gradsae_scores(lm, sae, i, m, args.layer)

    work(ids[:1, :2], mask[:1, :2])
    baseline, peak = peak_above_baseline(lambda: work(ids, mask))
    return {"which": args.which, "d_sae": args.d_sae, "baseline_kib": baseline, "peak_above_baseline_kib": peak}


def measure(
    root: Path,
    *,
    model: str | None,
    sae: str | None,
    layer: int,
    batch: int,
    seq: int,
    threads: int,
    d_sae: int,
    allocator: dict[str, str],
) -> dict[str, Any]:
    """Run :func:`child` for ``plain`` and ``gradsae``, each in a fresh interpreter; their JSON."""
    cmd = [sys.executable, "-m", "benchmarks.memory", "--layer", str(layer), "--batch", str(batch)]
    cmd += ["--seq", str(seq), "--threads", str(threads)]
    cmd += (["--model", model] if model else []) + (["--sae", sae] if sae else []) + ["--d-sae", str(d_sae)]
    env = {**os.environ, **allocator}
    out: dict[str, Any] = {}
    for which in ("plain", "gradsae"):
        done = subprocess.run([*cmd, "--which", which], cwd=root, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory child failed: {done.stderr.strip().splitlines()[-1:]}")
        out[which] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _ratio(result: dict[str, Any]) -> tuple[float, str]:
    plain = result["plain"]["peak_above_baseline_kib"]
    ours = result["gradsae"]["peak_above_baseline_kib"]
    return ours / max(plain, 1), f"+{ours / 1024:.0f} MiB / +{plain / 1024:.0f} MiB"


NAMES = {0: "peak_memory_overhead_shipped", WIDE: "peak_memory_overhead_131k", WIDEST: "peak_memory_overhead_1m"}


def peak_memory_overhead(root: Path, *, d_sae: int, label: str, **kwargs: Any) -> Figure:
    """``peak_memory_overhead_shipped`` (``d_sae=0``), ``_131k``, ``_1m``: live-memory ratio, glibc defaults beside."""
    name = NAMES.get(d_sae, f"peak_memory_overhead_{d_sae}")
    try:
        live = measure(root, d_sae=d_sae, allocator=FIXED_MMAP, **kwargs)
        default = measure(root, d_sae=d_sae, allocator={}, **kwargs)
    except (RuntimeError, OSError, ValueError) as exc:
        return Figure(name, None, detail=f"measurement failed: {exc}")
    value, text = _ratio(live)
    default_value, default_text = _ratio(default)
    sae_text = f"random topk SAE d_sae={d_sae} k={WIDE_K}" if d_sae else label
    baseline = live["gradsae"]["baseline_kib"] / 1024
    detail = (
        f"gradsae / plain fwd+bwd peak above the loaded baseline ({baseline:.0f} MiB): {text} with a fixed mmap "
        f"threshold; with glibc defaults {default_value:.2f} ({default_text}); {sae_text}"
    )
    extra = {"fixed_mmap_threshold": live, "glibc_default": default, "glibc_default_ratio": default_value}
    return Figure(name, value, target=TARGET, detail=detail, extra=extra)


def main() -> None:
    parser = child_parser(__doc__)
    parser.add_argument("--which", choices=["plain", "gradsae"], required=True)
    parser.add_argument("--d-sae", type=int, default=0, help="a random TopK SAE this wide (0: the shipped SAE)")
    print(json.dumps(child(parser.parse_args())))


if __name__ == "__main__":
    main()
