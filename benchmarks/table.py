"""``results.md``: every figure of a benchmark run as one markdown table (value, floor, target, met).

``python -m benchmarks.table [benchmarks/results.json]`` prints it; ``benchmarks/run.py``
writes it next to its JSON (``--out`` with ``.md``), and ``scripts/sync_readme.py`` copies it into
``docs/results/README.md`` (so the table is written from a run, never typed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def markdown(report: dict[str, Any]) -> str:
    """The figures of one ``results.json`` as a markdown table, with the machine and the load it ran under."""
    machine = report.get("machine", {})
    lines = [
        f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('torch_threads')} torch threads, "
        f"torch {machine.get('torch')}; load average at start {report.get('load_average_at_start')}; "
        f"{report.get('total_s')} s; finished {report.get('finished_utc')}",
        "",
        "| figure | value | floor (what it is measured against) | target | met |",
        "|---|---:|---|---|---|",
    ]
    for name, fig in report.get("figures", {}).items():
        value = "unavailable" if fig.get("value") is None else f"{fig['value']:.3g}"
        target = "-" if fig.get("target") is None else f"{fig.get('better', '<=')} {fig['target']:.3g}"
        met = {True: "yes", False: "**no**", None: "-"}[fig.get("met")]
        lines.append(f"| `{name}` | {value} | {_cell(fig.get('floor') or '-')} | {target} | {met} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results.json")
    sys.stdout.write(markdown(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
