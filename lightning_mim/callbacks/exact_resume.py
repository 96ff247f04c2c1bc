"""Callback: a run resumed from a checkpoint continues as the uninterrupted run would have.

Lightning restores the weights, the optimizer, the schedulers and the loop counters, but not what a
run draws from: the global random generators (masking ratios and positions, dropout, MAGE-C views)
and the position of the training stream. Without more, resuming from `last.ckpt` at step k replays
epoch e's stream from its first batch with the generators freshly seeded, so the resumed run trains on
other batches with other masks than the uninterrupted one and ends elsewhere.

`ExactResume` stores, in every checkpoint, the generators' states (torch CPU and CUDA, numpy,
`random`; as tensors and plain values, so `weights_only=True` loading still works) and where the stream was (Lightning's epoch and the
batches finished in it). On resume it hands the position to the training loader
(`data.pipeline.FixedBatches.resume`, which replays the seeded epoch up to that batch) and restores
the generators just before the first resumed training step, so that step draws what the
uninterrupted run drew.

What it assumes: the training loader is a `FixedBatches` (every DataModule of this package) or has no
position to restore (then only the generators are restored); the main process draws nothing random
while loading data (true with worker processes, and with `num_workers=0` when training images are
not augmented — as on digits); checkpoints are taken at the end of a training step (ModelCheckpoint's
`every_n_train_steps`, `last.ckpt`). Same machine and threads: the resumed run is then identical.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl

STATE_KEY = "exact_resume"


def rng_states() -> dict[str, Any]:
    """The global generators' states as tensors and plain Python values, so a checkpoint holding them
    still loads with `torch.load(weights_only=True)` (numpy's own state is an ndarray, which it refuses)."""
    import random

    import numpy as np
    import torch

    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Undo `rng_states`: set every global generator back (CUDA's only where there are CUDA devices)."""
    import random

    import numpy as np
    import torch

    torch.set_rng_state(states["torch"])
    if states.get("torch.cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


class ExactResume(pl.Callback):
    def __init__(self) -> None:
        super().__init__()
        self._batches_done = 0
        self._pending: dict[str, Any] | None = None
        self.resumed_at: tuple[int, int] | None = None  # (epoch, batch) of the last resume, for tests and logs

    @property
    def resumed_without_a_step(self) -> bool:
        """Whether this fit restored a checkpoint and ran no training step after it: the checkpoint was
        taken at the run's budget, so Lightning's `fit` returned at once, and what the run does at its
        end (validation, the final evaluations) has to be asked for (`trainer.validate`)."""
        return self._pending is not None

    # -- saving ------------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            self._batches_done = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # runs before ModelCheckpoint's own on_train_batch_end (Lightning runs checkpoint callbacks last)
        self._batches_done = int(batch_idx) + 1

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Every rank builds the checkpoint, rank 0 alone writes it: gather each rank's generators into it
        # (under DDP they differ, `PerRankSeed`), so each rank gets its own back on resume.
        import torch.distributed as dist

        per_rank = [rng_states()]
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, per_rank[0])
            per_rank = gathered
        checkpoint[STATE_KEY] = {
            "rng": per_rank,
            "epoch": int(trainer.current_epoch),
            "batches_done": int(self._batches_done),
        }

    # -- resuming ------------------------------------------------------------------------------------------
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(STATE_KEY)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            return
        epoch, done = int(self._pending["epoch"]), int(self._pending["batches_done"])
        loader = trainer.train_dataloader
        if done >= getattr(loader, "num_batches", float("inf")):  # saved after an epoch's last batch
            epoch, done = epoch + 1, 0
        if hasattr(loader, "resume"):
            loader.resume(epoch, done)
        self.resumed_at = (epoch, done)
        self._batches_done = done

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._pending is None:
            return
        per_rank = self._pending["rng"]
        if len(per_rank) != trainer.world_size:
            warnings.warn(f"checkpoint has the random states of {len(per_rank)} rank(s), this run has {trainer.world_size}: "
                          "reusing them round-robin, so the resumed run is not the uninterrupted one")
        set_rng_states(per_rank[trainer.global_rank % len(per_rank)])  # the first resumed step draws as before
        self._pending = None
