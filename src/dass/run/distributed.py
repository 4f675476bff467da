"""Several processes, one pruning run: torch.distributed, nothing home-made.

Launched with ``torchrun --nproc-per-node K -m dass prune ...`` (NCCL on GPUs, gloo on
CPU), every rank holds the model and the same calibration ids, processes a disjoint share
of the calibration batches, and the per-layer statistics are summed across ranks with
all-reduce before masks are chosen. Statistics are fp64 sums of per-batch fp32 sums
(see :mod:`dass.core.stats`), so every rank, and a single process with the same batches,
sees bit-identical totals and chooses identical masks; no broadcast of masks is needed.
Only rank 0 writes files. A single process never initialises anything here and pays
nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

from dass.core.stats import FeatureStats

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (``world == 1``: no communication at all)."""

    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share: items ``rank, rank + world, ...`` (balanced, disjoint)."""
        return list(items[self.rank :: self.world]) if self.enabled else list(items)

    def all_reduce_stats(self, stats: dict[str, FeatureStats]) -> None:
        """Sum every accumulator (and its token count) over ranks, in a fixed key order."""
        if not self.enabled:
            return
        keys = sorted(stats)
        device = next(iter(stats.values())).sqsum.device if stats else torch.device("cpu")
        counts = torch.tensor([stats[k].tokens for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        for k, c in zip(keys, counts.tolist()):
            stats[k].tokens = int(c)
            for t in stats[k].tensors():
                dist.all_reduce(t)
            if stats[k].max_samples:
                _share_samples(stats[k])

    def all_reduce_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Sum tensors over ranks in place, in the given order (no-op in one process)."""
        if not self.enabled:
            return
        for t in tensors:
            dist.all_reduce(t)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _share_samples(acc: FeatureStats) -> None:
    """Methods that test candidates on kept input rows see rank 0's rows on every rank,
    so all ranks decide alike (the rows differ from a single process's)."""
    sample = acc.sample()
    objs = [sample.cpu() if sample is not None else None]
    dist.broadcast_object_list(objs, src=0)
    acc.samples = [objs[0].to(acc.sqsum.device)] if objs[0] is not None else []
    acc.sample_index = [torch.arange(objs[0].shape[0])] if objs[0] is not None else []


_CURRENT = Dist()


def current() -> Dist:
    """The run's :class:`Dist` (world 1 unless :func:`init_from_env` started one)."""
    return _CURRENT


def init_from_env(device: str | None = None) -> tuple[Dist, str | None]:
    """Join the process group that ``torchrun`` describes in the environment.

    Returns the context and the device this rank should compute on (``cuda:LOCAL_RANK``
    under NCCL). Without ``WORLD_SIZE > 1`` in the environment nothing happens.
    """
    global _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _CURRENT, device
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group("nccl" if use_cuda else "gloo")
    _CURRENT = Dist(dist.get_rank(), dist.get_world_size())
    return _CURRENT, device


def set_current(ctx: Dist) -> None:
    """For tests and embedding: use an already initialised process group."""
    global _CURRENT
    _CURRENT = ctx
