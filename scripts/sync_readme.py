"""Write the result blocks of the README (and ``docs/results/README.md``) from the committed result files.

So neither page can drift from them. Each block sits between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` in exactly one of :data:`DOCUMENTS` and is rebuilt from files that the report
code or the benchmark wrote:

* ``demo``: the summary sentences of ``docs/results/demo_sst2_layer6/summary.md`` and the
  experiment-1 table of its ``table.md``;
* ``paper``: the summary sentences of ``docs/results/paper_sst2_layer6/summary.md``;
* ``sweep``: the run's command and SAEs (:func:`run_line`, from ``docs/results/sweep/sweep.md``) and the
  experiments' summary sentences of ``docs/results/sweep/summary.md`` (the per-cell faithfulness
  sentences stay on that page);
* ``paper15``: the same for ``docs/results/paper_sweep_layer15/`` (the paper-exact preset on the sweep's
  tasks at layer 15);
* ``estimators``: the summary sentences of ``docs/results/sweep/estimators.md`` (which estimator to trust);
* ``steering``: the answer paragraph of ``docs/results/steering.md`` (``gradsae steer``, its JSON and plot in
  ``docs/results/steering/``);
* ``bench``: the table of ``benchmarks/results.md`` (``make bench``);
* ``bench_summary``: one line from ``benchmarks/results.json``: how many targets the committed run met, and
  each missed figure with its value and target.

The README keeps the demo, the sweep, the estimators and the benchmark's line; the paper-exact preset,
steering and the benchmark's table are in ``docs/results/README.md``.

    python scripts/sync_readme.py           # rewrite the blocks
    python scripts/sync_readme.py --check   # exit 1 (naming the page) if a block differs from its files
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCUMENTS = (README, ROOT / "docs" / "results" / "README.md")
"""The pages that hold result blocks; each block is in exactly one of them."""


def summary_bullets(path: Path, *, prefixes: tuple[str, ...] = ("- ",)) -> str:
    """The bullet lines (those starting with one of ``prefixes``) under the first ``## Summary`` heading."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## Summary"))
    bullets = []
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith(prefixes):
            bullets.append(line)
    return "\n".join(bullets)


