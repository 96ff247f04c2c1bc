"""The little DDP plumbing the evaluation code needs, usable with or without Lightning.

Everything here is a no-op in a single process, so the same code runs from a callback under DDP and
from `python -m lightning_mim.evaluate` on one device.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s value on every rank (e.g. a cache hit/miss decision all ranks must share)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order ([obj] without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_zero_first(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the other ranks (which then find rank 0's on-disk cache)."""
    rank, _ = rank_and_world()
    out = fn() if rank == 0 else None
    barrier()
    if rank != 0:
        out = fn()
    barrier()
    return out  # type: ignore[return-value]


def shard_eval_loader(loader: DataLoader) -> DataLoader:
    """This rank's share of an exact evaluation pass.

    Lightning shards map-style evaluation loaders itself, but a loader we fetch from the DataModule
    ourselves is not sharded. Map-style loaders are rebuilt with Lightning's
    `UnrepeatedDistributedSampler` (no padding duplicates, unlike `DistributedSampler`); iterable
    (webdataset) loaders are assumed to split by node themselves, as our DataModules do.
    """
    rank, world = rank_and_world()
    if world == 1 or not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    if isinstance(loader.sampler, UnrepeatedDistributedSampler):
        return loader
    sampler = UnrepeatedDistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=False)
    kwargs: dict[str, Any] = dict(
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=False,
    )
    return DataLoader(loader.dataset, **kwargs)


def device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")
