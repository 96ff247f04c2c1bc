"""The sweep driver's decisions that need no trial process: which points a finished run leaves without
a result (its exit status), when an adaptive sweep's round is decided, and Optuna's public API standing
in for the private one."""

from __future__ import annotations

import socket

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from lightning_mim.orchestration.sweep_spec import parse
from lightning_mim.orchestration.sweep_study import Heartbeat, incomplete_points, suggest, trial_id
from lightning_mim.verdicts import UNTESTABLE

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


# -- sweep.seeds=auto: a round is decided once its trials have ended for good -------------------------
AUTO = ["schedule=cosine,linear", "sweep.seeds=auto", "sweep.first_round=2", "sweep.round_size=1", "sweep.max_seeds=3"]
# at 2 seeds a paired t-test has 1 degree of freedom: these values (differences 0.3, 0.0) leave the pair open
VALUES = {("cosine", "0"): 1.0, ("cosine", "1"): 1.2, ("linear", "0"): 1.3, ("linear", "1"): 1.2}


def _auto_sweep(home, monkeypatch, *extra):
    from lightning_mim.orchestration.sweep import Sweep

    monkeypatch.setenv("LIGHTNING_MIM_HOME", str(home))
    sweep = Sweep(parse([*AUTO, *extra]))
    return sweep, sweep.create_stores()


def _end_queued(sweep, study, failing=None):
    """End every trial the rounds have queued, as a worker would: told its value, or failed with an
    error (an exception in the trial: a try) when its (schedule, seed) is `failing`."""
    while (asked := sweep.study.ask(study)) is not None:
        trial, params, _ = asked
        point = (params["schedule"], params["seed"])
        if point == failing:
            sweep.study.fail(study, trial.number, "RuntimeError: boom")
        else:
            study.tell(trial, VALUES.get(point, 1.0))


def test_a_failed_trial_is_retried_before_its_round_is_decided(tmp_path, monkeypatch):
    sweep, study = _auto_sweep(tmp_path, monkeypatch)  # sweep.retries=1
    _end_queued(sweep, study, failing=("linear", "1"))
    assert sweep._next_round(study) is True  # the retry is queued, the round waits for it
    assert sweep.study.rounds(study) == []
    queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in queued] == [{"schedule": "linear", "seed": "1"}]
    _end_queued(sweep, study)
    assert sweep._next_round(study) is True  # decided on every seed, the second round queued
    (first,) = sweep.study.rounds(study)
    assert first.seeds == 2 and not first.finished
    assert sweep.study.remaining(study) == 2  # seed 2 of each point


def test_a_round_is_decided_without_a_point_whose_retries_are_spent(tmp_path, monkeypatch):
    sweep, study = _auto_sweep(tmp_path, monkeypatch, "sweep.retries=0")
    _end_queued(sweep, study, failing=("linear", "1"))
    assert sweep._next_round(study) is True
    (first,) = sweep.study.rounds(study)
    assert first.pairs[0].status == UNTESTABLE  # linear has 1 seed of the look's 2


def test_a_worker_goes_on_with_the_round_another_worker_decided(tmp_path, monkeypatch):
    sweep, study = _auto_sweep(tmp_path, monkeypatch)
    _end_queued(sweep, study)
    other = sweep.study.decide_round(study)  # another worker, sharing the study, decides first
    assert other is not None and not other.finished
    assert sweep.study.decide_round(study) is None  # decided: nothing to decide until its trials end
    assert sweep._next_round(study) is True  # this worker runs the next round's trials too
    _end_queued(sweep, study)
    assert sweep._next_round(study) is False  # the last look decides every pair: the design is done
    assert [r.seeds for r in sweep.study.rounds(study)] == [2, 3] and sweep.study.rounds(study)[-1].finished
