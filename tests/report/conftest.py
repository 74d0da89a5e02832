"""Fixtures only: the report tests read the tiny run folder the experiments tests build."""

from tests.experiments.conftest import tiny_run

__all__ = ["tiny_run"]
