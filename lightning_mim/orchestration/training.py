"""One training run from a checked config: `run(cfg)`, what `python -m lightning_mim.train` does
once the config is composed and checked (`orchestration.train`, which imports this module only
then, so that bad input is refused before torch and Lightning are loaded).

Reads top to bottom: seed, build data / model / callbacks / logger / trainer, fit (resuming when
asked), write `result.json` beside the checkpoints, return the final metrics. The sweep runs each
trial through the same entry point in its own process.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_mim.callbacks import ExactResume, PerRankSeed, StepBudgetProgressBar
from lightning_mim.orchestration import pruning_callback
from lightning_mim.orchestration.noise import filter_known_noise
from lightning_mim.orchestration.config import absolutize_paths
from lightning_mim.orchestration.trial_progress import TrialProgress
from lightning_mim.orchestration.protocol import TrialContext, objective_metric, result_path, write_progress, write_result
from lightning_mim.orchestration.stages import ensure_earlier_stages
from lightning_mim.orchestration.tracking import ALIASES_KEY, alias_keys, log_run_config, mlflow_logger, reserve_first_metric, run_params_and_path_tags

RUN_NAME_ENV = "LIGHTNING_MIM_RUN_NAME"  # DDP relaunches: every rank resolves the first process's run name


class TrainingDiverged(RuntimeError):
    """Raised when the run ends with a non-finite loss or metric (a failed sweep trial)."""


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one model as `cfg` says; returns the final metrics plus where things were written."""
    filter_known_noise()
    absolutize_paths(cfg)
    cfg.run_name = str(cfg.run_name)  # `${now:...}` must be resolved once, not per access
    os.environ.setdefault(RUN_NAME_ENV, cfg.run_name)  # inherited by the ranks DDP launches
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trial = TrialContext.from_environment()  # empty outside a sweep
    phase = "tokenizer" if str(cfg.model.get("_target_", "")).endswith("TokenizerModule") else "training"
    write_progress(trial.progress_file, "set-up" if phase == "training" else phase)
    ensure_earlier_stages(cfg, run)  # e.g. trains (or reuses) the tokenizer a stage-2 model needs
    saved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    saved[ALIASES_KEY] = sorted(alias_keys(cfg))  # resolving drops them: `evaluate` reads them here
    OmegaConf.save(saved, output_dir / "config.yaml")
    params_and_tags = run_params_and_path_tags(cfg)  # before instantiate() resolves interpolations in place

    datamodule, model = seeded_data_and_model(cfg)
    checkpoint_cb = _checkpoint_callback(cfg, output_dir)
    exact_resume = ExactResume()  # a resumed run = the uninterrupted one
    callbacks = [checkpoint_cb, exact_resume, *_instantiate_callbacks(cfg)]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepBudgetProgressBar())  # "Epoch 11 · step 450/600", not Lightning's "Epoch 11/-2"
    if trial.progress_file:  # a sweep's console follows this trial
        callbacks.insert(0, TrialProgress(trial.progress_file, phase))
    pruning = pruning_callback.from_context(trial)  # a sweep trial with a pruner: report to its Optuna trial
    if pruning is not None:
        callbacks.append(pruning)
    logger = _build_logger(cfg, trial)
    trainer = pl.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        callbacks=callbacks,
        logger=logger if logger is not None else False,
        default_root_dir=str(output_dir),
    )
    if trainer.world_size > 1 and not any(isinstance(c, PerRankSeed) for c in trainer.callbacks):
        # MAE/MAGE's `seed + rank`: without it every rank draws the same masks, dropout and views
        trainer.callbacks.append(PerRankSeed(int(cfg.seed)))
    if logger is not None:
        log_run_config(logger, params_and_tags, output_dir / "config.yaml")
        if trial.objective:  # MLflow's compare view opens on the run's first metric: the sweep's objective
            reserve_first_metric(logger, objective_metric(trial.objective))
    trainer.fit(model, datamodule=datamodule, ckpt_path=_resume_path(cfg, checkpoint_cb))
    if exact_resume.resumed_without_a_step:  # resumed at its budget (killed before its result was written):
        trainer.validate(model, datamodule=datamodule, verbose=False)  # the end-of-run measurements, again

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    result = {
        "metrics": metrics,
        "global_step": trainer.global_step,
        "checkpoint": checkpoint_cb.last_model_path or checkpoint_cb.best_model_path,
        "output_dir": str(output_dir),
        "mlflow_run_id": getattr(logger, "run_id", None),
        "pruned_at_step": getattr(pruning, "pruned_at", None),
    }
    # Under DDP every rank gets here; only rank 0 holds the MLflow run id (the other ranks' loggers are
    # no-ops), so it alone writes the file; otherwise whichever rank finishes last wins (today rank 0,
    # only because it draws the pictures at train end) and another rank's copy says `mlflow_run_id: null`.
    if trainer.global_rank == 0:
        write_result(result_path(output_dir), result)
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise TrainingDiverged(f"non-finite metrics at step {trainer.global_step}: {', '.join(sorted(bad))}")
    return result


def seeded_data_and_model(cfg: DictConfig) -> tuple[Any, Any]:
    """The run's DataModule and model, built right after seeding with `cfg.seed`. Everything random
    before the first step follows from the seed alone — the model's initial weights (same architecture,
    same draws), the data order (`data.seed: ${seed}`) — and the evaluation draws use `evaluation.seed:
    ${seed}`: so seed i of every grid point shares them, and a sweep's points are blocked by seed."""
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _recursive_=False, _convert_="all")
    return datamodule, model


def _checkpoint_callback(cfg: DictConfig, output_dir: Path) -> pl.callbacks.ModelCheckpoint:
    """Keeps `last.ckpt` fresh every `checkpoint_every_n_steps` so a killed run loses little."""
    every = int(cfg.get("checkpoint_every_n_steps", 0) or 0) or None
    return pl.callbacks.ModelCheckpoint(
        dirpath=str(output_dir / "checkpoints"),
        filename="step{step}",
        auto_insert_metric_name=False,
        save_last=True,
        save_top_k=0,
        every_n_train_steps=every,
    )


def _instantiate_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    section = cfg.get("callbacks") or {}
    return [instantiate(spec, _convert_="all") for spec in section.values() if spec and "_target_" in spec]


def _resume_path(cfg: DictConfig, checkpoint_cb: pl.callbacks.ModelCheckpoint) -> str | None:
    """`ckpt_path=last` resumes this run's own last.ckpt (if it exists); any other value is a path."""
    wanted = cfg.get("ckpt_path")
    if not wanted:
        return None
    if str(wanted) == "last":
        last = Path(checkpoint_cb.dirpath) / "last.ckpt"
        if last.is_file():
            print(f"resuming from {last}", file=sys.stderr)
            return str(last)
        print(f"ckpt_path=last: no {last} yet, starting from scratch", file=sys.stderr)
        return None
    path = Path(str(wanted)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={wanted}: no such checkpoint file")
    return str(path)


def _build_logger(cfg: DictConfig, trial: TrialContext):
    spec = cfg.get("logger")
    if not spec or "_target_" not in spec:
        return None
    if spec._target_.endswith("MLFlowLogger"):
        return mlflow_logger(cfg, parent_run_id=trial.parent_run_id, extra_tags=trial.tags)
    return instantiate(spec, _convert_="all")
