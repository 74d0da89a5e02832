"""``table.md``: the same results give the same bytes, whatever order a dict was filled in."""

from __future__ import annotations

import dataclasses

from gradsae.experiments.results import RunResults
from gradsae.report.tables import table_markdown


def test_overlap_rows_do_not_depend_on_dict_order(tiny_run, tmp_path):
    layer = tiny_run.results.layers[0]
    assert len(layer.overlap) > 1
    backwards = dataclasses.replace(layer, overlap=dict(reversed(list(layer.overlap.items()))))
    meta = tiny_run.results.config
    assert table_markdown([backwards], meta) == table_markdown([layer], meta)
    reread = RunResults.load(tiny_run.results.save(tmp_path))  # results.json sorts its keys
    assert table_markdown(reread.layers, meta) == table_markdown([layer], meta)
