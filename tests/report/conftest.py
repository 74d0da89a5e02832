"""Fixtures only: the report tests read the tiny run folder the experiments tests build."""

from tests.experiments.conftest import five_methods, tiny_run

__all__ = ["five_methods", "tiny_run"]
