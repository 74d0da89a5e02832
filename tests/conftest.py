"""Fixtures only: the tiny model and batch of :mod:`tests.helpers`, a seed and one thread per test."""

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


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    """Every test starts from seed 0 on one intra-op thread (tiny tensors; the CPU is shared)."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
