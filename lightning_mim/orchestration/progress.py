"""What a sweep's console shows while trials run: each trial's phase, step, loss, and the sweep's ETA.

The trial side is `TrialProgress`, a Lightning callback that keeps the trial's progress file
(`protocol.write_progress`, at most once a second) current: "tokenizer" or "training" with the step,
the step budget and the loss, "evaluation" while an evaluation callback runs, "done" at the end. The
driver side is `describe` (one progress record -> a few words) and `SweepClock` (an ETA from the
trials finished so far). Lightning's own progress bar is per process and goes to the trial's log;
this is the one line per running trial that the sweep's console needs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_mim.orchestration.protocol import write_progress

WRITE_EVERY_S = 1.0


def _due_evaluation(trainer: pl.Trainer, step: int) -> bool:
    """Whether an evaluation callback (one with an `EvalSchedule`) fires after this optimizer step."""
    last = bool(trainer.max_steps and trainer.max_steps > 0 and step >= trainer.max_steps)
    for callback in trainer.callbacks:
        schedule = getattr(callback, "schedule", None)
        if schedule is None:
            continue
        every = getattr(schedule, "every_n_steps", None)
        if (every and step > 0 and step % every == 0) or (last and (schedule.at_end or getattr(callback, "at_train_end", False))):
            return True
    return False


class TrialProgress(pl.Callback):
    """Keeps `path` (the trial's progress file) current; `phase` names the training ("training", or
    "tokenizer" for the shared stage a trial may have to train first)."""

    def __init__(self, path: str | Path, phase: str = "training") -> None:
        self.path, self.phase = Path(path), phase
        self._written = 0.0

    def _write(self, phase: str, force: bool = False, **fields: Any) -> None:
        now = time.monotonic()
        if force or now - self._written >= WRITE_EVERY_S:
            self._written = now
            write_progress(self.path, phase, **fields)

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


def describe(record: dict[str, Any] | None) -> str:
    """A progress record -> "training 450/600 loss 3.91", "evaluation at step 600", "tokenizer 80/1500"."""
    if not record:
        return "starting"
    phase, step, total, loss = record.get("phase", "?"), record.get("step"), record.get("max_steps"), record.get("loss")
    if phase in ("training", "tokenizer") and step is not None:
        text = f"{phase} {step}/{total}" if total else f"{phase} step {step}"
        return text + (f" loss {loss:.3f}" if loss is not None else "")
    if phase == "evaluation" and step is not None:
        return f"evaluation at step {step}"
    return str(phase)


class SweepClock:
    """ETA of a sweep from the wall time of the trials this driver finished (median, so one trial that
    also trained the shared tokenizer does not dominate), the trials left and the workers running them."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, int(workers))
        self.durations: list[float] = []

    def finished(self, seconds: float) -> None:
        self.durations.append(float(seconds))

    def eta(self, remaining: int, running_elapsed: float = 0.0) -> float | None:
        """Seconds left for `remaining` trials (the running one included, `running_elapsed` into it);
        None before any trial has finished."""
        if not self.durations:
            return None
        typical = sorted(self.durations)[len(self.durations) // 2]
        left = max(0.0, typical - running_elapsed) + typical * max(0, remaining - 1)
        return left / self.workers


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "ETA after the first trial"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"ETA {hours}h{minutes:02d}m" if hours else f"ETA {minutes}m{secs:02d}s"
