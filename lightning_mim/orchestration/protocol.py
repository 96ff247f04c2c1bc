"""The contract between the sweep driver and a trial's process, in one place.

The driver (`orchestration.sweep`) runs every trial as its own process — `python -m lightning_mim.train`
for a training, `python -m lightning_mim.evaluate` for a checkpoint reused at other inference
settings — and talks to it through two channels only:

- the environment, going in (`TrialContext.environment()` -> `TrialContext.from_environment()`):
  `PARENT_RUN_ENV`  the MLflow parent run of the sweep: the trial's run is nested under it;
  `RUN_TAGS_ENV`    JSON dict of extra MLflow tags (study name, trial number);
  `TRIAL_ENV`       JSON of the Optuna trial the training reports to when the sweep prunes
                    (storage URL, study, trial id, monitored metric, pruner name);
  `PROGRESS_ENV`    the file the trial keeps its current phase in (`write_progress`), which the
                    driver polls for its console (`read_progress`);
  `OBJECTIVE_ENV`   the metric the sweep optimises: the trial's MLflow run lists
                    `objective_metric(name)` first (see `tracking.reserve_first_metric`).
  Environment variables, not config keys: they must not change the config hash that keys the stage
  cache (two trials that differ only in their trial number share one trained model).
- the phases of a trial, for whoever watches: the trial's process records its own in its progress
  file (`write_progress`: "set-up", "tokenizer", "training", "evaluation", "done"); the driver passes
  the others (`DRIVER_PHASES`: "asked", "exited", "recorded", "logging"; "decided" after an adaptive
  sweep stored a round's decision). Both call `phase_reached`,
  which runs the hook named by `PHASE_HOOK_ENV` (`module:function`, called as `function(phase,
  **info)`) when it is set: tests place kills with it at exact points of a trial, not by timers.
- the trial's config, going in: composed and checked once by the driver and written to the trial's
  directory as it is composed, interpolations and all (`write_config`); the trial's process runs from
  that file (`python -m lightning_mim.train --config=FILE`, `... .evaluate ckpt=... config=FILE`) and
  composes nothing.
- a JSON result file, coming out (`write_result` -> `read_result`), at `result_path(directory)`: a
  training writes it into its output directory (final metrics, step, checkpoint path, MLflow run id,
  the step it was pruned at or null); an evaluation writes it where its `result_file=` argument says
  (metrics of the last setting, checkpoint path).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

PARENT_RUN_ENV = "LIGHTNING_MIM_PARENT_RUN_ID"
RUN_TAGS_ENV = "LIGHTNING_MIM_RUN_TAGS"
TRIAL_ENV = "LIGHTNING_MIM_OPTUNA_TRIAL"
PROGRESS_ENV = "LIGHTNING_MIM_PROGRESS_FILE"
OBJECTIVE_ENV = "LIGHTNING_MIM_OBJECTIVE"
RESULT_FILE = "result.json"
TRIAL_CONFIG = "config.yaml"  # the trial's config as the driver built it, in the trial's directory
PROGRESS_FILE = "progress.json"
PHASE_HOOK_ENV = "LIGHTNING_MIM_PHASE_HOOK"
PRUNING_KEYS = ("storage", "study", "trial_id", "monitor", "pruner")
# The driver's phases of one trial, in order (the trial's process records its own in between):
# asked: the trial holds its point, nothing is started yet; exited: the trial's process ended well, its
# result file is written; recorded: the stage cache has recorded the trained model (trainings only);
# logging: the objective is about to be logged to the trial's MLflow run, Optuna is not told yet.
DRIVER_PHASES = ("asked", "exited", "recorded", "logging", "decided")


def objective_metric(objective: str) -> str:
    """The one name a sweep's objective has on every child run: `val/fid_domain` -> `objective/val/fid_domain`."""
    if not objective:
        raise ValueError("objective must be a metric name, got an empty string")
    return f"objective/{objective}"


