"""Fixtures only: the tiny model and batch of :mod:`tests.helpers`, a seed per test and one thread per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from gradsae.models import LoadedModel
from tests.helpers import padded_batch, tiny_lm


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run slow tests (the real embedded model, kill -9 loops)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """One intra-op thread for the whole session, set before any module fixture runs.

    Module fixtures (a sweep, a trained SAE) are built before function fixtures; with a
    per-test thread count they ran on every core while the test that compares against
    them ran on one, and multi-threaded reductions differ in the last bit.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from seed 0 (tiny tensors; the CPU is shared)."""
    torch.manual_seed(0)


@pytest.fixture
def lm() -> LoadedModel:
    return tiny_lm()


@pytest.fixture
def lm64() -> LoadedModel:
    return tiny_lm(torch.float64)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded rows: lengths 10 and 7."""
    return padded_batch()
