"""Which batches an evaluation reads: an exact pass over a whole split, and this rank's share of it.

Evaluation passes are independent of the run's budget (`batches_per_epoch`, `val_batches`): the
cached domain classifier and real statistics must not depend on one run's settings.
"""

from __future__ import annotations

from typing import Any, Iterable

from torch.utils.data import DataLoader, IterableDataset

from lightning_mim.data.pipeline import dist_info
from lightning_mim.settings import SPLIT_NAMES


def split_loader(datamodule: Any, split: str, *, whole: bool = False) -> Iterable:
    """An exact pass over the whole `split` ("train", "val" or "test") of `datamodule`.

    Uses `datamodule.exact_dataloader(split, whole=whole)` (`whole`: every rank reads the whole split,
    not its share); DataModules without it (test fakes) fall back to their plain loaders, "test" to
    `test_dataloader`.
    """
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLIT_NAMES)}")
    if hasattr(datamodule, "exact_dataloader"):
        return datamodule.exact_dataloader(split, whole=whole)
    return {"train": datamodule.train_dataloader, "val": datamodule.val_dataloader}.get(split, datamodule.test_dataloader)()


def shard_eval_loader(loader: Iterable) -> Iterable:
    """This rank's share of an exact evaluation pass (the loader itself in a single process).

    Lightning shards map-style evaluation loaders itself, but a loader we fetch from the DataModule
    ourselves is not sharded. Map-style loaders are rebuilt with Lightning's
    `UnrepeatedDistributedSampler` (no padding duplicates, unlike `DistributedSampler`); iterable
    (webdataset) loaders and anything that is not a `DataLoader` are assumed to split by rank
    themselves, as our DataModules do, and pass through.
    """
    rank, world = dist_info(from_env=False)
    if world == 1 or not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler  # Lightning only when sharding

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
