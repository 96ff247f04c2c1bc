"""What the sweep driver and a trial's training process share about Optuna: the named pruners and the
RDB storage (the trial itself reaches the training process through `orchestration.protocol`; the
reporting callback is `orchestration.pruning_callback`). Only optuna is imported: the driver stays light."""

from __future__ import annotations

from typing import Any

import optuna

SQLITE_TIMEOUT_S = 120  # writers on one SQLite file (driver heartbeats, workers, trials) wait, don't fail


def rdb_storage(url: str, **kwargs: Any) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage; SQLite connections wait for the file lock instead of failing."""
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)


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