@dataclass(frozen=True)
class TrialContext:
    """What a trial process learns from its driver (all empty outside a sweep).

    parent_run_id: MLflow run to nest under. tags: extra MLflow tags. pruning: None, or the Optuna
    trial to report to: {storage, study, trial_id, monitor, pruner}. progress_file: where the trial
    keeps its phase for the driver's console (None: nobody is watching). objective: the metric the
    sweep optimises (None outside a sweep).
    """

    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    pruning: dict[str, Any] | None = None
    progress_file: str | None = None
    objective: str | None = None

    def __post_init__(self) -> None:
        if self.pruning is not None and sorted(self.pruning) != sorted(PRUNING_KEYS):
            raise ValueError(f"pruning needs exactly the keys {', '.join(PRUNING_KEYS)}, got {sorted(self.pruning)}")

    def environment(self) -> dict[str, str]:
        """The environment entries the driver sets for the trial's process."""
        env = {RUN_TAGS_ENV: json.dumps(self.tags)}
        if self.parent_run_id:
            env[PARENT_RUN_ENV] = self.parent_run_id
        if self.pruning is not None:
            env[TRIAL_ENV] = json.dumps(self.pruning)
        if self.progress_file:
            env[PROGRESS_ENV] = str(self.progress_file)
        if self.objective:
            env[OBJECTIVE_ENV] = self.objective
        return env

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> "TrialContext":
        """The context the trial's process was started with (`os.environ` by default)."""
        env = os.environ if env is None else env
        pruning = env.get(TRIAL_ENV)
        return cls(
            parent_run_id=env.get(PARENT_RUN_ENV) or None,
            tags=json.loads(env.get(RUN_TAGS_ENV) or "{}"),
            pruning=json.loads(pruning) if pruning else None,
            progress_file=env.get(PROGRESS_ENV) or None,
            objective=env.get(OBJECTIVE_ENV) or None,
        )


def write_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write a trial's config (an OmegaConf DictConfig) to `path`, as composed: interpolations are kept,
    so the trial's process resolves them as composing would have, and its stage keys are the driver's."""
    from omegaconf import OmegaConf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=False)
    return path


def read_config(path: str | os.PathLike) -> Any:
    """The config a driver wrote with `write_config` (a DictConfig, not in struct mode, as `compose` gives);
    `config.ConfigError` naming the file when it is missing or no config."""
    from omegaconf import DictConfig, OmegaConf

    from lightning_mim.orchestration.config import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config={path}: no such file")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # YAML and OmegaConf errors
        raise ConfigError(f"config={path}: not a config file ({type(err).__name__})") from None
    if not isinstance(cfg, DictConfig) or "model" not in cfg:
        raise ConfigError(f"config={path}: not a run's config (no model section)")
    return cfg


def result_path(directory: str | os.PathLike) -> Path:
    """Where a trial's process leaves its result in `directory`."""
    return Path(directory) / RESULT_FILE


def float32(value: float) -> float:
    """`value` rounded to the nearest float32 (values beyond float32's range unchanged)."""
    try:
        rounded = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return value
    return rounded if math.isfinite(rounded) or not math.isfinite(value) else value


def write_result(path: str | os.PathLike, result: Mapping[str, Any]) -> Path:
    """Write a trial's result (JSON) to `path`. Its `metrics` are recorded at float32 precision, the
    precision of Lightning's logged values, so that a number is the same whichever process measured it:
    a training's own evaluation callbacks or `python -m lightning_mim.evaluate` on its checkpoint."""
    path = Path(path)
    result = dict(result)
    if "metrics" in result:
        result["metrics"] = {k: float32(float(v)) for k, v in result["metrics"].items()}
    path.write_text(json.dumps(result, indent=2))
    return path


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """The result a trial's process wrote to `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the trial process wrote no {path}")
    return json.loads(path.read_text())


def _hook(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"{PHASE_HOOK_ENV}={spec!r}: expected module:function")
    return getattr(importlib.import_module(module), name)


def phase_reached(phase: str, **info: Any) -> None:
    """A trial reached `phase` (the driver's `DRIVER_PHASES` or a progress phase of the trial's own):
    run the hook named by `PHASE_HOOK_ENV`, if any, with `phase` and `info` (e.g. the trial number)."""
    spec = os.environ.get(PHASE_HOOK_ENV)
    if spec:
        _hook(spec)(phase, **info)


def write_progress(path: str | os.PathLike | None, phase: str, **fields: Any) -> None:
    """Record a trial's current phase ("set-up", "tokenizer", "training", "evaluation", "done", ...)
    and its numbers (step, max_steps, loss) at `path`, atomically, then pass the phase to
    `phase_reached`; nothing when `path` is None (no sweep watches this run)."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"phase": phase, "time": time.time(), **fields}))
    os.replace(tmp, path)
    phase_reached(phase, progress_file=str(path), **fields)


def read_progress(path: str | os.PathLike) -> dict[str, Any] | None:
    """The last phase a trial recorded at `path` (None when it has recorded none yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
