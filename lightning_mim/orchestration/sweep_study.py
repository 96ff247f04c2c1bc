"""A sweep's Optuna study: opening it, the workers' critical sections, recovering the trials of dead
drivers, and what is left to run.

The study lives in an RDB (SQLite file by default, PostgreSQL for several nodes) under a name derived
from the sweep spec, so the same command finds it again: finished trials are skipped, failed ones are
retried `spec.retries` times, and the trials of a killed driver are detected (a dead pid on this host,
stale Optuna heartbeats elsewhere) and redone.

Public Optuna API only. What Optuna does privately under `study.optimize` and not under ask/tell is
done here through the storage's public methods:
- heartbeats (`Heartbeat`): a thread calling `storage.record_heartbeat(trial_id)`;
- a trial's storage id (`trial_id`): `storage.get_trial_id_from_study_id_trial_number`;
- suggesting a value from a stored distribution (`suggest`): the `suggest_*` call of its type.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from lightning_mim.locks import file_lock, pid_alive
from lightning_mim.orchestration.pruning import build_pruner, rdb_storage
from lightning_mim.orchestration.sweep_console import point_name
from lightning_mim.orchestration.summary import ROUNDS_ATTR, SEED_KEY, all_rounds, point_label
from lightning_mim.orchestration.sweep_spec import SweepSpec, search_space_for_tpe
from lightning_mim.sequential import RoundState, decide

HEARTBEAT_SECONDS = 30
# Failures that do not count as a try of the grid point.
INTERRUPTED = "interrupted"
DRIVER_DIED = "driver process died"
STALE = None  # Optuna's stale-heartbeat failures carry no error attribute


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler whose `after_trial` does not call `study.stop()` (which raises outside
    `study.optimize`); the driver's loop stops by itself when no grid point is left."""

    def after_trial(self, study, trial, state, values) -> None:  # noqa: D102
        return None


def point_key(params: dict[str, Any]) -> str:
    """A trial's point as one comparable string (params in key order)."""
    return json.dumps(params, sort_keys=True)


def _trial_point(trial: optuna.trial.FrozenTrial) -> str:
    """`point_key` of a trial's point, a queued trial's (its fixed params) included."""
    return point_key(trial.params or trial.system_attrs.get("fixed_params", {}))


def suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    """`trial`'s value of `name` from `distribution`, through the public `suggest_*` call of its type."""
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
    raise TypeError(f"{name}: unsupported distribution {distribution!r}")


def trial_id(study: optuna.Study, storage: optuna.storages.BaseStorage, number: int) -> int:
    """The storage's id of trial `number` of `study`."""
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


class Heartbeat:
    """Records Optuna heartbeats of one trial while the block runs (`with Heartbeat(...):`), as
    `study.optimize` does for its own trials; nothing for storages without heartbeats."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int) -> None:
        self.storage, self.trial_id = storage, trial_id
        self.interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self.storage.record_heartbeat(self.trial_id)

    def __enter__(self) -> "Heartbeat":
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


@contextmanager
def database_lock(storage_url: str, name: str) -> Iterator[None]:
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


def running_elsewhere(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a RUNNING trial is still being run, by a live worker on this host or by one elsewhere
    (whose heartbeats the next run of the sweep checks)."""
    attrs = trial.user_attrs
    if trial.state != TrialState.RUNNING:
        return False
    return attrs.get("host") != socket.gethostname() or pid_alive(int(attrs.get("pid", -1)))


def retries_due(trials: Sequence[optuna.trial.FrozenTrial], retries: int) -> dict[str, int]:
    """Point key -> tries so far, for each failed point to try again: no trial of it completed, is
    pruned, queued or running, and it raised at most `retries` times (a killed driver, Ctrl-C or a
    stale heartbeat is not a try)."""
    taken = {_trial_point(t) for t in trials
             if t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING, TrialState.PRUNED)}
    tries: dict[str, int] = {}
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.params:
            key = point_key(trial.params)
            counted = trial.user_attrs.get("error") not in (DRIVER_DIED, INTERRUPTED, STALE)
            tries[key] = tries.get(key, 0) + int(counted)
    return {key: count for key, count in tries.items() if key not in taken and count <= retries}


def incomplete_points(spec: SweepSpec, trials: Sequence[optuna.trial.FrozenTrial],
                      points: Sequence[dict[str, Any]] | None = None) -> list[str]:
    """The points a finished run of the sweep leaves without a result, as people write them: grid points
    (`points`, default every point of the grid; an adaptive sweep's are those its rounds asked for:
    `SweepStudy.wanted_points`) with no COMPLETE or PRUNED trial (nor one another worker is running);
    for search spaces, failed trials never redone well and the trials short of `sweep.n_trials`."""
    ended = {point_key(t.params) for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or running_elsewhere(t)}
    if spec.is_grid:
        return [point_name(p) for p in (spec.grid_points() if points is None else points) if point_key(p) not in ended]
    failed = {point_key(t.params): point_name(t.params) for t in trials if t.state == TrialState.FAIL and t.params}
    missing = [name for key, name in failed.items() if key not in ended]
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or running_elsewhere(t) for t in trials)
    short = max(0, spec.total_trials() - finished - len(missing))
    return missing + ([f"{short} more trial(s) of sweep.n_trials={spec.n_trials}"] if short else [])


