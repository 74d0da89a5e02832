"""Ship newly trained SAEs at the default path, keeping the replaced ones loadable by name.

    python scripts/ship_saes.py --run /work/runs/saes/k64 --name k64 [--model-folder smollm2-135m-instruct]

For each ``layer_<l>`` of the run: the SAE shipped now at ``src/gradsae/saes/<folder>/layer_<l>/``
moves to ``<folder>/<old name>/layer_<l>/`` (the name :data:`gradsae.pretrained.SHIPPED_VERSIONS`
pins its weights under, e.g. ``k32``; a moved SAE must match its pinned digest), and the run's
files take its place. Prints the ``SHIPPED_VERSIONS`` entry to add for ``--name``, so
``--sae shipped:<name>`` keeps loading these after they are replaced in turn. Run it only
after ``train-sae`` finished and ``eval-sae`` passed.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gradsae.pretrained import SHIPPED_FOLDER, SHIPPED_VERSIONS  # noqa: E402

FILES = ("cfg.json", "sae_weights.safetensors", "README.md", "eval.json", "saebench_core.json")
NEEDED = FILES[:3]


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "sae_weights.safetensors").read_bytes()).hexdigest()


def ship(run: Path, saes: Path, versions: dict[str, dict[int, str]]) -> dict[int, str]:
    """Move each shipped layer the run replaces into its named folder, copy the run's in; return the new digests."""
    layers = sorted(int(p.name.removeprefix("layer_")) for p in run.glob("layer_*") if p.name[6:].isdigit())
    if not layers:
        raise SystemExit(f"error: {run} holds no layer_<l> folders: train first (gradsae train-sae --out {run})")
    for layer in layers:
        missing = [name for name in NEEDED if not (run / f"layer_{layer}" / name).is_file()]
        if missing:
            raise SystemExit(f"error: {run}/layer_{layer} lacks {missing[0]}: let train-sae finish first")
    moves = {}
    for layer in layers:
        current = saes / f"layer_{layer}"
        if not (current / "sae_weights.safetensors").is_file():
            continue
        name = next((v for v, by_layer in versions.items() if by_layer.get(layer) == digest(current)), None)
        if name is None:
            raise SystemExit(f"error: {current} is no pinned version: add it to SHIPPED_VERSIONS first")
        moves[layer] = (current, saes / name / f"layer_{layer}")
    for current, target in moves.values():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(current), str(target))
    new = {}
    for layer in layers:
        (saes / f"layer_{layer}").mkdir(parents=True)
        for name in FILES:
            if (run / f"layer_{layer}" / name).is_file():
                shutil.copy2(run / f"layer_{layer}" / name, saes / f"layer_{layer}" / name)
        new[layer] = digest(saes / f"layer_{layer}")
    return new


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="train-sae --out folder (layer_<l>/ inside)")
    parser.add_argument("--name", required=True, help="version name for the new SAEs, e.g. k64")
    parser.add_argument("--model-folder", default=SHIPPED_FOLDER, help="folder under src/gradsae/saes/")
    args = parser.parse_args(argv)
    folder = args.model_folder
    new = ship(Path(args.run), ROOT / "src" / "gradsae" / "saes" / folder, SHIPPED_VERSIONS.get(folder, {}))
    print(f'add to SHIPPED_VERSIONS["{folder}"]: "{args.name}": {dict(sorted(new.items()))!r},')  # noqa: T201


if __name__ == "__main__":
    main()
