"""``dp_efficiency``: ``gradsae score --prompts`` on two ranks (torchrun, one thread each) against one process.

The workload is a prompt file of :data:`N_PROMPTS` passages cut from the benchmark's
text (about :data:`WORDS` words each, no chat template), scored by the CLI as a user
runs it: ``gradsae score --prompts FILE --no-chat --json OUT``. One process with one
thread, then ``torchrun --standalone --nproc_per_node 2`` with one thread per rank
(``OMP_NUM_THREADS=1``), alternated ``repeats`` times. Each time is the CLI's own
``wall time`` (model load, scoring every prompt, the gather; not Python's start-up),
and the whole command's wall time is kept beside it::

    dp_efficiency = t(one process) / (2 x t(two ranks))

1.0 is a perfect split; the target is 0.8. Both runs must write the same JSON
(``same_results``), as ``tests/test_distributed.py`` checks on a tiny model.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import PASSAGE, Figure

TARGET = 0.8
N_PROMPTS = 16
WORDS = 120
WALL = re.compile(r"wall time ([0-9.]+) s")


def prompt_lines(n: int = N_PROMPTS, words: int = WORDS) -> list[str]:
    """``n`` passages of ``words`` words, each starting ``words // 2`` words after the previous (cyclically)."""
    stream = PASSAGE.split()
    return [" ".join(stream[(i * words // 2 + j) % len(stream)] for j in range(words)) for i in range(n)]


def _run(cmd: list[str], root: Path) -> tuple[float, float]:
    """(the CLI's reported wall time, the command's wall time) of one run, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    env.pop("WORLD_SIZE", None)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    total = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1])
    found = WALL.search(done.stdout)
    if found is None:
        raise RuntimeError("the score report printed no wall time")
    return float(found.group(1)), total


def dp_efficiency(root: Path, *, model: str | None, layer: int, repeats: int, n_prompts: int = N_PROMPTS) -> Figure:
    """Time one process and two torchrun ranks on the same prompt file; the efficiency and the identity check."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prompts = folder / "prompts.txt"
        prompts.write_text("\n".join(prompt_lines(n_prompts)) + "\n")
        args = ["score", "--prompts", str(prompts), "--no-chat", "--layer", str(layer), "--top", "10"]
        args += ["--model", model] if model else []
        one_cmd = [sys.executable, "-m", "gradsae", *args, "--json", str(folder / "one.json")]
        two_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        two_cmd += ["-m", "gradsae", *args, "--json", str(folder / "two.json")]
        runs: dict[str, list[tuple[float, float]]] = {"one": [], "two": []}
        try:
            for _ in range(max(1, repeats)):
                runs["one"].append(_run(one_cmd, root))
                runs["two"].append(_run(two_cmd, root))
        except (RuntimeError, OSError) as exc:
            return Figure("dp_efficiency", None, target=TARGET, better=">=", detail=f"a run failed: {exc}")
        same = (folder / "one.json").read_text() == (folder / "two.json").read_text()
    one = statistics.median(r[0] for r in runs["one"])
    two = statistics.median(r[0] for r in runs["two"])
    whole_one = statistics.median(r[1] for r in runs["one"])
    whole_two = statistics.median(r[1] for r in runs["two"])
    extra: dict[str, Any] = {"same_results": same, "one_s": one, "two_s": two, "runs": runs}
    extra["end_to_end"] = whole_one / (2 * whole_two)
    return Figure(
        "dp_efficiency",
        one / (2 * two) if same else None,
        target=TARGET,
        better=">=",
        floor=f"one process, one thread: {one:.1f} s (x 1/2 for two ranks)",
        detail=f"torchrun 2 ranks x 1 thread {two:.1f} s; {n_prompts} prompts of ~{WORDS} words, "
        f"same JSON: {same}; the whole commands (with Python's start-up): {whole_one:.1f} s / 2 x {whole_two:.1f} s "
        f"= {extra['end_to_end']:.2f}; median of {max(1, repeats)}",
        extra=extra,
    )
