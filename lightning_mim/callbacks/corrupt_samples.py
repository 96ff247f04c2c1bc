"""Callback: how many unreadable samples the data pipeline skipped (`data/corrupt_train`, `data/corrupt_val`).

The counting is the DataModules' (`corrupt_counts`, fed by `lightning_mim.data.pipeline.CorruptCounter`);
this callback only logs it.
"""

from __future__ import annotations

import lightning.pytorch as pl


class CorruptSampleLogger(pl.Callback):
    """Logs `data/corrupt_train` and `data/corrupt_val` (skipped samples so far, summed over ranks)
    at the end of each epoch, when the trainer's datamodule counts them (`corrupt_counts`)."""

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        counts = getattr(trainer.datamodule, "corrupt_counts", None)
        if counts is None:
            return
        value = float(counts.get(split, 0))
        pl_module.log(f"data/corrupt_{split}", value, reduce_fx="sum", sync_dist=True, on_step=False, on_epoch=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")
