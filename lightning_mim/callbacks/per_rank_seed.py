"""Callback: per-rank seeding of the global random generators (MAE/MAGE's `seed + rank`).

`PerRankSeed` re-seeds the global RNGs with `seed + global_rank` once the ranks exist (the rule of
MAE/MAGE's `main_pretrain.py`). Without it every rank starts from the same `seed_everything(seed)`
state, so all ranks draw the same masking ratios, mask positions, dropout masks and MAGE-C views at
every step: the global batch then holds `world_size` copies of one random draw instead of
independent ones. Rank 0 keeps `seed`, so a single-process run is unchanged. The weights are built
before the ranks exist (identical everywhere; DDP broadcasts rank 0's anyway), and the data pipeline
and the evaluation code seed themselves explicitly, so none of them depends on this.

`python -m lightning_mim.train` adds it by itself whenever the world size is above 1 (any `trainer=ddp`,
`slurm` or `torchrun` run with more than one process), so nobody has to know about it.
"""

from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import torch


class PerRankSeed(pl.Callback):
    """Seed torch, numpy and `random` with `seed + global_rank` at the start of fit/validate/test.

    `applied` holds the seed this rank used (None before `setup`).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.applied: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        seed = self.seed + int(trainer.global_rank)
        torch.manual_seed(seed)  # also seeds every CUDA device
        np.random.seed(seed % 2**32)
        random.seed(seed)
        self.applied = seed
