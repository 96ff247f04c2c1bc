"""The trial side of the sweep console: `TrialProgress`, a Lightning callback that keeps the trial's
progress file (`protocol.write_progress`, at most once a second) current — "tokenizer" or "training"
with the step, the step budget and the loss, "evaluation" while an evaluation callback runs, "done" at
the end. The driver reads the file with `progress.describe`; the two halves live apart so that the
driver does not import Lightning (`orchestration.sweep_console`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_mim.orchestration.protocol import phase_reached, write_progress

WRITE_EVERY_S = 1.0


def _due_evaluation(trainer: pl.Trainer, step: int) -> bool:
    """Whether an evaluation callback (one with an `EvalCadence`) fires after this optimizer step."""
    last = bool(trainer.max_steps and trainer.max_steps > 0 and step >= trainer.max_steps)
    for callback in trainer.callbacks:
        cadence = getattr(callback, "cadence", None)
        if cadence is None:
            continue
        every = getattr(cadence, "every_n_steps", None)
        if (every and step > 0 and step % every == 0) or (last and (cadence.at_end or getattr(callback, "at_train_end", False))):
            return True
    return False


class TrialProgress(pl.Callback):
    """Keeps `path` (the trial's progress file) current; `phase` names the training ("training", or
    "tokenizer" for the shared stage a trial may have to train first)."""

    def __init__(self, path: str | Path, phase: str = "training") -> None:
        self.path, self.phase = Path(path), phase
        self._written = 0.0

    def _write(self, phase: str, force: bool = False, **fields: Any) -> None:
        """Write the file (at most once a second unless `force`); the phase hook hears every call."""
        now = time.monotonic()
        if force or now - self._written >= WRITE_EVERY_S:
            self._written = now
            write_progress(self.path, phase, **fields)  # calls phase_reached
        else:
            phase_reached(phase, progress_file=str(self.path), **fields)

    def _numbers(self, trainer: pl.Trainer) -> dict[str, Any]:
        loss = trainer.callback_metrics.get("train/loss")
        return {
            "step": int(trainer.global_step),
            "max_steps": int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else None,
            "loss": None if loss is None else float(loss),
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 0:
            self._write(self.phase, force=True, **self._numbers(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank != 0:
            return
        if _due_evaluation(trainer, trainer.global_step):  # the evaluation callbacks run next in this hook
            self._write("evaluation", force=True, **self._numbers(trainer))
        else:
            self._write(self.phase, **self._numbers(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 0:
            self._write("done" if self.phase == "training" else self.phase, force=True, **self._numbers(trainer))
