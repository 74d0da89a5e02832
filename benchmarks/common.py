"""Shared pieces of the benchmark: side-by-side timing, inputs, figures, machine facts.

Timing: each function runs once as a warm-up, then ``repeats`` times, the
functions of one comparison interleaved (A, B, A, B, ...) so that a change in
machine load hits both alike; a figure uses the median of each. The slow
baselines (the reference pipeline, exact ablation) take fewer repeats and no
warm-up: one run of them lasts many seconds.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gradsae.models import LoadedModel
    from gradsae.sae import SAE

PASSAGE = (
    "The river town woke slowly. Fishermen pushed their boats into the grey water while the baker "
    "opened the shutters and set the first loaves on the sill to cool. Children ran along the quay, "
    "counting the gulls, and an old man read yesterday's newspaper on the bench by the church. "
    "At nine the ferry sounded its horn, and the market filled with voices: the price of apples had "
    "risen again, the mayor had promised a new bridge, and nobody believed him. By noon the sun had "
    "burned off the fog, and the hills beyond the river showed green and gold. In the library the "
    "clerk catalogued a box of letters found in an attic, written a century ago by a sailor to his "
    "sister. He described storms off the southern cape, a fever that took half the crew, and a port "
    "where the houses were painted blue. Each letter ended the same way: tell mother I am well. "
    "The clerk read them twice, then wrote to the museum in the capital, asking whether anyone "
    "remembered a ship called the Heron. Scientists measure the temperature of the ocean with "
    "floats that drift for years, diving to two thousand metres and rising again to send their data "
    "by satellite. Their records show that the upper layers have warmed steadily, and that the heat "
    "spreads slowly downward. A recipe for bread needs only flour, water, salt and yeast, but the "
    "baker will tell you that time is the fifth ingredient: a slow rise in a cool room gives a "
    "better crumb than a quick one in a warm kitchen."
)
"""Plain English text that the timing batches are cut from."""

WIDE = 131072
WIDE_K = 64
"""The wide SAE of the memory and nnsight figures: random, TopK, Gemma Scope's 131k width."""
WIDEST = 1 << 20
"""The widest SAE (1,048,576 latents, TopK ``WIDE_K``): 2.4 GB of float32 decoder, encoder tied to it."""

SHORT_PROMPTS = (
    "The Eiffel Tower stands in Paris, the capital and largest city of",
    "Water boils at one hundred degrees Celsius at sea level, and it freezes at",
)
"""Prompts for the exact-ablation comparison (kept short: ablation costs one forward per active latent)."""


# -- timing ---------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Wall times of one function (seconds)."""

    runs: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


def compare(
    fns: dict[str, Callable[[], Any]], repeats: int | dict[str, int], *, warmup: int | dict[str, int] = 1
) -> dict[str, Timing]:
    """Time each function ``repeats`` times after ``warmup`` runs, interleaved; both may be set per function."""
    counts = repeats if isinstance(repeats, dict) else dict.fromkeys(fns, repeats)
    warm = warmup if isinstance(warmup, dict) else dict.fromkeys(fns, warmup)
    for name, fn in fns.items():
        for _ in range(warm.get(name, 1)):
            fn()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(max(1, *counts.values())):
        for name, fn in fns.items():
            if round_ < max(1, counts[name]):
                start = time.perf_counter()
                fn()
                runs[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(values)) for name, values in runs.items()}


# -- figures --------------------------------------------------------------------
@dataclass
class Figure:
    """One reported number, its target and how it was obtained."""

    name: str
    value: float | None
    target: float | None = None
    better: str = "<="
    """``<=``: lower is better (a cost); ``>=``: higher is better (a speedup)."""
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    floor: str = ""
    """What the value is measured against (a ratio's denominator, timed in the same run), in words."""

    @property
    def met(self) -> bool | None:
        if self.value is None or self.target is None:
            return None
        return self.value <= self.target if self.better == "<=" else self.value >= self.target

    def line(self) -> str:
        """``name: value | floor: ... | target: ... | met: ...`` and the detail."""
        floor = self.floor or "-"
        if self.value is None:
            return f"{self.name}: unavailable | floor: {floor} | target: {self._target()} | met: - ({self.detail})"
        met = "-" if self.met is None else "yes" if self.met else "NO"
        text = f"{self.name}: {self.value:.3g} | floor: {floor} | target: {self._target()} | met: {met}"
        return text + (f"  [{self.detail}]" if self.detail else "")

    def _target(self) -> str:
        return "none (reported)" if self.target is None else f"{self.better} {self.target:.3g}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "floor": self.floor,
            "target": self.target,
            "better": self.better,
            "met": self.met,
            "detail": self.detail,
            **self.extra,
        }


