"""Checks of a user task file's rows, so a bad file is one line before any model loads.

A row is refused when its prompt is empty or only whitespace, its answer is
missing, empty or of a kind unlike the other rows' (text, or a list of texts, in
one row; a number or true/false in another), or its ``id`` repeats an earlier row's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradsae.errors import GradSAEError


def check_rows(path: Path, rows: Sequence[dict[str, Any]], prompt: str, answer: str) -> None:
    """Refuse empty prompts, missing or mixed-type answers, and repeated ids."""
    kinds: dict[str, int] = {}
    seen: dict[str, int] = {}
    for number, row in enumerate(rows, 1):
        text = row[prompt]
        if text is None or not str(text).strip():
            raise GradSAEError(
                f"{path} row {number} has an empty prompt in column {prompt!r}: write the text or drop the row"
            )
        kinds.setdefault(_kind(path, number, row[answer], answer), number)
        if len(kinds) > 1:
            (first, at), (other, now) = kinds.items()
            raise GradSAEError(
                f"{path} mixes answer types in column {answer!r} ({first} in row {at}, {other} in row {now}): "
                "write every answer the same way, e.g. as text"
            )
        key = str(row.get("id", number - 1))
        if key in seen:
            raise GradSAEError(
                f"{path} has id {key!r} twice (rows {seen[key]} and {number}): give every example a unique id"
            )
        seen[key] = number


def _kind(path: Path, number: int, value: Any, column: str) -> str:
    """``text`` (a string or a list of them), ``number`` or ``true/false``; refuse a missing or empty answer."""
    if value is None or (isinstance(value, (str, list)) and not [v for v in _items(value) if str(v).strip()]):
        raise GradSAEError(f"{path} row {number} has no answer in column {column!r}: write the gold answer")
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise GradSAEError(f"{path} row {number} lists answers that are not all text: write them as strings")
        return "text"
    if isinstance(value, str):
        return "text"
    raise GradSAEError(f"{path} row {number} has a {type(value).__name__} answer: write it as text")


def _items(value: str | list[Any]) -> list[Any]:
    return value if isinstance(value, list) else [value]
