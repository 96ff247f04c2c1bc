"""Optuna pruning for a trial whose training runs in its own process (the sweep's layout).

The sweep driver owns the Optuna trial (docs/DEPENDENCIES.md: optuna-integration's
`PyTorchLightningPruningCallback` under DDP needs every rank to share one trial, does not raise, and
with plain `ddp` each rank would create its own trial). Here the training process only *reports*:
on global rank 0 it opens the driver's trial in the shared RDB storage, reports every new value of the
objective with the global step, asks the study's pruner, and on "prune" records the step in the trial
(`user_attrs["pruned_at_step"]`), tags the MLflow run `optuna.state=PRUNED` and stops training on every
rank. The driver then tells the study that the trial was pruned.

The sweep passes the trial through the process environment (`orchestration.protocol.TrialContext`).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import optuna

from lightning_mim.orchestration.protocol import TrialContext
from lightning_mim.orchestration.pruning import build_pruner, rdb_storage

log = logging.getLogger(__name__)

PRUNED_AT = "pruned_at_step"


def from_context(trial: TrialContext) -> "OptunaPruning | None":
    """The callback for a trial's pruning target, or None outside a sweep (or with pruner 'none')."""
    if trial.pruning is None or trial.pruning["pruner"] == "none":
        return None
    return OptunaPruning(**trial.pruning)


def from_env() -> "OptunaPruning | None":
    """`from_context` of this process's environment."""
    return from_context(TrialContext.from_environment())


class OptunaPruning(pl.Callback):
    def __init__(self, *, storage: str, study: str, trial_id: int, monitor: str, pruner: str = "median") -> None:
        self.storage, self.study_name, self.trial_id = storage, study, int(trial_id)
        self.monitor, self.pruner = monitor, build_pruner(pruner)
        self._trial: optuna.Trial | None = None
        self._last_value: float | None = None
        self.pruned_at: int | None = None

    def _open_trial(self) -> optuna.Trial:
        if self._trial is None:
            study = optuna.load_study(study_name=self.study_name, storage=rdb_storage(self.storage), pruner=self.pruner)
            self._trial = optuna.trial.Trial(study, self.trial_id)
        return self._trial

    def _fresh_value(self, trainer: pl.Trainer) -> float | None:
        """The objective if it changed since the last check (a new evaluation), else None. The
        evaluation callbacks sync their metrics, so every rank sees the same answer and the
        broadcast below happens on all ranks or on none."""
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or float(value) == self._last_value or float(value) != float(value):
            return None  # no evaluation yet, the same one again, or NaN (the run fails on its own)
        self._last_value = float(value)
        return self._last_value

    def _check(self, trainer: pl.Trainer) -> None:
        if self.pruned_at is not None or trainer.sanity_checking:
            return
        value = self._fresh_value(trainer)
        if value is None:
            return
        decision = False
        if trainer.is_global_zero:
            trial = self._open_trial()
            trial.report(value, step=trainer.global_step)
            decision = trial.should_prune()
        if not trainer.strategy.broadcast(decision, src=0):
            return
        self.pruned_at = trainer.global_step
        trainer.should_stop = True
        if trainer.is_global_zero:
            self._open_trial().set_user_attr(PRUNED_AT, trainer.global_step)
            _tag_runs(trainer, {"optuna.state": "PRUNED", PRUNED_AT: str(trainer.global_step)})
            log.info("optuna pruned trial %d at step %d (%s)", self.trial_id, trainer.global_step, self.monitor)

    # The generation metrics are computed both after training steps and at validation end.
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._check(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)


def _tag_runs(trainer: pl.Trainer, tags: dict[str, str]) -> None:
    for logger in trainer.loggers:
        experiment, run_id = getattr(logger, "experiment", None), getattr(logger, "run_id", None)
        if run_id and hasattr(experiment, "set_tag"):
            for key, value in tags.items():
                experiment.set_tag(run_id, key, value)
