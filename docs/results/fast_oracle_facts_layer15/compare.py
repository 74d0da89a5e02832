"""Compare the curves sections of before/ and after/ results.json (issue 21's real cell); print the times."""

import json, math, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent


def curves(folder):
    data = json.loads((root / folder / "results.json").read_text())
    return [layer.get("curves") for layer in data["layers"]]


def walk(a, b, path, out):
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            walk(a.get(k), b.get(k), f"{path}.{k}", out)
    elif isinstance(a, list):
        if len(a) != len(b):
            out.append((path, "length", len(a), len(b)))
        for i, (x, y) in enumerate(zip(a, b)):
            walk(x, y, f"{path}[{i}]", out)
    elif isinstance(a, float) and isinstance(b, float):
        if not (a == b or (math.isnan(a) and math.isnan(b))):
            out.append((path, abs(a - b), a, b))
    elif a != b:
        out.append((path, "value", a, b))


def times(log):
    text = (root / log).read_text()
    wall = re.search(r"Elapsed \(wall clock\) time.*: (.+)", text)
    user = re.search(r"User time \(seconds\): (.+)", text)
    syst = re.search(r"System time \(seconds\): (.+)", text)
    return wall and wall.group(1), user and float(user.group(1)) + float(syst.group(1))


for side in ("before", "after"):
    log = root / f"{side}.log"
    print(
        side,
        "wall, cpu s:",
        times(log.name) if log.is_file() else json.loads((root / side / "timing.json").read_text()),
    )
before, after = curves("before"), curves("after")
diffs = []
walk(before, after, "curves", diffs)
print(f"{len(diffs)} differing entries in the curves sections")
numeric = [d for d in diffs if isinstance(d[1], float)]
if numeric:
    print("largest numeric difference:", max(numeric, key=lambda d: d[1]))
for d in diffs[:40]:
    print(" ", d)
