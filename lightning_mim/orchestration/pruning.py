"""What the sweep driver and a trial's training process share about Optuna: the named pruners, the
RDB storage, and the environment entry through which the driver hands a trial to its training process
(see `lightning_mim.orchestration.pruning_callback`). Only optuna is imported: the driver stays light."""

from __future__ import annotations

import json
from typing import Any

import optuna

SQLITE_TIMEOUT_S = 120  # writers on one SQLite file (driver heartbeats, workers, trials) wait, don't fail


def rdb_storage(url: str, **kwargs: Any) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage; SQLite connections wait for the file lock instead of failing."""
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)


TRIAL_ENV = "LIGHTNING_MIM_OPTUNA_TRIAL"  # JSON: storage, study, trial_id, monitor, pruner
PRUNERS = ("none", "median", "percentile", "hyperband")


def build_pruner(name: str) -> optuna.pruners.BasePruner:
    """Named pruners with Optuna's defaults (median: prune below the median of earlier trials at the
    same step, after 5 complete trials)."""
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner()
    if name == "percentile":
        return optuna.pruners.PercentilePruner(25.0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    raise ValueError(f"unknown pruner '{name}'; valid: {', '.join(PRUNERS)}")


def trial_env(storage: str, study: str, trial_id: int, monitor: str, pruner: str) -> dict[str, str]:
    """The environment entry the sweep driver sets for a trial's training process."""
    return {TRIAL_ENV: json.dumps(dict(storage=storage, study=study, trial_id=trial_id, monitor=monitor, pruner=pruner))}
