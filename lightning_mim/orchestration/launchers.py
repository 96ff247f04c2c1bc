"""Where a sweep's trial processes run: here (`sweep.launcher=local`, a child process of the driver) or
as SLURM jobs through submitit (`sweep.launcher=submitit`), the way MAE/MAGE users reach SLURM.
`launch` is the one call the driver makes; both launchers append the trial's output to its log, call
`while_waiting` about once a second (the driver's console) and raise `TrialFailed` with the log's tail.

A local trial process dies with the driver that started it (`die_with_parent`, Linux): a killed
driver leaves no orphan training, and the next run of the sweep redoes the trial.

With submitit the driver submits each trial's command (`python -m lightning_mim.train ...`, or
`... .evaluate` for a reused checkpoint) as one job and waits for it; the job writes the same trial
log and result file the local launcher does, so the rest of the sweep is unchanged. Job resources come
from the trial's own config — nodes = `trainer.num_nodes`, GPUs and tasks per node =
`trainer.devices` (Lightning's SLURM layout: one task per GPU) — plus `sweep.submitit.KEY=VALUE`
options passed to `AutoExecutor.update_parameters` (`timeout_min`, `slurm_partition`, `mem_gb`, ...).
`sweep.submitit.cluster=local` runs the jobs on this machine with submitit's local executor (tests,
laptops); `slurm` (or `auto` on a SLURM login node) submits them, with `trainer=slurm` added to the
trial's overrides so Lightning reads its ranks from SLURM.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

LAUNCHERS = ("local", "submitit")
POLL_SECONDS = 1.0


class TrialFailed(RuntimeError):
    """A trial's process exited with an error; the message carries the tail of its log."""


def failure(code: Any, log_path: Path) -> TrialFailed:
    tail = log_path.read_text(errors="replace").strip().splitlines()[-15:] if log_path.is_file() else []
    return TrialFailed(f"exit code {code}; last lines of {log_path}:\n" + "\n".join(tail))


@dataclass
class TrialCommand:
    """The job submitit runs: the trial's command with its output appended to the trial log (not held
    in memory, as submitit's CommandFunction would), raising when it fails. Picklable, importable."""

    args: list[str]
    log_path: str
    env: dict[str, str] = field(default_factory=dict)  # added to the job's own environment

    def __call__(self) -> int:
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.args)}\n".encode())
            log.flush()
            code = subprocess.call(self.args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        if code != 0:
            raise failure(code, Path(self.log_path))
        return code


@dataclass
class SubmititOptions:
    cluster: str = "auto"  # auto | local | slurm | debug (submitit's AutoExecutor clusters)
    parameters: dict[str, Any] = field(default_factory=dict)  # AutoExecutor.update_parameters(**parameters)

    def trainer_overrides(self) -> list[str]:
        """What the trial's command needs on a SLURM allocation."""
        return [] if self.cluster in ("local", "debug") else ["trainer=slurm"]


def job_resources(cfg: Any) -> dict[str, Any]:
    """nodes / GPUs / tasks per node from a trial's composed config (Lightning: one task per device)."""
    trainer = cfg.trainer
    devices = trainer.get("devices", 1)
    per_node = int(devices) if str(devices).isdigit() else 1
    resources: dict[str, Any] = {"nodes": int(trainer.get("num_nodes", 1) or 1), "tasks_per_node": per_node}
    if str(trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "auto"):
        resources["gpus_per_node"] = per_node
    return resources


def run_submitit(
    args: list[str],
    log_path: Path,
    env: dict[str, str],
    options: SubmititOptions,
    resources: dict[str, Any],
    while_waiting: Callable[[], None] | None = None,
) -> None:
    """Submit `args` as one job and wait for it, calling `while_waiting` about once a second; raises
    TrialFailed (with the trial log's tail) when the job fails. A KeyboardInterrupt cancels the job."""
    try:
        import submitit
    except ImportError as err:
        raise TrialFailed("sweep.launcher=submitit needs the submitit package: pip install 'lightning-mim[slurm]'") from err

    folder = log_path.parent / "submitit"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=None if options.cluster == "auto" else options.cluster)
    executor.update_parameters(**{**resources, "name": log_path.parent.name, **options.parameters})
    job = executor.submit(TrialCommand([*args, *options.trainer_overrides()], str(log_path), env))
    try:
        while not job.done():
            if while_waiting is not None:
                while_waiting()
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        job.cancel()
        raise
    try:
        job.result()
    except TrialFailed:
        raise
    except Exception as err:  # submitit wraps the job's exception (FailedJobError, UncompletedJobError)
        raise TrialFailed(f"submitit job {job.job_id} failed ({type(err).__name__}); trial log {log_path}:\n"
                          + "\n".join(str(err).strip().splitlines()[-15:])) from None


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux `PR_SET_PDEATHSIG`; a no-op
    elsewhere): a `preexec_fn` for every process the driver starts."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_local(args: list[str], log_path: Path, env: Mapping[str, str], while_waiting: Callable[[], None] | None = None) -> None:
    """Run `args` as a child process with its output appended to `log_path`, calling `while_waiting`
    about once a second until it exits; raises TrialFailed when it fails. Ctrl-C is passed on to it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(args)}\n".encode())
        log.flush()
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=dict(env), preexec_fn=die_with_parent)
        try:
            while True:
                try:
                    code = proc.wait(timeout=POLL_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    if while_waiting is not None:
                        while_waiting()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            proc.wait()
            raise
    if code != 0:
        raise failure(code, log_path)


def launch(
    launcher: str,
    args: list[str],
    log_path: Path,
    env: Mapping[str, str],
    cfg: Any,
    submitit_options: Mapping[str, Any] | None = None,
    while_waiting: Callable[[], None] | None = None,
) -> None:
    """Run a trial's command where `launcher` (one of LAUNCHERS) says: a child process here with `env`
    added to this process's environment, or a submitit job with the resources of the trial's config
    `cfg` (`job_resources`) and `submitit_options` ({cluster, parameters})."""
    if launcher == "submitit":
        options = SubmititOptions(**(submitit_options or {}))
        run_submitit(args, log_path, dict(env), options, job_resources(cfg), while_waiting)
    elif launcher == "local":
        run_local(args, log_path, {**os.environ, **env}, while_waiting)
    else:
        raise ValueError(f"unknown launcher '{launcher}'; valid: {', '.join(LAUNCHERS)}")