class SweepStudy:
    """The Optuna study of one sweep spec, named `name`, in the RDB at `storage_url`; `lock_dir` holds
    the file locks of the workers that share this home."""

    def __init__(self, spec: SweepSpec, name: str, storage_url: str, lock_dir: Path) -> None:
        self.spec, self.name, self.storage_url, self.lock_dir = spec, name, storage_url, Path(lock_dir)
        self.storage = rdb_storage(storage_url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=4 * HEARTBEAT_SECONDS)

    def open(self) -> optuna.Study:
        """Create the study, or load it when it exists (several workers may race to create it)."""
        if self.spec.is_grid:
            sampler = AskTellGridSampler(self.spec.grid_space(), seed=0)
        else:
            sampler = optuna.samplers.TPESampler(seed=0)
        for attempt in range(5):
            try:
                return optuna.create_study(
                    study_name=self.name,
                    storage=self.storage,
                    sampler=sampler,
                    pruner=build_pruner(self.spec.effective_pruner()),
                    direction=self.spec.direction,
                    load_if_exists=True,
                )
            except optuna.exceptions.DuplicatedStudyError:
                time.sleep(0.5 * (attempt + 1))
        raise RuntimeError(f"could not create or load study {self.name}")

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """A critical section of this study's workers (`ask`: recovering and asking for trials, `parent`:
        creating the MLflow parent run): a file lock in `lock_dir` serializes the workers sharing this
        home; on PostgreSQL, a lock in the database also those of other nodes with homes of their own
        (without it, two workers restarting at once both enqueue the redo of a dead trial's point)."""
        with file_lock(self.lock_dir / f"{name}.lock"), database_lock(self.storage_url, f"{self.name}/{name}"):
            yield

    def recover(self, study: optuna.Study, end_dead_runs: Callable[[list[int]], None]) -> None:
        """Fail the trials of dead drivers (their MLflow runs are ended by `end_dead_runs(numbers)`) and
        enqueue retries of failed points.

        A RUNNING trial whose driver died is detected at once on this host (its pid is gone) and by
        stale heartbeats elsewhere. Kills and Ctrl-C do not count as tries; a trial that raised is
        retried `spec.retries` times in all.
        """
        with self.lock("ask"):
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            for trial in running:
                if not running_elsewhere(trial):  # its driver on this host is gone
                    self.fail(study, trial.number, DRIVER_DIED)
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            end_dead_runs(sorted({t.number for t in running} & {t.number for t in trials if t.state == TrialState.FAIL}))
            for key, count in retries_due(trials, self.spec.retries).items():
                study.enqueue_trial(json.loads(key), user_attrs={"retry": count})

    def fail(self, study: optuna.Study, number: int, error: str) -> None:
        """Mark trial `number` FAIL with `error`, whoever holds it."""
        tid = trial_id(study, self.storage, number)
        self.storage.set_trial_user_attr(tid, "error", error)
        self.storage.set_trial_state_values(tid, TrialState.FAIL)

    # -- sweep.seeds=auto: rounds ------------------------------------------------------------------
    def rounds(self, study: optuna.Study) -> list[RoundState]:
        """The decisions of an adaptive sweep's rounds so far, oldest first (the study's `ROUNDS_ATTR`)."""
        return all_rounds(study.user_attrs)

    def seed_targets(self, study: optuna.Study, rounds: Sequence[RoundState] | None = None) -> dict[str, int]:
        """Point label -> the seeds it is to have now: the first round's for every point, raised by
        each decided round's `seeds_to_add` (`rounds`: the study's, when the caller has read them)."""
        design = self.spec.design()
        targets = {point_label(p): design.first_round for p in self.spec.axis_points()}
        for state in self.rounds(study) if rounds is None else rounds:
            targets.update(state.seeds_to_add)
        return targets

    def wanted_points(self, study: optuna.Study, rounds: Sequence[RoundState] | None = None) -> list[dict[str, str]]:
        """The grid points (seed included) the rounds so far ask for: a point's seeds 0..target-1."""
        targets = self.seed_targets(study, rounds)
        return [{**p, SEED_KEY: str(seed)} for p in self.spec.axis_points() for seed in range(targets[point_label(p)])]

    def _enqueue_wanted(self, study: optuna.Study, trials: Sequence[optuna.trial.FrozenTrial]) -> None:
        """Queue the wanted points no trial holds yet (call under the `ask` lock)."""
        taken = {_trial_point(t) for t in trials}
        for point in self.wanted_points(study):
            if point_key(point) not in taken:
                study.enqueue_trial(point)

    def decide_round(self, study: optuna.Study) -> RoundState | None:
        """Under the `round` lock: when every trial the current round asked for has ended (complete, or
        failed for good: `sweep.retries` spent) and the last decision left points open, the next look's
        decision (`sequential.decide` on the complete trials' objective values), stored in the study
        before anything else happens; None when there is nothing to decide now (trials of the round
        still queued, running or due a retry — `recover` queues those —, or the round decided already,
        by this worker or another). Deciding is a pure function of the stored trials and decisions: a
        driver killed anywhere here decides the same on its rerun."""
        with self.lock("round"):
            rounds = self.rounds(study)
            if rounds and rounds[-1].finished:
                return None
            trials = study.get_trials(deepcopy=False)
            wanted = {point_key(p) for p in self.wanted_points(study, rounds)}
            pending = (TrialState.WAITING, TrialState.RUNNING)
            if (any(t.state in pending and _trial_point(t) in wanted for t in trials)
                    or wanted - {_trial_point(t) for t in trials} or wanted & set(retries_due(trials, self.spec.retries))):
                return None
            values: dict[str, dict[str, float]] = {point_label(p): {} for p in self.spec.axis_points()}
            for trial in trials:
                if trial.state == TrialState.COMPLETE and point_key(trial.params) in wanted:
                    point = {k: str(v) for k, v in trial.params.items() if k != SEED_KEY}
                    values[point_label(point)][str(trial.params[SEED_KEY])] = float(trial.value)
            state = decide(self.spec.design(), values, rounds[-1] if rounds else None)
            study.set_user_attr(ROUNDS_ATTR, [r.to_dict() for r in rounds] + [state.to_dict()])
            return state

    def remaining(self, study: optuna.Study) -> int:
        """Trials still to run: queued ones plus unvisited grid points (an adaptive sweep's: those its
        rounds asked for so far), or the search budget left."""
        trials = study.get_trials(deepcopy=False)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        if self.spec.adaptive:
            return waiting + len({point_key(p) for p in self.wanted_points(study)} - {_trial_point(t) for t in trials})
        if self.spec.is_grid:
            visited = {point_key(t.params) for t in trials if t.state != TrialState.WAITING}  # {}: a grid of one point
            points = {point_key(p) for p in self.spec.grid_points()}
            return waiting + len(points - visited)
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        return max(0, self.spec.total_trials() - finished)

    def has_work(self, study: optuna.Study) -> bool:
        """Whether a run of this sweep would train or evaluate anything: points left, trials of a killed
        run (RUNNING, WAITING) that `recover` takes up, or an adaptive sweep's undecided round. False for
        a finished sweep run again."""
        unfinished = (TrialState.RUNNING, TrialState.WAITING)
        if self.spec.adaptive:  # a round's trials all ended but not yet decided: the next round is work too
            rounds = self.rounds(study)
            if not rounds or not rounds[-1].finished:
                return True
        return self.remaining(study) > 0 or any(t.state in unfinished for t in study.get_trials(deepcopy=False))

    def ask(self, study: optuna.Study) -> tuple[optuna.Trial, dict[str, Any], int] | None:
        """The next trial with its params (stored at once, so other workers see its point as taken) and
        the trials left counting it; None when nothing is left."""
        with self.lock("ask"):
            if self.spec.adaptive:  # only the points the rounds asked for: the sampler never picks one itself
                self._enqueue_wanted(study, study.get_trials(deepcopy=False))
            remaining = self.remaining(study)
            if remaining == 0:
                return None
            trial = study.ask()
            return trial, self.suggest_params(trial), remaining

    def suggest_params(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's point: every grid axis (the seed included), or every search-space dimension."""
        if self.spec.is_grid:
            return {k: trial.suggest_categorical(k, v) for k, v in self.spec.grid_space().items()}
        return {key: suggest(trial, key, dist) for key, dist in search_space_for_tpe(self.spec).items()}

    def trial_id(self, trial: optuna.Trial) -> int:
        """The storage's id of a live trial (what a trial's process reports its pruning values to)."""
        return trial_id(trial.study, self.storage, trial.number)

    def heartbeat(self, trial: optuna.Trial) -> Heartbeat:
        return Heartbeat(self.storage, self.trial_id(trial))

    @staticmethod
    def quiet_heartbeat_warnings() -> None:
        """Optuna warns that heartbeats are experimental and meant for `optimize`: both are known here."""
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
