"""The sweep driver's decisions that need no trial process: which points a finished run leaves without
a result (its exit status), and Optuna's public API standing in for the private one."""

from __future__ import annotations

import socket

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from lightning_mim.orchestration.sweep_spec import parse
from lightning_mim.orchestration.sweep_study import Heartbeat, incomplete_points, suggest, trial_id

GRID = CategoricalDistribution(["cosine", "linear", "sqrt"])


def _trial(state, schedule, **attrs):
    return create_trial(state=state, params={"schedule": schedule}, distributions={"schedule": GRID},
                        value=1.0 if state == TrialState.COMPLETE else None, user_attrs=attrs)


def test_a_grid_point_without_a_result_is_incomplete_unless_a_live_worker_runs_it():
    spec = parse(["schedule=cosine,linear,sqrt"])
    spec.resolve_seeds(1)
    here = socket.gethostname()
    trials = [
        _trial(TrialState.COMPLETE, "cosine"),
        _trial(TrialState.FAIL, "linear"),
        _trial(TrialState.RUNNING, "sqrt", host="another-node", pid=1),  # its heartbeats are the judge
    ]
    assert incomplete_points(spec, trials) == ["schedule=linear"]
    dead = [*trials[:2], _trial(TrialState.RUNNING, "sqrt", host=here, pid=2**22 + 12345)]  # no such pid
    assert incomplete_points(spec, dead) == ["schedule=linear", "schedule=sqrt"]
    redone = [*trials, _trial(TrialState.COMPLETE, "linear")]
    assert incomplete_points(spec, redone) == []


def test_a_search_space_is_incomplete_by_failed_points_and_trials_short_of_its_budget():
    spec = parse(["model.optim.lr=interval(1e-4,1e-2)", "sweep.n_trials=4"])
    spec.resolve_seeds(1)
    dist = {"model.optim.lr": FloatDistribution(1e-4, 1e-2)}
    trials = [create_trial(state=TrialState.COMPLETE, params={"model.optim.lr": 1e-3}, distributions=dist, value=1.0),
              create_trial(state=TrialState.FAIL, params={"model.optim.lr": 5e-3}, distributions=dist)]
    assert incomplete_points(spec, trials) == ["model.optim.lr=0.005", "2 more trial(s) of sweep.n_trials=4"]


def test_public_suggest_gives_each_distribution_its_own_kind_of_value():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    assert suggest(trial, "a", CategoricalDistribution(["x", "y"])) in ("x", "y")
    assert isinstance(suggest(trial, "b", IntDistribution(1, 9, step=2)), int)
    value = suggest(trial, "c", FloatDistribution(1e-4, 1e-2, log=True))
    assert 1e-4 <= value <= 1e-2
    assert trial.distributions["c"] == FloatDistribution(1e-4, 1e-2, log=True)  # stored as given


def test_heartbeats_reach_the_storage_through_its_public_api(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/o.db", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    tid = trial_id(study, storage, trial.number)
    import sqlite3

    def beats() -> int:
        with sqlite3.connect(tmp_path / "o.db") as db:
            return db.execute("SELECT count(*) FROM trial_heartbeats WHERE trial_id = ?", (tid,)).fetchone()[0]

    before = beats()
    with Heartbeat(storage, tid) as beat:
        assert beat.interval == 1
        assert beats() == 1
    assert before == 0
