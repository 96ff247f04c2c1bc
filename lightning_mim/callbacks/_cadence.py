"""What the evaluation callbacks share: when they fire (every n epochs at validation end and/or every
n optimizer steps), that they leave the training's random streams alone, and whether the module can
generate at all."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


class EvalCadence:
    """`every_n_epochs` fires at the end of validation in epochs e with (e + 1) % n == 0 (epoch runs
    end with validation; with `val_check_interval` it fires at each validation of such an epoch);
    `every_n_steps` fires after the optimizer step that makes `global_step` a multiple of n (step-
    budgeted runs need no validation for it). Either may be None. Never during the sanity check,
    never twice for one global step. `at_end` also fires at the run's last optimizer step
    (`max_steps`) or last epoch (`max_epochs`), so every run ends with a measurement whatever its budget,
    and at the end of a stand-alone validation (`trainer.validate`) of a run that has reached its step
    budget: how a run resumed from a checkpoint taken at its last step (killed before its end-of-run
    measurement was recorded) measures what the uninterrupted run measured.
    """

    def __init__(self, every_n_epochs: int | None = 1, every_n_steps: int | None = None, at_end: bool = True) -> None:
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {value}")
        self.every_n_epochs = None if every_n_epochs is None else int(every_n_epochs)
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.at_end = bool(at_end)
        self._last_step: int | None = None

    def _claim(self, trainer: Any) -> bool:
        if trainer.global_step == self._last_step:
            return False
        self._last_step = trainer.global_step
        return True

    def at_validation_end(self, trainer: Any) -> bool:
        if getattr(trainer, "sanity_checking", False):
            return False
        max_epochs = getattr(trainer, "max_epochs", None) or -1
        last_epoch = self.at_end and max_epochs > 0 and trainer.current_epoch + 1 >= max_epochs
        due = self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        return (due or last_epoch or self._finished_run_validated(trainer)) and self._claim(trainer)

    def _finished_run_validated(self, trainer: Any) -> bool:
        """A stand-alone validation (`trainer.validate`, not fit's) of a run at its step budget."""
        max_steps = getattr(trainer, "max_steps", -1) or -1
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return self.at_end and str(getattr(fn, "value", fn)) == "validate" and 0 < max_steps <= trainer.global_step

    def at_train_batch_end(self, trainer: Any) -> bool:
        step = trainer.global_step
        max_steps = getattr(trainer, "max_steps", -1) or -1
        last_step = self.at_end and max_steps > 0 and step >= max_steps
        due = self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0
        return (due or last_step) and self._claim(trainer)


def log_metrics(pl_module: Any, prefix: str, metrics: dict[str, float]) -> None:
    """Record evaluation metrics once per logger, at the current global step.

    During validation/test, `pl_module.log` does it (values are already identical on every rank;
    `sync_dist=True` keeps Lightning quiet and costs one tiny all-reduce). After a training step,
    `self.log` would reach the loggers only on `log_every_n_steps` boundaries (and then one step
    off), so there the values go to `trainer.callback_metrics` (sweeps, checkpoint monitors) and
    straight to the loggers (rank-zero-only) instead."""
    import torch

    named = {f"{prefix}/{key}": float(value) for key, value in metrics.items()}
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None or trainer.validating or trainer.testing or trainer.sanity_checking:
        for key, value in named.items():
            pl_module.log(key, value, sync_dist=True)
        return
    for key, value in named.items():
        trainer.callback_metrics[key] = torch.tensor(value)
    for logger in trainer.loggers:
        logger.log_metrics(named, step=trainer.global_step)


@contextlib.contextmanager
def training_rng_untouched(device: Any) -> Iterator[None]:
    """Run an evaluation without moving the training's random streams: torch's global CPU generator
    (and `device`'s, on CUDA) are saved and restored around it.

    Evaluations draw from their own seeded generators, but the work around them does not: every
    DataLoader iterator draws its base seed from the global generator, and the first evaluation of a
    home also trains the domain classifier and the real statistics (cached for later runs). Without
    this, how often a run evaluates, and whether its home's caches were warm, would change the
    masks, dropout and data order of the training that follows.
    """
    import torch

    devices = [device] if getattr(device, "type", str(device)) == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def why_no_generation(module: Any) -> str | None:
    """None if `module.generate()` can sample images, else the reason (no generate(), or the module's
    own `cannot_generate`, e.g. a MAGE with continuous input), so generation callbacks skip with a
    warning instead of crashing a run that has other work to do."""
    if not callable(getattr(module, "generate", None)):
        return f"{type(module).__name__} has no generate()"
    return getattr(module, "cannot_generate", None)

