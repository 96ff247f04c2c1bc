"""`python -m lightning_mim.sweep [overrides]`: many runs, one Optuna study, one MLflow parent run.

The driver owns the Optuna trials; every trial's training runs as its own process
(`python -m lightning_mim.train ...`), which avoids Hydra-multirun + DDP relaunch problems and keeps a
crashing trial from taking the sweep down. Resumability comes from three places:
- the study lives in an RDB (SQLite file by default) under a name derived from the sweep spec, so the
  same command finds it again: finished trials are skipped, failed ones are retried `sweep.retries`
  times, trials of a killed driver are detected (dead pid on this host, or Optuna heartbeats) and redone;
- trained stage-2 models are cached by a hash of their training config (`orchestration.stages`), so trials that
  differ only in inference-only axes (`decode.*`) evaluate one checkpoint instead of retraining, and a
  killed training resumes from its last checkpoint;
- MLflow: the parent run id is stored in the study, so a resumed sweep keeps one parent.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from omegaconf import DictConfig
from optuna.trial import TrialState

from lightning_mim.orchestration.config import ConfigError, absolutize_paths, compose, report_config_error
from lightning_mim.locks import file_lock, pid_alive
from lightning_mim.orchestration.launchers import SubmititOptions, TrialFailed, failure, job_resources, run_submitit
from lightning_mim.orchestration.progress import SweepClock, describe, format_duration
from lightning_mim.orchestration.protocol import (
    PROGRESS_FILE,
    TrialContext,
    objective_metric,
    read_progress,
    read_result,
    result_path,
)
from lightning_mim.orchestration.pruning import build_pruner, rdb_storage
from lightning_mim.orchestration.schema import config_problems, format_problem
from lightning_mim.orchestration.stages import cached
from lightning_mim.orchestration.summary import (
    REPORTED_METRICS,
    SEED_KEY,
    comparison_legend,
    format_comparison,
    format_estimate,
    log_to_parent,
    outcomes_from_optuna,
    summarize,
)
from lightning_mim.orchestration.sweep_spec import SweepSpec, named_sweeps, parse, search_space_for_tpe, write_spec
from lightning_mim.orchestration.tracking import compare_runs_url, ensure_experiment, runs_table_url, ui_command

HEARTBEAT_SECONDS = 30


HELPER_FLAG = "--helper-worker"  # what `sweep.jobs=N` adds to the workers it starts
COMPARE_TAG = "lightning_mim.compare_url"  # on the parent run: MLflow's compare view of the finished children
POLL_SECONDS = 1.0  # how often the console reads the running trials' progress files
PROGRESS_STALE_S = 120  # a progress file untouched this long belongs to a trial that is gone

# Failures that do not count as a try of the grid point.
INTERRUPTED = "interrupted"
DRIVER_DIED = "driver process died"
STALE = None  # Optuna's stale-heartbeat failures carry no error attribute


@contextmanager
def _heartbeat(study: optuna.Study, trial: optuna.Trial):
    """Record Optuna heartbeats while a trial runs: `study.optimize` does this itself, ask/tell does
    not, so we start Optuna's own heartbeat thread (a no-op for storages without heartbeats)."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    with get_heartbeat_thread(trial._trial_id, study._storage):
        yield


