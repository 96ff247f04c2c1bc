"""The little DDP plumbing the evaluation code needs, usable with or without Lightning.

Everything here is a no-op in a single process, so the same code runs from a callback under DDP and
from `python -m lightning_mim.evaluate` on one device. The rank comes from the data layer's
`dist_info(from_env=False)`: the rank within the initialised process group, (0, 1) without one.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_mim.data.pipeline import dist_info, is_distributed

T = TypeVar("T")


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
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
    rank, _ = dist_info(from_env=False)
    out = fn() if rank == 0 else None
    barrier()
    if rank != 0:
        out = fn()
    barrier()
    return out  # type: ignore[return-value]


class FeatureGather(Metric):
    """Per-rank (features (B, D), logits (B, K), labels (B,)) rows; `compute()` returns every rank's
    rows concatenated (torchmetrics `cat` states), as (float32, float32, int64) tensors.

    Every rank must call `compute()` (it is a collective under DDP), and every rank must have updated
    at least once with the right trailing shapes (a rank without data updates with zero rows).
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("features", [], dist_reduce_fx="cat")
        self.add_state("logits", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def update(self, features: Tensor, logits: Tensor, labels: Tensor) -> None:
        if features.ndim != 2 or logits.ndim != 2 or labels.ndim != 1:
            raise ValueError(
                f"FeatureGather expects features (B, D), logits (B, K), labels (B,), got "
                f"{tuple(features.shape)}, {tuple(logits.shape)}, {tuple(labels.shape)}"
            )
        if not len(features) == len(logits) == len(labels):
            raise ValueError(f"FeatureGather: row counts differ: {len(features)}, {len(logits)}, {len(labels)}")
        self.features.append(features.float())
        self.logits.append(logits.float())
        self.labels.append(labels.long())

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:
        return dim_zero_cat(self.features), dim_zero_cat(self.logits), dim_zero_cat(self.labels)


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of `module`'s first parameter (else first buffer), CPU for a module with neither."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")
