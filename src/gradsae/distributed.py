"""Data parallel: ``torchrun --nproc_per_node N -m gradsae reproduce|score|steer ...``.

Every rank runs the same command on the same inputs. Work done per item (a
batch of examples, a prompt) is sharded: with ``N`` ranks, rank ``r`` computes
items ``r, r + N, r + 2N, ...``; the per-item results are then gathered on every
rank in item order (``all_gather_object``). Each item is computed exactly as a
single process computes it (whole batches, the same padding), so every number
derived from the gathered results, and the files that rank 0 alone writes, are
those of a single-process run.

Set up from torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) when ``WORLD_SIZE > 1``; the backend follows
the device: NCCL for CUDA (rank ``r`` on ``cuda:LOCAL_RANK``), Gloo otherwise.
Without torchrun every helper is the identity and nothing is imported.

``steer`` shards coarser units (hours each) through its journal instead of
gathering them (:func:`gradsae.experiments.concepts.fill_shard`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

TIMEOUT = timedelta(hours=24)
"""How long a collective waits for the slowest rank: a rank's share of a steering run takes hours, and torch's
default (30 minutes) would end the run at the first barrier after it."""
R = TypeVar("R")


def world_size() -> int:
    """Number of processes in the run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0


def is_main() -> bool:
    """Rank 0: the process that writes files and prints."""
    return rank() == 0


def device_for(device: str) -> str:
    """The device this rank uses: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if world_size() > 1 and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def init(device: str = "cpu") -> None:
    """Join the process group when run under torchrun (idempotent); NCCL on CUDA, else Gloo."""
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
    log.info("rank %d of %d (%s)", rank(), world_size(), dist.get_backend())


def finish() -> None:
    """Leave the process group (after a barrier, so no rank exits while others still gather)."""
    if world_size() <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's items: ``items[rank::world_size]``."""
    return list(items[rank() :: world_size()])


def gather(local: Sequence[T], total: int) -> list[T]:
    """The results of :func:`shard`'s items from every rank, back in item order (on every rank)."""
    size = world_size()
    if size <= 1:
        return list(local)
    import torch.distributed as dist

    parts: list[Any] = [None] * size
    dist.all_gather_object(parts, list(local))
    return [parts[i % size][i // size] for i in range(total)]


def union(local: dict[Any, T]) -> dict[Any, T]:
    """Every rank's entries of a dict keyed by item (each item held by the rank that computed it), on every rank."""
    size = world_size()
    if size <= 1:
        return dict(local)
    import torch.distributed as dist

    parts: list[Any] = [None] * size
    dist.all_gather_object(parts, dict(local))
    return {key: value for part in parts for key, value in part.items()}


def barrier() -> None:
    """Wait for every rank (nothing without torchrun)."""
    if world_size() <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def on_main(fn: Callable[[], R]) -> R | None:
    """``fn()`` on rank 0 only (``None`` elsewhere); a :class:`GradSAEError` there is raised on every rank."""
    from gradsae.errors import GradSAEError

    result, error = None, None
    if is_main():
        try:
            result = fn()
        except GradSAEError as exc:
            error = exc
    if world_size() > 1:
        import torch.distributed as dist

        told: list[Any] = [None]
        if is_main():
            told = [None if error is None else str(error)]
        dist.broadcast_object_list(told, src=0)
        if error is None and told[0] is not None:
            raise GradSAEError(told[0])
    if error is not None:
        raise error
    return result


def map_items(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(item) for item in items]``, each item computed by one rank, the results on every rank."""
    return gather([fn(item) for item in shard(items)], len(items))