@contextmanager
def _database_lock(storage_url: str, name: str):
    """A lock in the study's database, for workers that share no file system (nodes with homes of their
    own): PostgreSQL's session advisory lock on a key hashed from `name`, released when the block ends or
    the connection drops (a killed worker). Other databases: nothing (SQLite's workers share its file
    system, where the file locks serialize them)."""
    if not storage_url.startswith("postgresql"):
        yield
        return
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(storage_url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler whose `after_trial` does not call `study.stop()` (which raises outside
    `study.optimize`); our loop stops by itself when no grid point is left."""

    def after_trial(self, study, trial, state, values) -> None:  # noqa: D102
        return None


# -- process management ---------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Child processes are killed when the sweep driver dies (Linux), so no orphan keeps training."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _run_process(args: list[str], log_path: Path, env: dict[str, str], while_waiting: Callable[[], None] | None = None) -> None:
    """Run a trial's process with its output in `log_path`; `while_waiting` is called about once a
    second until it exits (the sweep's console)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(args)}\n".encode())
        log.flush()
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
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


def final_evaluation_only(cfg: DictConfig) -> list[str]:
    """Overrides that leave each evaluation callback of `cfg` (metrics, pictures, probes) only its
    end-of-training run. Callbacks are not part of the model's cache key: the trained weights are the
    same either way (evaluations draw from their own seeded generators, under `fork_rng`)."""
    out = []
    for name, spec in (cfg.get("callbacks") or {}).items():
        if spec:
            out += [f"callbacks.{name}.{key}=null" for key in ("every_n_steps", "every_n_epochs") if spec.get(key) is not None]
    return out


def point_name(params: dict[str, Any]) -> str:
    """A grid point as people write it: `schedule=cosine seed=1` (the seed last)."""
    def shown(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return " ".join(f"{k}={shown(v)}" for k, v in sorted(params.items(), key=lambda kv: (kv[0] == "seed", kv[0])))


# -- the sweep ------------------------------------------------------------------------------------
class Sweep:
    def __init__(self, spec: SweepSpec, base_overrides: Sequence[str] = ()) -> None:
        self.spec = spec
        probe = compose([*spec.fixed, *base_overrides])
        absolutize_paths(probe)
        self.home = Path(probe.paths.home)
        spec.resolve_seeds(int(probe.get("sweep_seeds", 1)))  # before the study name: seeds are an axis
        spec.resolve_jobs(int(probe.get("sweep_jobs", 1)))
        self.study_name = spec.study_name()
        self.sweep_dir = self.home / "sweeps" / self.study_name
        self.base_overrides = [*base_overrides, f"paths.home={self.home}"]
        self._validate_points()  # before anything is written
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        self.storage_url = spec.storage or f"sqlite:///{self.home}/optuna.db"
        self.tracking_uri = probe.logger.tracking_uri if "tracking_uri" in probe.logger else None
        self.experiment_name = str(probe.experiment_name)
        self.experiment_id = None
        if self.tracking_uri:
            self.experiment_id = ensure_experiment(self.tracking_uri, self.experiment_name, probe.logger.artifact_location)
        write_spec(spec, self.sweep_dir / "spec.yaml")

    def _validate_points(self) -> None:
        """Compose and check (`schema.check_config`) every grid point, or both bounds of every search
        space, up front: a bad value fails now, in one line naming the point, not in trial 7."""
        for point in self.spec.points_to_validate():
            cfg = compose([*self.spec.trial_overrides(point), *self.base_overrides])
            shown = " ".join(f"{k}={v}" for k, v in point.items() if k != "seed")
            lines = []
            for problem in config_problems(cfg):
                line = format_problem(problem)
                if shown and not (len(point) == 1 and line.startswith(f"{problem[0]}=") and problem[0] in point):
                    line = f"{'grid point' if self.spec.is_grid else 'search space at'} {shown}: {line}"
                lines.append(line)
            if lines:
                raise ConfigError("\n".join(lines))

    # -- storage and study ------------------------------------------------------------------------
    def storage(self) -> optuna.storages.BaseStorage:
        return rdb_storage(self.storage_url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=4 * HEARTBEAT_SECONDS)

    def study(self) -> optuna.Study:
        if self.spec.is_grid:
            sampler = _AskTellGridSampler(self.spec.grid_space(), seed=0)
        else:
            sampler = optuna.samplers.TPESampler(seed=0)
        for attempt in range(5):  # concurrent workers may race to create the same study
            try:
                return optuna.create_study(
                    study_name=self.study_name,
                    storage=self.storage(),
                    sampler=sampler,
                    pruner=build_pruner(self.spec.effective_pruner()),
                    direction=self.spec.direction,
                    load_if_exists=True,
                )
            except optuna.exceptions.DuplicatedStudyError:
                time.sleep(0.5 * (attempt + 1))
        raise RuntimeError(f"could not create or load study {self.study_name}")

    @contextmanager
    def _lock(self, name: str):
        """A critical section of this study's workers (`ask`: recovering and asking for trials, `parent`:
        creating the MLflow parent run): a file lock in the sweep directory serializes the workers sharing
        this home; on PostgreSQL, a lock in the database also those of other nodes with homes of their own
        (without it, two workers restarting at once both enqueue the redo of a dead trial's point)."""
        with file_lock(self.sweep_dir / f"{name}.lock"), _database_lock(self.storage_url, f"{self.study_name}/{name}"):
            yield

    def recover(self, study: optuna.Study) -> None:
        """Fail the trials of dead drivers and enqueue retries of failed points.

        A RUNNING trial whose driver died is detected at once on this host (its pid is gone) and by
        stale heartbeats elsewhere. Kills and Ctrl-C do not count as tries; a trial that raised is
        retried `spec.retries` times in all.
        """
        host = socket.gethostname()
        with self._lock("ask"):
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            for trial in running:
                attrs = trial.user_attrs
                if attrs.get("host") == host and not pid_alive(int(attrs.get("pid", -1))):
                    study._storage.set_trial_user_attr(trial._trial_id, "error", DRIVER_DIED)
                    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            dead = {t.number for t in running} & {t.number for t in trials if t.state == TrialState.FAIL}
            self._end_dead_runs(sorted(dead))
            taken = {
                json.dumps(t.params or t.system_attrs.get("fixed_params", {}), sort_keys=True)
                for t in trials
                if t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING, TrialState.PRUNED)
            }
            tries: dict[str, int] = {}
            for trial in trials:
                if trial.state == TrialState.FAIL and trial.params:
                    key = json.dumps(trial.params, sort_keys=True)
                    counted = trial.user_attrs.get("error") not in (DRIVER_DIED, INTERRUPTED, STALE)
                    tries[key] = tries.get(key, 0) + int(counted)
            for key, count in tries.items():
                if key not in taken and count <= self.spec.retries:
                    study.enqueue_trial(json.loads(key), user_attrs={"retry": count})

    def _trial_runs(self, client, number: int | str, condition: str = "") -> list:
        """The MLflow runs of this sweep's trial `number` (newest first), optionally further filtered."""
        query = f"tags.`lightning_mim.study` = '{self.study_name}' and tags.`optuna.trial_number` = '{number}' {condition}"
        return client.search_runs([self.experiment_id], filter_string=query.strip(), order_by=["attributes.start_time DESC"])

    def _end_dead_runs(self, numbers: list[int]) -> None:
        """End the MLflow runs of trials whose driver died (they would stay RUNNING for good): KILLED,
        with the reason as the `error` tag. The redone trial gets a run of its own."""
        if not numbers or not self.tracking_uri:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        for number in numbers:
            for run in self._trial_runs(client, number, "and attributes.status = 'RUNNING'"):
                client.set_tag(run.info.run_id, "error", f"{DRIVER_DIED}: the trial is redone by the next run of the sweep")
                client.set_terminated(run.info.run_id, status="KILLED")

    def remaining(self, study: optuna.Study) -> int:
        trials = study.get_trials(deepcopy=False)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        if self.spec.is_grid:
            visited = {json.dumps(t.params, sort_keys=True) for t in trials if t.state != TrialState.WAITING and t.params}
            points = {json.dumps(p, sort_keys=True) for p in self.spec.grid_points()}
            return waiting + len(points - visited)
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        return max(0, self.spec.total_trials() - finished)

    # -- MLflow parent run --------------------------------------------------------------------------
    def parent_run_id(self, study: optuna.Study) -> str | None:
        if not self.tracking_uri:
            return None
        from mlflow.tracking import MlflowClient

        with self._lock("parent"):
            study_attrs = study.user_attrs  # refreshed from storage
            if "mlflow_parent_run_id" in study_attrs:
                return study_attrs["mlflow_parent_run_id"]
            client = MlflowClient(tracking_uri=self.tracking_uri)
            run = client.create_run(
                self.experiment_id,
                run_name=f"sweep-{self.study_name}",
                tags={"lightning_mim.role": "sweep", "lightning_mim.study": self.study_name, "optuna.storage": self.storage_url},
            )
            client.log_artifact(run.info.run_id, str(self.sweep_dir / "spec.yaml"))
            study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
            return run.info.run_id

    # -- one trial ----------------------------------------------------------------------------------
    def objective(self, trial: optuna.Trial, parent_run_id: str | None) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = self._suggest(trial)
        overrides = [*self.spec.trial_overrides(params), *self.base_overrides]
        trial_dir = self.sweep_dir / f"trial-{trial.number:04d}"
        tags = {"lightning_mim.role": "trial", "lightning_mim.study": self.study_name, "optuna.trial_number": str(trial.number)}
        context = TrialContext(parent_run_id=parent_run_id, tags=tags, progress_file=str(trial_dir / PROGRESS_FILE),
                               objective=self.spec.objective)
        run_name = point_name(params) or f"trial-{trial.number:03d}"  # MLflow shows children by their point
        try:
            metrics, checkpoint = self._train_or_reuse(trial, overrides, trial_dir, run_name, context)
            trial.set_user_attr("checkpoint", checkpoint)  # the report finds the model's pictures beside it
        except optuna.TrialPruned:
            raise  # the training process already tagged its MLflow run optuna.state=PRUNED
        except Exception as err:
            trial.set_user_attr("error", str(err)[-2000:])
            self._record_failed_run(run_name, parent_run_id, tags, params, str(err))
            raise
        trial.set_user_attr("metrics", metrics)
        if self.spec.objective not in metrics:
            raise TrialFailed(f"objective '{self.spec.objective}' not among the trial's metrics: {', '.join(sorted(metrics))}")
        value = metrics[self.spec.objective]
        if value != value:  # NaN
            raise TrialFailed(f"objective '{self.spec.objective}' is NaN")
        self._log_objective(trial.number, value)
        return value

    def _log_objective(self, number: int, value: float) -> None:
        """The objective again as `objective/<name>` on the child run: one name to pick in MLflow's
        runs table, whatever the sweep optimises, and the metric MLflow's compare view starts on (the
        trial's process reserved the name as the run's first metric: `tracking.reserve_first_metric`)."""
        if not self.tracking_uri:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        for run in self._trial_runs(client, number)[:1]:  # the newest: a redone trial's run, not the dead one
            client.log_metric(run.info.run_id, objective_metric(self.spec.objective), float(value))

    def _suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        if self.spec.is_grid:
            space = self.spec.grid_space()
            return {k: trial.suggest_categorical(k, v) for k, v in space.items()}
        params = {}
        for key, dist in search_space_for_tpe(self.spec).items():
            params[key] = trial._suggest(key, dist)
        return params

    def _train_or_reuse(
        self, trial, overrides, trial_dir: Path, run_name: str, context: TrialContext
    ) -> tuple[dict[str, float], str]:
        """Train the stage-2 model for these training settings once (the stage cache); evaluate it for
        the rest. A pruned training is not marked done: the next trial with the same settings resumes it.
        Returns (the trial's metrics, the trained checkpoint)."""
        training_overrides = [o for o in overrides if not self.spec.is_inference_only(o.split("=", 1)[0].lstrip("+~"))]
        train_cfg = compose(training_overrides)
        absolutize_paths(train_cfg)

        final_only = [] if self.spec.keeps_intermediate_evals() else final_evaluation_only(train_cfg)

        def train(stage_dir: Path) -> dict[str, Any]:
            args = [sys.executable, "-m", "lightning_mim.train", *overrides, *final_only,
                    f"run_name='{run_name}'", f"paths.output_dir={stage_dir}", "ckpt_path=last"]
            pruning = dict(storage=self.storage_url, study=self.study_name, trial_id=trial._trial_id,
                           monitor=self.spec.objective, pruner=self.spec.effective_pruner())
            env = dataclasses.replace(context, pruning=pruning).environment()
            self._launch(args, trial_dir / "train.log", env, train_cfg)
            result = read_result(result_path(stage_dir))
            if result.get("pruned_at_step") is not None:
                raise optuna.TrialPruned(f"pruned at step {result['pruned_at_step']}")
            return {**result, "trained_by": run_name}

        trained, trained_now = cached(str(train_cfg.choices.get("model", "model")), train_cfg, train)
        if trained_now:
            return trained["metrics"], trained["checkpoint"]
        # A checkpoint trained by an earlier trial: evaluate it at this trial's inference settings.
        result_file = result_path(trial_dir)
        args = [sys.executable, "-m", "lightning_mim.evaluate", f"ckpt={trained['checkpoint']}", *overrides,
                f"run_name='{run_name}'", f"paths.output_dir={trial_dir}", f"result_file={result_file}"]
        self._launch(args, trial_dir / "evaluate.log", context.environment(), train_cfg)
        evaluated = read_result(result_file)
        return {**trained["metrics"], **evaluated["metrics"]}, trained["checkpoint"]

    def _launch(self, args: list[str], log_path: Path, env: dict[str, str], cfg: DictConfig) -> None:
        """Run a trial's command where `sweep.launcher` says: a child process here, or a submitit job
        (resources from the trial's config, `orchestration.launchers`)."""
        if self.spec.launcher == "submitit":
            options = SubmititOptions(**self.spec.submitit_options())
            run_submitit(args, log_path, env, options, job_resources(cfg), self._refresh_console)
        else:
            _run_process(args, log_path, {**os.environ, **env}, self._refresh_console)

    def _record_failed_run(self, run_name, parent_run_id, tags, params, error: str) -> None:
        """Make sure MLflow shows the failed trial as FAILED with its error, whatever state it died in."""
        if not self.tracking_uri:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        runs = self._trial_runs(client, tags["optuna.trial_number"])
        if runs:
            run_id = runs[0].info.run_id
        else:
            all_tags = {**tags, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
            run_id = client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
            for key, value in params.items():
                client.log_param(run_id, key, value)
        client.set_tag(run_id, "error", error[-4000:])
        client.set_terminated(run_id, status="FAILED")

    # -- driver -------------------------------------------------------------------------------------
    def prepare(self) -> optuna.Study:
        """Create the study, the MLflow experiment and the parent run (what a cluster driver does
        once before starting workers)."""
        study = self.study()
        self.parent_run_id(study)
        return study

    def has_work(self, study: optuna.Study) -> bool:
        """Whether a run of this sweep would train or evaluate anything: points left, or trials of a
        killed run (RUNNING, WAITING) that `run` recovers. False for a finished sweep run again."""
        unfinished = (TrialState.RUNNING, TrialState.WAITING)
        return self.remaining(study) > 0 or any(t.state in unfinished for t in study.get_trials(deepcopy=False))

    def run(self, finish: bool = True) -> list[optuna.trial.FrozenTrial]:
        """Run trials until the study is done; with `finish`, then write the parent run's aggregates
        (a `sweep.jobs` helper worker leaves that to the command that started it)."""
        study = self.study()
        self.recover(study)
        todo = self.remaining(study)
        total = len(self.spec.grid_points()) if self.spec.is_grid else self.spec.total_trials()
        parent = self.parent_run_id(study)
        print(f"sweep {self.study_name}: {total} trials in all, {todo} to run (storage {self.storage_url})")
        if todo > 0:
            self._optimize(study, todo, total, parent)
        if parent and finish:
            self._finish_parent(study, parent)
        return study.get_trials(deepcopy=False)

    def _optimize(self, study: optuna.Study, todo: int, total: int, parent: str | None) -> None:
        """Ask/tell loop: a trial is asked under a file lock only while grid points remain, so
        concurrent workers never create a duplicate; a heartbeat thread lets Optuna fail the trials of
        a worker that died on another node. The console shows every running trial's phase (from the
        trials' progress files) and an ETA from the trials this driver finished."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}")]
        clock = SweepClock(workers=self.spec.jobs)
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task("", total=total, completed=total - todo)
            while True:
                with self._lock("ask"):
                    remaining = self.remaining(study)
                    if remaining == 0:
                        break
                    with warnings.catch_warnings():  # heartbeats under ask/tell: we run the thread
                        warnings.filterwarnings("ignore", message="Heartbeat of storage")
                        trial = study.ask()
                    self._suggest(trial)  # params are stored now: other workers see the point as taken
                started = time.monotonic()
                self._console = lambda: progress.update(task, description=self._running_trials(
                    format_duration(clock.eta(remaining, time.monotonic() - started))))
                self._console()
                with _heartbeat(study, trial):
                    state, value = self._run_trial(trial, parent)
                self._console = None
                study.tell(trial, value, state=state)
                clock.finished(time.monotonic() - started)
                shown = "" if value is None else f" {self.spec.objective}={value:.4g}"
                progress.console.print(f"trial {trial.number} {state.name.lower()}{shown} {point_name(trial.params)} "
                                       f"({time.monotonic() - started:.0f} s)")
                running = sum(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
                progress.update(task, completed=max(0, total - self.remaining(study) - running))  # all workers

    _console: Callable[[], None] | None = None

    def _refresh_console(self) -> None:
        if self._console is not None:
            self._console()

    def _running_trials(self, eta: str) -> str:
        """ "trial 3: training 450/600 loss 3.912 | trial 4: evaluation at step 600 · ETA 4m10s": every
        trial of this sweep whose progress file is fresh (this worker's and the others')."""
        now, parts = time.time(), []
        for path in sorted(self.sweep_dir.glob(f"trial-*/{PROGRESS_FILE}")):
            record = read_progress(path)
            if record and record.get("phase") != "done" and now - record.get("time", 0) < PROGRESS_STALE_S:
                parts.append(f"trial {int(path.parent.name.split('-')[1])}: {describe(record)}")
        return " | ".join(parts + [eta])

    def _run_trial(self, trial: optuna.Trial, parent: str | None) -> tuple[TrialState, float | None]:
        try:
            return TrialState.COMPLETE, self.objective(trial, parent)
        except optuna.TrialPruned:
            return TrialState.PRUNED, None
        except KeyboardInterrupt:
            trial.set_user_attr("error", INTERRUPTED)
            self._study_tell_failed(trial)
            raise
        except Exception as err:  # recorded, reported at the end; the sweep goes on
            if "error" not in trial.user_attrs:
                trial.set_user_attr("error", f"{type(err).__name__}: {err}"[-2000:])
            return TrialState.FAIL, None

    @staticmethod
    def _study_tell_failed(trial: optuna.Trial) -> None:
        trial.study.tell(trial, state=TrialState.FAIL)

    def _finish_parent(self, study: optuna.Study, parent: str) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        client.log_metric(parent, "trials_complete", len(complete))
        client.log_metric(parent, "trials_failed", sum(t.state == TrialState.FAIL for t in trials))
        if complete:
            best = study.best_trial
            client.log_metric(parent, f"best_{self.spec.objective.replace('/', '_')}", best.value)
            client.set_tag(parent, "best_trial", str(best.number))
            for key, value in best.params.items():
                client.set_tag(parent, f"best.{key}", str(value))
            # the per-point aggregates over seeds: the numbers of the console table
            points = summarize(outcomes_from_optuna(trials), self.spec.objective, self.spec.direction,
                               inference_only=self.spec.is_inference_only)
            log_to_parent(client, parent, points, self.spec.objective)
            client.set_tag(parent, "best_point", points[0].label())
            client.set_tag(parent, "seeds_per_point", str(self.spec.seeds))
        children = self.finished_child_runs(client)
        if children:
            client.set_tag(parent, COMPARE_TAG, compare_runs_url(children, [self.experiment_id]))
        client.set_terminated(parent, status="FINISHED")

    def finished_child_runs(self, client=None) -> list[str]:
        """Ids of this sweep's FINISHED child runs (one per completed trial; trained or evaluated), in
        trial order: what the compare link opens."""
        from mlflow.tracking import MlflowClient

        client = client or MlflowClient(tracking_uri=self.tracking_uri)
        query = (f"tags.`lightning_mim.study` = '{self.study_name}' and tags.`lightning_mim.role` = 'trial' "
                 "and attributes.status = 'FINISHED'")
        runs = client.search_runs([self.experiment_id], filter_string=query, max_results=5000)
        runs.sort(key=lambda r: int(r.data.tags.get("optuna.trial_number", 0)))
        return [r.info.run_id for r in runs]


def print_summary(sweep: Sweep, trials: list[optuna.trial.FrozenTrial]) -> None:
    """The per-point table (`orchestration.summary`: mean ± 95 % interval over seeds, Welch's test
    against the best point, paired by seed between points that share their trained models), the
    trials that did not complete, and how to open the runs in MLflow."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)  # logs and CI: don't squash columns
    spec = sweep.spec
    outcomes = outcomes_from_optuna(trials)
    points = summarize(outcomes, spec.objective, spec.direction, inference_only=spec.is_inference_only)
    axes = sorted({k for o in outcomes for k in o.params if k != SEED_KEY})
    shown = [spec.objective, *(m for m in REPORTED_METRICS if m != spec.objective)]
    shown = [m for m in shown if any(m in p.estimates for p in points)] or [spec.objective]
    table = Table(
        title=f"sweep {sweep.study_name} — {spec.objective} ({spec.direction}); mean ± 95 % CI over seeds "
        f"(Student t), vs best: {comparison_legend(points)}"
    )
    for column in [*axes, "seeds", *shown, "vs best"]:
        table.add_column(column, justify="left" if column in axes else "right")
    for point in points:
        row = [point.params.get(k, "") for k in axes]
        row.append(str(len(point.values[spec.objective])))
        row += [format_estimate(point.estimates.get(m)) for m in shown]
        row.append(format_comparison(point))
        table.add_row(*row)
    console.print(table)
    if points and all(len(p.values[spec.objective]) < 2 for p in points):
        print("one seed per point: no interval and no test (run sweep.seeds=3 before reading small differences)")
    # plain prints: commands and URLs must stay on one line to be copy-pasted (rich wraps them)
    said = {"FAIL": "failed", "PRUNED": "pruned", "RUNNING": "still running"}
    for outcome in outcomes:
        if outcome.state in said:
            trial = next(t for t in trials if t.number == outcome.number)
            why = (trial.user_attrs.get("error") or "?").splitlines()[0] if outcome.state == "FAIL" else ""
            print(f"trial {outcome.number} {said[outcome.state]} {outcome.params}" + (f": {why}" if why else ""))
    if sweep.tracking_uri:
        print(f"MLflow UI:  {ui_command(sweep.tracking_uri)}")
        print(f"runs table: {runs_table_url(sweep.experiment_id)}")
        children = sweep.finished_child_runs()
        if children:
            print(f"compare:    {compare_runs_url(children, [sweep.experiment_id])}")
    print(f"study: {sweep.study_name} in {sweep.storage_url} (rerun the same command to resume)")


def write_sweep_report(sweep: Sweep) -> None:
    """The sweep's report (`orchestration.report`): figures per axis, samples, table; logged to the parent run."""
    from lightning_mim.orchestration import report

    try:
        study = report.find_study(sweep.home, sweep.study_name)
        files = report.write_report(study)
        if sweep.tracking_uri:
            report.log_report(study, sweep.tracking_uri, files)
    except Exception as err:  # a report problem must not turn a finished sweep into a failure
        print(f"report: not written ({type(err).__name__}: {err})", file=sys.stderr)
        return
    print(f"report:     {study.directory / report.REPORT_DIR} ({', '.join(p.name for p in files)}); "
          f"again: python -m lightning_mim.report {sweep.study_name}")


HELP = """usage: python -m lightning_mim.sweep [sweep=NAME] [AXIS=a,b,c ...] [KEY=VALUE ...] [sweep.OPTION=VALUE ...]

  AXIS=a,b,c                       grid axis (cartesian product with the other axes)
  KEY=choice(a,b) | range(lo,hi) | interval(lo,hi) | tag(log,interval(lo,hi))
                                   Optuna search space (TPE), needs sweep.n_trials=N
  KEY=VALUE                        fixed override for every trial (any train config key)
  sweep=NAME                       named study from sweeps/NAME.yaml: {names}
  sweep.objective=val/fid_domain   metric to optimise (sweep.direction=minimize|maximize)
  sweep.seeds=3                    train every grid point with seeds 0..2; the table shows mean ± 95 % CI
                                   and Welch's test against the best point, paired by seed where both
                                   points evaluate the same models (default: the preset's
                                   sweep_seeds, 3 for digits_*, 1 for imagenet256_*)
  sweep.jobs=2                     run 2 trials at once on this machine (worker processes sharing the study,
                                   the cores shared out; default: the preset's sweep_jobs, 2 for digits_*)
  sweep.pruner=median              prune trials on the objective's intermediate values: auto (median for
                                   search spaces, none for grids), none, median, percentile, hyperband
  sweep.intermediate_evals=auto    evaluations before a trial's last step: auto (only when a pruner
                                   reads them), true, false; the final evaluation always runs
  sweep.inference_only=decode.     axes that reuse one trained checkpoint (default: decode.*)
  sweep.launcher=submitit          run each trial as a SLURM job through submitit (default: local processes);
                                   sweep.submitit.cluster=local|slurm|auto, sweep.submitit.KEY=VALUE for
                                   AutoExecutor.update_parameters (timeout_min, slurm_partition, mem_gb, ...)
  sweep.storage=URL                Optuna RDB storage (default sqlite:///<paths.home>/optuna.db;
                                   postgresql://... for workers on several nodes)

Rerunning the same command resumes the study. Several workers may run the same command at once
(on a cluster, run it once with --prepare-only first to create the study and the MLflow parent run).
"""


def prepare_shared_stages(sweep: Sweep) -> None:
    """Train the stages every trial shares (today: the tokenizer) once, with all the cores, before
    several workers start: otherwise one worker trains it on one core while the others wait for it."""
    first = sweep.spec.points_to_validate()[0]
    cfg = compose([*sweep.spec.trial_overrides(first), *sweep.base_overrides])
    if "tokenizer" not in cfg.get("model", {}) or cfg.tokenizer.get("ckpt") or sweep.spec.launcher != "local":
        return  # nothing to train, or trials run as jobs elsewhere (not on the submitting node)
    log = sweep.sweep_dir / "stages.log"
    print(f"shared stages first (the tokenizer, all cores; cached after the first sweep; log {log})", flush=True)
    args = [sys.executable, "-m", "lightning_mim.train", "--stages-only", *sweep.spec.trial_overrides(first), *sweep.base_overrides]
    _run_process(args, log, dict(os.environ))


def start_local_workers(sweep: Sweep, argv: Sequence[str], jobs: int) -> list[subprocess.Popen]:
    """`sweep.jobs=N`: N-1 more workers of this same sweep on this machine (the multi-worker path of a
    cluster, on one host), so N trials train at once. The caller has created the study and the MLflow
    parent run (`Sweep.prepare`), so the workers do not race for them. Unless OMP_NUM_THREADS is set, the cores are shared out:
    tiny models use one core better than two (digits MaskGIT: two one-core trials train 1.25x faster than
    one two-core trial), so N trials at cores/N threads beat one trial on all the cores."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    args = [sys.executable, "-m", "lightning_mim.sweep", *(a for a in argv if not a.startswith("sweep.jobs=")), "sweep.jobs=1",
            HELPER_FLAG]
    workers = []
    for index in range(1, jobs):
        with open(sweep.sweep_dir / f"worker-{index}.log", "ab") as log:
            workers.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent))
    return workers


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(HELP.format(names=", ".join(named_sweeps()) or "(none)"))
        return 0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats
    warnings.filterwarnings("ignore", message=".*is experimental.*")
    prepare_only = "--prepare-only" in argv
    helper = HELPER_FLAG in argv  # started by `sweep.jobs=N`: runs trials, leaves the summary to its starter
    argv = [a for a in argv if a not in ("--prepare-only", HELPER_FLAG)]
    try:
        spec = parse(argv)
        sweep = Sweep(spec)
    except ConfigError as err:
        return report_config_error(err)
    if prepare_only:
        sweep.prepare()
        print(f"prepared study {sweep.study_name} in {sweep.storage_url}")
        return 0
    start = time.time()
    workers: list[subprocess.Popen] = []
    try:
        # helpers (and the shared stages first) only when there is work: a finished sweep's rerun needs none
        if spec.jobs > 1 and sweep.has_work(sweep.prepare()):
            prepare_shared_stages(sweep)
            workers = start_local_workers(sweep, argv, spec.jobs)
        trials = sweep.run(finish=not (helper or workers))
        if helper:
            return 0
        if workers:
            print(f"waiting for {len(workers)} more worker(s) to finish their trials (logs: {sweep.sweep_dir}/worker-*.log)")
            for worker in workers:
                worker.wait()
            study = sweep.study()
            parent = sweep.parent_run_id(study)
            if parent:  # the helpers' trials are in now: the parent run's aggregates cover every trial
                sweep._finish_parent(study, parent)
            trials = study.get_trials(deepcopy=False)
    except KeyboardInterrupt:
        for worker in workers:
            worker.send_signal(signal.SIGINT)
        for worker in workers:
            worker.wait()
        print("\ninterrupted: the study is saved; rerun the same command to resume", file=sys.stderr)
        return 130
    print_summary(sweep, trials)
    write_sweep_report(sweep)
    print(f"wall time {time.time() - start:.0f} s")
    failed = sum(t.state == TrialState.FAIL for t in trials)
    return 1 if failed and not any(t.state == TrialState.COMPLETE for t in trials) else 0


if __name__ == "__main__":
    sys.exit(main())