def first_table_after(path: Path, heading: str) -> str:
    """The first markdown table after the line starting with ``heading``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return "\n".join(rows)


def demo() -> str:
    folder = ROOT / "docs" / "results" / "demo_sst2_layer6"
    table = first_table_after(folder / "table.md", "### Experiment 1")
    return f"{table}\n\n{summary_bullets(folder / 'summary.md')}"


def paper() -> str:
    return summary_bullets(ROOT / "docs" / "results" / "paper_sst2_layer6" / "summary.md")


EXPERIMENT_LINES = ("- Experiment", "- Control", "- Random")
"""The summary lines of the two experiments (a sweep's per-cell faithfulness lines stay on its page)."""


def run_line(sweep_md: Path) -> str:
    """``Run: `command`; SAEs: ...``, from a sweep page's command line and its per-task SAE lines.

    Each layer's SAE is named once (its description as the page gives it, sha256 included); a layer whose
    tasks ran with different SAEs lists each. So the README says which SAEs its numbers came from, and a
    rerun with other SAEs rewrites it (the sentence was typed by hand before).
    """
    text = sweep_md.read_text(encoding="utf-8")
    command = re.search(r"^Command[^`]*`([^`]+)`", text, re.M)
    per_layer: dict[int, list[str]] = {}
    for saes in re.findall(r"; SAEs: (.+)$", text, re.M):
        for part in re.split(r"; (?=layer \d+: )", saes):
            layer, _, desc = part.partition(": ")
            found = per_layer.setdefault(int(layer.removeprefix("layer ")), [])
            if desc not in found:
                found.append(desc)
    sae_text = "; ".join(f"layer {layer}: {' / '.join(descs)}" for layer, descs in sorted(per_layer.items()))
    return f"Run: `{command.group(1) if command else '?'}`; SAEs: {sae_text or '?'}."


def sweep_block(folder: Path, how: str) -> str:
    """A sweep folder's :func:`run_line` (when its ``sweep.md`` is committed) and its experiments' summary lines."""
    bullets = summary_bullets_or(folder / "summary.md", how, prefixes=EXPERIMENT_LINES)
    return f"{run_line(folder / 'sweep.md')}\n\n{bullets}" if (folder / "sweep.md").is_file() else bullets


def sweep() -> str:
    return sweep_block(ROOT / "docs" / "results" / "sweep", "run `gradsae sweep`")


def paper15() -> str:
    return sweep_block(ROOT / "docs" / "results" / "paper_sweep_layer15", "run `gradsae sweep --paper --layers 15`")


def estimators() -> str:
    return summary_bullets_or(
        ROOT / "docs" / "results" / "sweep" / "estimators.md", "run the sweep with `--methods` and curves"
    )


def summary_bullets_or(path: Path, how: str, *, prefixes: tuple[str, ...] = ("- ",)) -> str:
    """:func:`summary_bullets` of ``path``, or a line saying it is not committed yet and ``how`` to make it."""
    if not path.is_file():
        return f"(no `{path.relative_to(ROOT)}` yet: {how})"
    return summary_bullets(path, prefixes=prefixes)


def paragraph_after(path: Path, heading: str) -> str | None:
    """The first paragraph (non-blank lines) after the line ``heading``, or ``None`` when there is no such line."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    if heading not in lines:
        return None
    rest = lines[lines.index(heading) + 1 :]
    first = next((i for i, line in enumerate(rest) if line.strip()), len(rest))
    end = next((i for i in range(first, len(rest)) if not rest[i].strip()), len(rest))
    return "\n".join(rest[first:end])


def steering() -> str:
    path = ROOT / "docs" / "results" / "steering.md"
    answer = paragraph_after(path, "## Answer")
    if answer is None:
        return f"(`{path.relative_to(ROOT)}` has no answer under this protocol yet: run `gradsae steer`)"
    return answer


def bench() -> str:
    path = ROOT / "benchmarks" / "results.md"
    if not path.is_file():
        return "(no `benchmarks/results.md` yet: run `make bench`)"
    return path.read_text(encoding="utf-8").strip()


def bench_summary() -> str:
    path = ROOT / "benchmarks" / "results.json"
    if not path.is_file():
        return "(no `benchmarks/results.json` yet: run `make bench`)"
    data = json.loads(path.read_text(encoding="utf-8"))
    judged = {name: f for name, f in data["figures"].items() if f.get("met") is not None}
    missed = [
        f"`{n}` {f['value']:.3g} (target {f['better']} {f['target']:g})" for n, f in judged.items() if not f["met"]
    ]
    when = data.get("finished_utc", "?")
    head = f"The committed run (finished {when}, {data.get('total_s', 0):.0f} s) meets {len(judged) - len(missed)} of"
    return f"{head} {len(judged)} targets; missed: {', '.join(missed) if missed else 'none'}."


BLOCKS: dict[str, Callable[[], str]] = {
    "demo": demo,
    "paper": paper,
    "sweep": sweep,
    "paper15": paper15,
    "estimators": estimators,
    "steering": steering,
    "bench": bench,
    "bench_summary": bench_summary,
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(f"<!-- {name}:start -->") + ".*?" + re.escape(f"<!-- {name}:end -->"), re.S)


def placement(texts: dict[Path, str]) -> dict[str, Path]:
    """Which page holds each block; refuses a block that is in none or in several of them."""
    where: dict[str, Path] = {}
    for name in BLOCKS:
        pages = [path for path, text in texts.items() if _pattern(name).search(text)]
        if len(pages) != 1:
            found = ", ".join(str(p.relative_to(ROOT)) for p in pages) or "none"
            raise SystemExit(f"block {name} must be in exactly one of the pages (found in: {found})")
        where[name] = pages[0]
    return where


def synced(text: str, names: tuple[str, ...]) -> str:
    """``text`` with each block of ``names`` rebuilt."""
    for name in names:
        block = f"<!-- {name}:start -->\n{BLOCKS[name]()}\n<!-- {name}:end -->"
        text = _pattern(name).sub(lambda _match, block=block: block, text)
    return text


def synced_pages() -> dict[Path, tuple[str, str]]:
    """Each page: (its text now, its text with its blocks rebuilt)."""
    texts = {path: path.read_text(encoding="utf-8") for path in DOCUMENTS}
    where = placement(texts)
    return {path: (text, synced(text, tuple(n for n, p in where.items() if p == path))) for path, text in texts.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if a block is stale")
    args = parser.parse_args()
    stale = []
    for path, (text, new) in synced_pages().items():
        if new == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"{', '.join(map(str, stale))}: a result block differs from its files: run python scripts/sync_readme.py")  # noqa: T201
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
