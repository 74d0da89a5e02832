"""The committed steering report and the results page's steering paragraph follow from ``steering.json``."""

from __future__ import annotations

import json
from pathlib import Path

from gradsae.experiments.results import SteerResult
from gradsae.report.concepts import headline, markdown

ROOT = Path(__file__).resolve().parents[2]
RESULT = ROOT / "docs" / "results" / "steering" / "steering.json"


def _readme_section() -> str:
    text = (ROOT / "docs" / "results" / "README.md").read_text()
    start = text.index("## Steering open-ended generation")
    return text[start : text.index("\n## ", start + 1)]


def test_report_and_readme_are_generated_from_the_committed_json():
    section = " ".join(_readme_section().split())
    if not RESULT.is_file():  # no run of this protocol committed: the README must not claim a result
        assert "has no answer under this protocol yet" in section
        return
    result = SteerResult.load(RESULT)
    assert " ".join(headline(result).split()) in section
    doc = ROOT / "docs" / "results" / "steering.md"
    assert doc.read_text() == markdown(result, plot_path="steering/steering.png")


def test_the_earlier_protocol_is_kept_and_labelled():
    page = ROOT / "docs" / "results" / "earlier_protocol" / "steering.md"
    assert "Earlier protocol, superseded" in page.read_text()
    assert "cells" not in json.loads((page.parent / "steering" / "steering.json").read_text())
