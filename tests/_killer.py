"""`KillAtStep`: a training process that dies by SIGKILL after optimizer step `step` — before that
step's checkpoint is written (Lightning runs checkpoint callbacks last), as a preempted job would.

    PYTHONPATH=tests python -m lightning_mim.train +callbacks.killer._target_=_killer.KillAtStep +callbacks.killer.step=7
"""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class KillAtStep(pl.Callback):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = int(step)

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
