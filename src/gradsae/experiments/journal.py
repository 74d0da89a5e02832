"""A run's journal: each finished unit of work in its own small file, so a killed run resumes.

Layout under the run's folder::

    journal/run.json          {"fingerprint": F, "config": {...}}   what the run is
    journal/<key>.json        {"key", "fingerprint": F, "sha256", "value"}   one finished unit

A unit (one layer's result, one masking or steering condition) is a JSON-able
dict written atomically (:func:`gradsae._files.write_text`: a temporary file,
``fsync``, rename), so after ``kill -9`` each entry is whole or absent. ``F`` is
the SHA-256 of the run's canonical config (:func:`fingerprint`); ``sha256`` is
that of the value's canonical JSON, so an entry damaged on disk is recomputed,
never trusted. Opening a journal whose ``F`` differs refuses to mix two runs.

Values come back through JSON both when read from disk and when just computed
(:meth:`Journal.put` returns the stored value), so a resumed run and an
uninterrupted one assemble their results from the same data, byte for byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradsae import _files
from gradsae.errors import GradSAEError

log = logging.getLogger(__name__)

FOLDER = "journal"
RUN = "run.json"
VERSION = 1


def canonical(value: Any) -> str:
    """Compact JSON with sorted keys: the text that fingerprints and checksums hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)


def fingerprint(config: dict[str, Any]) -> str:
    """SHA-256 of ``config`` in canonical JSON (with the journal format's version)."""
    return hashlib.sha256(canonical({"journal": VERSION, **config}).encode()).hexdigest()


def unit_key(*parts: object) -> str:
    """A file-name-safe key from parts, e.g. ``unit_key(6, "masking", "gradsae", "top", "50%")``."""
    text = "-".join(str(part) for part in parts)
    return "".join(ch if ch.isalnum() or ch in "-_.%" else "_" for ch in text)


@dataclass(frozen=True)
class Journal:
    """Finished units of one run, keyed by :func:`unit_key`; see the module docstring."""

    folder: Path
    """``<out>/journal``."""
    fingerprint: str
    """The run's config fingerprint; entries with another are ignored."""
    writes: bool = True
    """Write entries; ``False`` on the ranks of a torchrun run other than 0 (they only read)."""

    @classmethod
    def open(cls, out: str | Path, config: dict[str, Any], *, writes: bool = True) -> Journal:
        """The journal of ``config`` in ``<out>/journal``: new, or an earlier run's of the same config."""
        folder = Path(out) / FOLDER
        mark = fingerprint(config)
        if (folder / RUN).is_file():
            _check_same_run(folder / RUN, mark, config)
        elif writes:
            _files.write_json(folder / RUN, {"fingerprint": mark, "config": config})
        return cls(folder=folder, fingerprint=mark, writes=writes)

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored value of ``key``, or ``None`` when absent (or damaged: then it is recomputed)."""
        path = self.folder / f"{key}.json"
        if not path.is_file():
            return None
        try:
            entry = _files.read_json(path)
            value = entry["value"]
            good = entry["fingerprint"] == self.fingerprint and entry["sha256"] == _checksum(value)
        except (ValueError, KeyError, TypeError, OSError):
            good = False
        if not good:
            log.warning("journal entry %s is damaged or from another run: recomputing it", path)
            return None
        return dict(value)

    def put(self, key: str, value: dict[str, Any]) -> dict[str, Any]:
        """Store ``value`` under ``key`` atomically; return it as read back (JSON round trip)."""
        stored = json.loads(json.dumps(value))
        if self.writes:
            entry = {"key": key, "fingerprint": self.fingerprint, "sha256": _checksum(stored), "value": stored}
            _files.write_text(self.folder / f"{key}.json", json.dumps(entry) + "\n")
        return dict(stored)

    def __len__(self) -> int:
        return count_units(self.folder.parent)


def count_units(out: str | Path) -> int:
    """Finished units journaled in ``<out>/journal``."""
    folder = Path(out) / FOLDER
    return sum(1 for path in folder.glob("*.json") if path.name != RUN) if folder.is_dir() else 0


def recall(journal: Journal | None, key: str) -> dict[str, Any] | None:
    """``journal.get(key)``, or ``None`` without a journal."""
    return None if journal is None else journal.get(key)


def record(journal: Journal | None, key: str, result: Any) -> dict[str, Any]:
    """A dataclass ``result`` as a dict, stored under ``key`` when there is a journal."""
    value = dataclasses.asdict(result)
    return value if journal is None else journal.put(key, value)


def _checksum(value: Any) -> str:
    return hashlib.sha256(canonical(value).encode()).hexdigest()


def _check_same_run(path: Path, mark: str, config: dict[str, Any]) -> None:
    try:
        saved = _files.read_json(path)
        same, before = saved["fingerprint"] == mark, saved.get("config", {})
    except (ValueError, KeyError, TypeError, OSError):
        same, before = False, {}
    if same:
        return
    config = json.loads(canonical(config))
    differs = next((key for key in sorted(set(config) | set(before)) if config.get(key) != before.get(key)), None)
    detail = f" ({differs}: {_short(before.get(differs))} there, {_short(config.get(differs))} now)" if differs else ""
    raise GradSAEError(
        f"{path.parent.parent} holds a run with another configuration{detail}: rerun that run's command to "
        "continue it, or add --restart to discard it and start fresh, or choose another --out"
    )


def _short(value: Any) -> str:
    text = canonical(value)
    return text if len(text) <= 40 else text[:37] + "..."
