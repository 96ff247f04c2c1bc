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



class RaiseIf(pl.Callback):
    """Fails the training (a RuntimeError at its start) when the module's hyper-parameter `key` equals
    `value`: a trial that passes every config check and fails inside its process.

        PYTHONPATH=tests python -m lightning_mim.sweep model.label_smoothing=0.1,0.2 \\
            +callbacks.fail._target_=_killer.RaiseIf +callbacks.fail.key=label_smoothing +callbacks.fail.value=0.2
    """

    def __init__(self, key: str, value) -> None:
        super().__init__()
        self.key, self.value = key, value

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.hparams.get(self.key) == self.value:
            raise RuntimeError(f"RaiseIf: {self.key}={self.value}")
