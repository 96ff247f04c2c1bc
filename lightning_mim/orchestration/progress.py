"""What a sweep's console shows while trials run: each trial's phase, step, loss, and the sweep's ETA.

The trial side is `progress_callback.TrialProgress`, a Lightning callback that keeps the trial's
progress file current. This module is the driver side: `describe` (one progress record -> a few words)
and `SweepClock` (an ETA from the trials finished so far). Lightning's own progress bar is per process
and goes to the trial's log; this is the one line per running trial that the sweep's console needs.
The driver side imports no Lightning (nor torch): a sweep driver or worker that only schedules trials
starts in about half the time (measured: `python -m lightning_mim.sweep --prepare-only`).
"""

from __future__ import annotations

from typing import Any


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
