"""Assembling a chunked GGUF from package data files: order, checksum, no partial file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gradsae import embedded
from gradsae.errors import GradSAEError


def _fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunks: list[bytes]) -> None:
    paths = []
    for i, data in enumerate(chunks):
        path = tmp_path / f"part{i}"
        path.write_bytes(data)
        paths.append(path)
    lookup = dict(zip([r for _, r in embedded.GEMMA_PARTS], paths, strict=True))
    monkeypatch.setattr(embedded, "package_file", lambda package, relative, install: lookup[relative])


def test_chunks_assemble_in_order_and_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"GGUF", b"-one", b"-two", b"-end"]
    _fake_parts(tmp_path, monkeypatch, chunks)
    monkeypatch.setattr(embedded, "GEMMA_SHA256", hashlib.sha256(b"".join(chunks)).hexdigest())
    out = embedded.gemma_gguf(tmp_path / "cache")
    assert out.read_bytes() == b"GGUF-one-two-end"
    assert embedded.gemma_gguf(tmp_path / "cache") == out  # cached, checked again


def test_a_wrong_checksum_is_refused_and_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_parts(tmp_path, monkeypatch, [b"GGUF", b"x", b"y", b"z"])
    with pytest.raises(GradSAEError, match="sha256"):
        embedded.gemma_gguf(tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_a_missing_package_names_the_install() -> None:
    with pytest.raises(GradSAEError, match="not installed"):
        embedded.package_file("no-such-package-gradsae", "x", "pip install it")