def ratio_figure(
    name: str, num: Timing, den: Timing, target: float | None, better: str, detail: str, floor: str = ""
) -> Figure:
    """``median(num) / median(den)`` with both medians and all runs kept; ``floor`` names the denominator."""
    return Figure(
        name=name,
        value=num.median / den.median,
        target=target,
        better=better,
        detail=detail,
        extra={"numerator_s": num.median, "denominator_s": den.median, "runs_s": [list(num.runs), list(den.runs)]},
        floor=floor or f"{den.median:.3g} s",
    )


# -- inputs ---------------------------------------------------------------------
def text_batch(tokenizer: Any, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, seq]`` token ids cut from :data:`PASSAGE` (row ``i`` starts ``i * seq`` tokens in, cyclically)."""
    stream = tokenizer(PASSAGE, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    head = [bos] if bos is not None else []
    width = seq - len(head)
    rows = [head + [stream[(i * width + j) % len(stream)] for j in range(width)] for i in range(batch)]
    ids = torch.tensor(rows, dtype=torch.long)
    return ids, torch.ones_like(ids)


def wide_sae(d_model: int, layer: int, d_sae: int = WIDE) -> Any:
    """A random frozen TopK SAE with ``d_sae`` latents, :data:`WIDE_K` active per token.

    The weights of ``SAE.random(cfg, seed=0)``, built without its transient copies and with
    the encoder stored as a view of the decoder (``W_enc = W_dec.T``: the same values), so a
    1M-latent SAE takes 2.4 GB, not 4.8 GB plus copies.
    """
    import math

    from torch import nn

    from gradsae.sae import SAE, SAEConfig

    cfg = SAEConfig(d_in=d_model, d_sae=d_sae, activation="topk", k=WIDE_K, hook_layer=layer)
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        sae = SAE(cfg)
    w = torch.randn(d_sae, d_model, generator=gen)
    w /= w.norm(dim=-1, keepdim=True)
    sae.W_dec = nn.Parameter(w, requires_grad=False)
    sae.W_enc = nn.Parameter(w.T, requires_grad=False)
    sae.b_enc = nn.Parameter(0.1 * torch.randn(d_sae, generator=gen) / math.sqrt(d_model), requires_grad=False)
    sae.b_dec = nn.Parameter(torch.zeros(d_model), requires_grad=False)
    return sae


# -- machine ---------------------------------------------------------------------
def child_parser(description: str | None) -> argparse.ArgumentParser:
    """The options every benchmark child process takes: model, SAE, layer, batch shape, threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=None)
    parser.add_argument("--sae", default=None)
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    return parser


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (default: the cores this process may run on)."""
    count = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(count)
    return count


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, threads and library versions."""
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    total = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M)
    return {
        "cpu": model.group(1).strip() if model else platform.processor(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(int(total.group(1)) / 2**20, 1) if total else None,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gradsae": _version("gradsae"),
        "nnsight": _version("nnsight"),
    }


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_sae(lm: LoadedModel, sae: str | None, layer: int, model: str | None) -> tuple[SAE, str]:
    """The SAE given, else the shipped one for ``layer`` (or a labelled random SAE); frozen."""
    from gradsae.models import DEFAULT_NAMES
    from gradsae.pretrained import resolve_sae

    loaded, _layer, label = resolve_sae(lm, sae, layer, default_model=model in DEFAULT_NAMES)
    loaded.requires_grad_(False)
    return loaded, label


@contextmanager
def residual_leaves(lm: LoadedModel, layer: int) -> Iterator[list[torch.Tensor]]:
    """Within: the residual after block ``layer`` is made a leaf on every pass (parameters frozen, so a backward
    stops there); yields the list of leaves, one per pass. The reference workloads' stand-in for our splice."""
    from gradsae.models import block_output

    leaves: list[torch.Tensor] = []

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        leaf = block_output(output).detach().requires_grad_(True)
        leaves.append(leaf)
        return (leaf, *output[1:]) if isinstance(output, tuple) else leaf

    handle = lm.layers[layer].register_forward_hook(hook)
    try:
        yield leaves
    finally:
        handle.remove()
