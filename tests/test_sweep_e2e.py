"""`python -m lightning_mim.sweep` end to end on tiny budgets: Optuna trials, MLflow runs, resume,
kills, concurrent workers, stage reuse, failures, and the notebook read back from MLflow."""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from conftest import run_module

pytestmark = pytest.mark.slow


def _trials(home: Path):
    storage = f"sqlite:///{home}/optuna.db"
    summaries = optuna.study.get_all_study_summaries(storage)
    assert len(summaries) == 1, [s.study_name for s in summaries]
    study = optuna.load_study(study_name=summaries[0].study_name, storage=storage)
    return study, study.get_trials(deepcopy=False)


def _any_trial_complete(home: Path) -> bool:
    """Whether the driver's study has a complete trial, read without Optuna: opening a store through
    Optuna (or MLflow) creates its tables when they are missing, and two processes creating the tables
    of a fresh SQLite file at once make one of them fail, here the driver ("table studies already
    exists"). A read-only connection creates nothing."""
    import sqlite3

    db = home / "optuna.db"
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0] > 0
    except sqlite3.Error:  # no tables yet, or a write in progress
        return False


def _complete_params(trials):
    return [json.dumps(t.params, sort_keys=True) for t in trials if t.state == optuna.trial.TrialState.COMPLETE]


def _child_runs(home: Path, parent_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, tiny_stage2_overrides):
    """A 2-point x 2-seed sweep (schedule, sweep.seeds=2) with CAS as a second family of tests, run once;
    other tests read its results."""
    home = tmp_path_factory.mktemp("sweep-2x2")
    args = ["schedule=cosine,sqrt", "sweep.seeds=2", "sweep.secondary=val/cas:maximize:0.05", *tiny_stage2_overrides]
    proc = run_module("lightning_mim.sweep", args, home)
    return home, args, proc


def test_grid_sweep_gives_complete_trials_and_nested_mlflow_runs(grid_sweep):
    home, _, proc = grid_sweep
    study, trials = _trials(home)
    complete = _complete_params(trials)
    assert len(trials) == 4 and len(complete) == 4 and len(set(complete)) == 4
    assert {t.params["seed"] for t in trials} == {"0", "1"}
    # each trial records its evaluation protocol and scores a second draw of samples (evaluation.second_draw)
    assert all(t.user_attrs["evaluation_protocol"]["evaluation.num_samples"] == 20 for t in trials)
    assert all("val/fid_domain_draw2" in t.user_attrs["metrics"] for t in trials)
    assert "evaluation noise:" in proc.stdout and "of the seed-to-seed variance of val/fid_domain" in proc.stdout
    children = _child_runs(home, study.user_attrs["mlflow_parent_run_id"])
    assert len(children) == 4
    assert {r.data.params["schedule.name"] for r in children} == {"cosine", "sqrt"}
    assert all(r.info.status == "FINISHED" for r in children)
    assert all("val/fid_domain" in r.data.metrics and "val/cas" in r.data.metrics for r in children)
    assert sorted(r.data.tags["optuna.trial_number"] for r in children) == ["0", "1", "2", "3"]
    # what the numbers depend on besides the config
    assert all(r.data.tags["env.torch"] and r.data.tags["env.torch_threads"].isdigit() for r in children)
    assert {r.data.tags["env.device"] for r in children} == {"cpu"}
    # the resolved config and the sample pictures are artifacts of every trial run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    for run in children:
        top = {a.path for a in client.list_artifacts(run.info.run_id)}
        images = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
        assert "config.yaml" in top
        assert any("class_grid" in p and p.endswith(".png") for p in images)
        assert any("progression" in p and p.endswith(".png") for p in images)
    # the printed summary: table, MLflow UI command and the runs-table URL
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    assert "workflowType=machine_learning" in proc.stdout
    # children are named by their point, and the params that differ between them are the swept axes
    assert sorted(r.info.run_name for r in children) == sorted(f"schedule={s} seed={i}" for s in ("cosine", "sqrt") for i in range(2))
    keys = set().union(*(r.data.params for r in children))
    differing = {k for k in keys if len({r.data.params.get(k) for r in children}) > 1}
    assert differing == {"seed", "schedule.name"}, differing  # the axis once, however it was typed
    assert all(not v.startswith("/") for r in children for v in r.data.params.values())  # paths are tags
    assert all(r.data.tags["path.callbacks.pictures.out_dir"].startswith(str(home)) for r in children)
    # the objective is set on every child under one name, whatever the sweep's objective is
    for run in children:  # (the trial's result holds the value as float32, MLflow's metric as a double)
        assert run.data.metrics["objective/val/fid_domain"] == pytest.approx(run.data.metrics["val/fid_domain"], rel=1e-6)
        # ... and is the run's first metric, the one MLflow's compare view opens on
        assert next(iter(run.data.metrics)) == "objective/val/fid_domain", list(run.data.metrics)


def test_the_sweep_writes_its_report_and_logs_it_to_the_parent_run(grid_sweep):
    from mlflow.tracking import MlflowClient

    home, _, proc = grid_sweep
    study, _ = _trials(home)
    directory = home / "sweeps" / study.study_name / "report"
    assert sorted(p.name for p in directory.iterdir()) == ["axis-schedule.png", "samples.png", "summary.md"]
    assert f"report:     {directory}" in proc.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    logged = {a.path for a in client.list_artifacts(study.user_attrs["mlflow_parent_run_id"], "report")}
    assert logged == {"report/axis-schedule.png", "report/samples.png", "report/summary.md"}


def test_the_compare_link_opens_exactly_the_finished_children(grid_sweep):
    from urllib.parse import unquote

    from mlflow.tracking import MlflowClient

    home, _, proc = grid_sweep
    study, _ = _trials(home)
    parent = study.user_attrs["mlflow_parent_run_id"]
    children = _child_runs(home, parent)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("compare:"))
    url = line.split(maxsplit=1)[1]
    assert url.startswith("http://127.0.0.1:5000/#/compare-runs?")  # the UI the printed command starts:
    assert f"MLflow UI:  mlflow ui --backend-store-uri sqlite:///{home}/mlflow.db --host 127.0.0.1 --port 5000" in proc.stdout
    route, query = unquote(url).split("#/compare-runs?", 1)
    runs_part, experiments_part = query.split("&experiments=")
    assert sorted(json.loads(runs_part.removeprefix("runs="))) == sorted(r.info.run_id for r in children)
    assert json.loads(experiments_part) == [children[0].info.experiment_id]
    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    assert client.get_run(parent).data.tags["lightning_mim.compare_url"] == url


def test_rerunning_the_same_sweep_runs_nothing(grid_sweep):
    home, args, _ = grid_sweep
    proc = run_module("lightning_mim.sweep", args, home)
    assert "0 to run" in proc.stdout
    _, trials = _trials(home)
    assert len(trials) == 4


README_NOTEBOOK_COMMAND = "jupyter execute --output=ablations-run notebooks/ablations.ipynb"


def test_readmes_notebook_command_shows_the_latest_sweep_with_no_settings(grid_sweep, tmp_path):
    """README's notebook command, as written, from a directory holding `notebooks/` and the default home
    `lmim/` (a clone after a sweep), `LIGHTNING_MIM_HOME` unset: the kernel runs in `notebooks/` and
    finds `../lmim`; the written notebook shows the report's table and figures and the MLflow parent
    run's table, read through the tracking URI the sweep recorded."""
    import nbformat

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"\n{README_NOTEBOOK_COMMAND}   #" in readme  # the command README gives is the one run here
    home, _, _ = grid_sweep
    study, _ = _trials(home)
    (tmp_path / "notebooks").mkdir()
    shutil.copy(Path(__file__).parents[1] / "notebooks" / "ablations.ipynb", tmp_path / "notebooks")
    (tmp_path / "lmim").symlink_to(home)  # the default home, beside notebooks/
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_MIM_HOME"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # the venv's jupyter
    proc = subprocess.run(README_NOTEBOOK_COMMAND, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    notebook = nbformat.read(tmp_path / "notebooks" / "ablations-run.ipynb", as_version=4)
    outputs = "".join(str(o.get("text", "")) + str((o.get("data") or {}).get("text/markdown", ""))
                      for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert f"study {study.study_name}: 4 trials, 2 grid points, axes ['schedule']" in outputs
    assert "| schedule | seeds | val/fid_domain |" in outputs  # the report's table
    images = sum(1 for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in (o.get("data") or {}))
    assert images >= 2  # the schedule axis figure and the samples
    for line in _point_lines(home, study):  # the same numbers as the sweep's console table
        assert line in outputs, line
    assert "compare the runs in MLflow: http://127.0.0.1:5000/#/compare-runs?runs=" in outputs
    assert "## Second family of tests: val/cas (maximize)" in outputs  # sweep.secondary's family
    assert "| val/cas: " in outputs  # its verdicts read back from the parent run's points.json


def _point_lines(home: Path, study) -> list[str]:
    """`<point> (n=2): val/fid_domain 3.1000 ± 0.4000; ...` of every row of the parent run's points.json."""
    from mlflow.tracking import MlflowClient

    from lightning_mim.orchestration.summary import estimates_from_row, format_estimate, rows_from_table_artifact

    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    path = client.download_artifacts(study.user_attrs["mlflow_parent_run_id"], "points.json", str(home / "dl"))
    rows = rows_from_table_artifact(json.loads(Path(path).read_text()))
    return [
        f"{row['point']} (n={row['n_seeds']}): "
        + "; ".join(f"{name} {format_estimate(est)}" for name, est in estimates_from_row(row).items())
        for row in rows
    ]


def test_console_table_and_mlflow_parent_run_agree(grid_sweep):
    """Per point: 2 seeds pooled into mean ± 95 % interval; the console shows what the parent run stores."""
    from mlflow.tracking import MlflowClient

    from lightning_mim.orchestration.summary import estimates_from_row, format_estimate, rows_from_table_artifact

    home, _, proc = grid_sweep
    study, trials = _trials(home)
    parent = study.user_attrs["mlflow_parent_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    path = client.download_artifacts(parent, "points.json", str(home / "dl-console"))
    rows = rows_from_table_artifact(json.loads(Path(path).read_text()))
    assert sorted(r["schedule"] for r in rows) == ["cosine", "sqrt"] and {r["n_seeds"] for r in rows} == {2}
    metrics = client.get_run(parent).data.metrics
    for row in rows:
        fid = [t.user_attrs["metrics"]["val/fid_domain"] for t in trials if t.params["schedule"] == row["schedule"]]
        assert row["val/fid_domain mean"] == pytest.approx(sum(fid) / 2)
        estimate = estimates_from_row(row)["val/fid_domain"]
        assert estimate.low < estimate.mean < estimate.high
        assert format_estimate(estimate) in proc.stdout  # the console table's cell
        assert metrics[f"point/schedule_{row['schedule']}/val/fid_domain/mean"] == pytest.approx(row["val/fid_domain mean"])
    worse = next(r for r in rows if r["verdict"] != "best")
    assert 0 <= worse["p_vs_best"] <= 1 and f"{worse['verdict']} (p={worse['p_vs_best']:.2g}, paired)" in proc.stdout
    assert "mean ± 95 % CI over seeds" in proc.stdout
    # every pair on the parent run too, with the options the verdicts were read with: the objective's
    # family, then the second family's (sweep.secondary=val/cas:maximize:0.05), each Holm on its own
    path = client.download_artifacts(parent, "comparisons.json", str(home / "dl-pairs"))
    pair, cas_pair = rows_from_table_artifact(json.loads(Path(path).read_text()))
    assert pair["metric"] == "val/fid_domain" and pair["equivalence"] is None
    assert pair["test"] == "paired" and pair["p_adjusted"] == pytest.approx(worse["p_vs_best"]) and pair["alpha"] == 0.05
    assert "Holm-adjusted" in proc.stdout and pair["verdict"] in proc.stdout
    assert cas_pair["metric"] == "val/cas" and cas_pair["equivalence"] == 0.05 and cas_pair["test"] == "paired"
    cas = {r["schedule"]: [t.user_attrs["metrics"]["val/cas"] for t in trials if t.params["schedule"] == r["schedule"]]
           for r in rows}
    assert cas_pair["difference"] == pytest.approx(sum(cas[cas_pair["a"].split("=")[1]]) / 2 - sum(cas[cas_pair["b"].split("=")[1]]) / 2)
    assert {r["verdict val/cas"] for r in rows} <= {"best", "worse than best", "not distinguished from best",
                                                    "equivalent to best"} and "best" in {r["verdict val/cas"] for r in rows}
    assert client.get_run(parent).data.tags["sweep.secondary"] == "val/cas:maximize:0.05"
    flat = " ".join(proc.stdout.split())
    assert "second family of tests: val/cas (maximize)" in flat and "within ±0.05 by two one-sided tests" in flat
    summary_md = (home / "sweeps" / study.study_name / "report" / "summary.md").read_text()
    assert "## Second family of tests: val/cas (maximize)" in summary_md


# One kill per run of the same command, each at the first time the sweep reaches that phase, in the
# order a trial passes through them: the driver's phases (protocol.DRIVER_PHASES) and the trial
# processes' own (progress phases). The grid's two points share one trained model (decode.steps is
# inference-only), so the chain goes through a training (set-up, training, its final evaluation, after
# it) and an evaluation of the trained checkpoint (the `logging` kill leaves the first point's model
# recorded in the stage cache: its redo and the second point evaluate it).
KILL_CHAIN = [
    {"phase": "asked"},
    {"phase": "set-up"},
    {"phase": "training", "min_step": 4},  # last.ckpt holds step 3
    {"phase": "evaluation"},  # the final evaluation starts (step 6; last.ckpt still at 3)
    {"phase": "done"},  # after fit: last.ckpt at the budget, no result yet
    {"phase": "exited"},  # the training process ended, the stage cache has not recorded it
    {"phase": "recorded"},  # recorded, Optuna not told, MLflow not updated
    {"phase": "logging"},  # the objective is being logged
    {"phase": "evaluation"},  # now inside the evaluation process of the recorded model
]


def _point_metrics(home: Path) -> dict[str, dict[str, float]]:
    from lightning_mim.orchestration.summary import REPORTED_METRICS

    _, trials = _trials(home)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == len({json.dumps(t.params, sort_keys=True) for t in complete})  # no point twice
    return {json.dumps(t.params, sort_keys=True): {m: t.user_attrs["metrics"].get(m) for m in REPORTED_METRICS}
            for t in complete}


def test_a_sweep_killed_at_any_phase_resumes_to_the_uninterrupted_numbers(tmp_path, tiny_stage2_overrides):
    """SIGKILL of the driver and every process it started, placed by the phase hook at each phase of a
    trial in turn, then the same command again: every point completes, with the uninterrupted sweep's
    numbers, one FINISHED MLflow run per point and the dead trials' runs ended."""
    args = [*tiny_stage2_overrides, "decode.steps=2,4"]  # after the fixed decode.steps=4
    reference = tmp_path / "uninterrupted"
    run_module("lightning_mim.sweep", args, reference)
    expected = _point_metrics(reference)
    assert len(expected) == 2

    home = tmp_path / "killed"
    tests_dir = str(Path(__file__).parent)
    hook = {"LIGHTNING_MIM_PHASE_HOOK": "_sweep_kill:kill_sweep_at",
            "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    for kill in KILL_CHAIN:
        env = {**os.environ, **hook, "LIGHTNING_MIM_HOME": str(home), "LIGHTNING_MIM_TEST_KILL_AT": json.dumps(kill)}
        proc = subprocess.run([sys.executable, "-m", "lightning_mim.sweep", *args], env=env, capture_output=True,
                              text=True, timeout=600, start_new_session=True)
        assert proc.returncode == -signal.SIGKILL, (kill, proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    proc = run_module("lightning_mim.sweep", args, home)
    assert "incomplete" not in proc.stdout

    assert _point_metrics(home) == expected  # to the last digit
    study, trials = _trials(home)
    children = _child_runs(home, study.user_attrs["mlflow_parent_run_id"])
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(r.info.run_name for r in finished) == ["decode.steps=2", "decode.steps=4"]
    assert not [r for r in children if r.info.status == "RUNNING"]
    killed = [r for r in children if r.info.status == "KILLED"]
    assert killed and all("driver process died" in r.data.tags["error"] for r in killed)


def test_inference_only_axis_trains_once(tmp_path, tiny_stage2_overrides):
    home = tmp_path
    overrides = [o for o in tiny_stage2_overrides if not o.startswith("decode.steps")]
    run_module("lightning_mim.sweep", ["decode.steps=2,4,8", *overrides], home)
    _, trials = _trials(home)
    assert len(_complete_params(trials)) == 3
    trained = list((home / "cache" / "stages").glob("maskgit-*/done.json"))
    assert len(trained) == 1
    train_logs = list((home / "sweeps").glob("*/trial-*/train.log"))
    eval_logs = list((home / "sweeps").glob("*/trial-*/evaluate.log"))
    assert len(train_logs) == 1 and len(eval_logs) == 2
    fids = {t.params["decode.steps"]: t.user_attrs["metrics"]["val/fid_domain"] for t in trials}
    assert len(set(fids.values())) == 3  # each T really evaluated
    # the training run and the two evaluation runs all list the objective first, with its value
    study, _ = _trials(home)
    children = _child_runs(home, study.user_attrs["mlflow_parent_run_id"])
    assert len(children) == 3
    for run in children:
        assert next(iter(run.data.metrics)) == "objective/val/fid_domain", list(run.data.metrics)
        assert run.data.metrics["objective/val/fid_domain"] == pytest.approx(fids[run.data.params["decode.steps"]], rel=1e-6)


def test_failing_trial_is_recorded_and_the_others_finish(tmp_path, tiny_stage2_overrides):
    home = tmp_path
    # a value every config check accepts that fails inside the trial's training process (a bad value the
    # checks know of stops the sweep before any trial: tests/test_bad_input.py)
    fail = ["+callbacks.fail._target_=_killer.RaiseIf", "+callbacks.fail.key=label_smoothing", "+callbacks.fail.value=0.2"]
    tests_dir = str(Path(__file__).parent)
    proc = run_module("lightning_mim.sweep", ["model.label_smoothing=0.1,0.2", *fail, *tiny_stage2_overrides], home,
                      env={"PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]  # a point without a result: 1 (2 is for bad input)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("incomplete: 1 point(s) without a result: model.label_smoothing=0.2"), last
    study, trials = _trials(home)
    states = {t.params["model.label_smoothing"]: t.state for t in trials}
    assert states["0.1"] == optuna.trial.TrialState.COMPLETE
    assert states["0.2"] == optuna.trial.TrialState.FAIL
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and "RaiseIf: label_smoothing=0.2" in failed[0].user_attrs["error"]
    assert "failed" in proc.stdout
    children = _child_runs(home, study.user_attrs["mlflow_parent_run_id"])
    status = Counter((r.data.params["model.label_smoothing"], r.info.status) for r in children)
    assert status == {("0.1", "FINISHED"): 1, ("0.2", "FAILED"): 1}
    failed_run = [r for r in children if r.info.status == "FAILED"][0]
    assert "RaiseIf: label_smoothing=0.2" in failed_run.data.tags["error"]


def test_pruned_trial_stops_early_and_stays_pruned(tmp_path, tiny_stage2_overrides):
    """`sweep.pruner=median`: the training process reports each new objective value to the driver's
    trial; against five earlier trials that were far better at every step, the first report prunes it."""
    home = tmp_path
    args = ["schedule=cosine,linear", "sweep.pruner=median", "callbacks.generation_metrics.every_n_steps=3", *tiny_stage2_overrides]
    run_module("lightning_mim.sweep", ["--prepare-only", *args], home)
    study, _ = _trials(home)
    for _ in range(5):  # MedianPruner needs 5 finished trials before it prunes; these take the `linear` point
        study.add_trial(
            optuna.trial.create_trial(
                params={"schedule": "linear"},
                distributions={"schedule": optuna.distributions.CategoricalDistribution(["cosine", "linear"])},
                value=0.0,
                intermediate_values={step: 0.0 for step in range(1, 10)},
            )
        )
    proc = run_module("lightning_mim.sweep", args, home)
    assert "1 to run" in proc.stdout and "pruned" in proc.stdout
    study, trials = _trials(home)
    ours = trials[-1]
    assert ours.state == optuna.trial.TrialState.PRUNED
    assert ours.user_attrs["pruned_at_step"] == 3 and list(ours.intermediate_values) == [3]
    assert not list((home / "cache" / "stages").glob("maskgit-*/done.json"))  # a pruned model is not reused
    run = _child_runs(home, study.user_attrs["mlflow_parent_run_id"])[0]
    assert run.data.tags["optuna.state"] == "PRUNED"
    assert run.data.metrics  # what it logged before being stopped is kept
    proc = run_module("lightning_mim.sweep", args, home)
    assert "0 to run" in proc.stdout  # pruned points stay pruned


def test_jobs_run_trials_in_parallel_worker_processes(tmp_path, tiny_stage2_overrides):
    """`sweep.jobs=3` on the default SQLite stores (Optuna and MLflow): the command starts two more
    workers on the same study; the grid is split between the three processes, each point once, nothing
    lost, no "database is locked", and the summary covers every worker's trials."""
    home = tmp_path
    args = ["schedule=cosine,sqrt,linear", "sweep.jobs=3", *tiny_stage2_overrides]
    proc = run_module("lightning_mim.sweep", args, home)
    study, trials = _trials(home)
    complete = _complete_params(trials)
    assert len(complete) == 3 and len(set(complete)) == 3 and len(trials) == 3
    assert len({t.user_attrs["pid"] for t in trials}) >= 2  # several driver processes ran them
    assert len(list((home / "sweeps").glob("*/worker-*.log"))) == 2
    children = _child_runs(home, study.user_attrs["mlflow_parent_run_id"])
    assert sorted(r.info.run_name for r in children) == sorted(f"schedule={s}" for s in ("cosine", "sqrt", "linear"))
    assert all(r.info.status == "FINISHED" for r in children)
    logs = [proc.stdout, proc.stderr, *(p.read_text(errors="replace") for p in (home / "sweeps").rglob("*.log"))]
    assert not any("database is locked" in text for text in logs)
    for schedule in ("cosine", "sqrt", "linear"):  # the table lists the other workers' trials too
        assert schedule in proc.stdout
    again = run_module("lightning_mim.sweep", args, home)  # finished: the rerun starts no helper worker
    assert "0 to run" in again.stdout and "waiting for" not in again.stdout
    assert len(list((home / "sweeps").glob("*/worker-*.log"))) == 2


def test_ctrl_c_stops_cleanly_and_the_rerun_finishes(tmp_path, tiny_stage2_overrides):
    """SIGINT to the driver while a trial trains: it stops the trial's process, marks the trial as
    interrupted (not a failed try of the point), exits 130, and the same command then runs every point."""
    home = tmp_path
    args = ["schedule=cosine,linear", *tiny_stage2_overrides]
    env = {**os.environ, "LIGHTNING_MIM_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    # Python keeps SIGINT ignored when it starts with it ignored, as pytest-xdist's workers run (and as a
    # shell runs `cmd &`): the driver gets the default disposition back, as in a terminal.
    proc = subprocess.Popen([sys.executable, "-m", "lightning_mim.sweep", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not list((home / "sweeps").glob("*/trial-0000/train.log")):
        time.sleep(0.5)
    time.sleep(3)  # the trial's training process is up
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out[-2000:], err[-3000:])
    assert "rerun the same command to resume" in err
    _, trials = _trials(home)
    assert [t.user_attrs.get("error") for t in trials] == ["interrupted"]
    assert trials[0].state == optuna.trial.TrialState.FAIL
    run_module("lightning_mim.sweep", args, home)
    _, trials = _trials(home)
    assert sorted(_complete_params(trials)) == ['{"schedule": "cosine"}', '{"schedule": "linear"}']


def test_repeats_search_reports_seed_means_and_confirms_the_choice_on_fresh_seeds(tmp_path, tiny_stage2_overrides):
    """`sweep.repeats=2` with one configuration asked for (`sweep.n_trials=1`): the configuration TPE
    suggests trains seeds 0 and 1 and is told as their mean; the chosen one is trained again on seeds 2
    and 3 in a study of its own, whose mean ± interval is printed and logged to the search's parent run;
    a rerun runs nothing."""
    from mlflow.tracking import MlflowClient

    from lightning_mim.orchestration.summary import REPEATS_ATTR

    home = tmp_path
    args = ["model.label_smoothing=choice(0.0,0.2)", "sweep.n_trials=1", "sweep.repeats=2", *tiny_stage2_overrides]
    proc = run_module("lightning_mim.sweep", args, home)
    storage = f"sqlite:///{home}/optuna.db"
    names = sorted((s.study_name for s in optuna.study.get_all_study_summaries(storage)), key=lambda n: "confirm-" in n)
    assert len(names) == 2 and names[0].startswith("adhoc-") and names[1].startswith("adhoc-confirm-"), names
    search = optuna.load_study(study_name=names[0], storage=storage)
    trials = search.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]
    for trial in trials:
        by_seed = trial.user_attrs[REPEATS_ATTR]
        assert sorted(by_seed) == ["0", "1"]
        assert trial.value == pytest.approx(sum(m["val/fid_domain"] for m in by_seed.values()) / 2, rel=1e-12)
        assert len({m["val/fid_domain"] for m in by_seed.values()}) == 2  # two seeds, two models
    confirm = optuna.load_study(study_name=names[1], storage=storage)
    fresh = confirm.get_trials(deepcopy=False)
    assert sorted(t.params["seed"] for t in fresh) == ["2", "3"]
    assert all(t.params["model.label_smoothing"] == str(search.best_params["model.label_smoothing"]) for t in fresh)
    values = [t.value for t in fresh]
    chosen = next(line for line in proc.stdout.splitlines() if line.startswith("chosen: "))
    assert f"(trial {search.best_trial.number})" in chosen and "on fresh seeds 2,3: " in chosen, chosen
    assert f"{sum(values) / 2:.4f} ± " in chosen and f"{search.best_value:.4f} over the search's seeds 0,1" in chosen, chosen
    # the table reads each configuration as a point with its two seeds
    assert any(line.startswith("│ ") and "│     2 │" in line for line in proc.stdout.splitlines()), proc.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    parent = client.get_run(search.user_attrs["mlflow_parent_run_id"])
    assert parent.data.metrics["confirmed/val/fid_domain"] == pytest.approx(sum(values) / 2, rel=1e-6)
    assert parent.data.tags["confirmation_study"] == names[1]
    children = _child_runs(home, parent.info.run_id)
    assert sorted((r.data.tags["optuna.trial_number"], r.data.tags["lightning_mim.repeat"]) for r in children) == [("0", "0"), ("0", "1")]
    for run in children:  # each seed's run carries its own objective
        by_seed = trials[int(run.data.tags["optuna.trial_number"])].user_attrs[REPEATS_ATTR]
        assert run.data.metrics["objective/val/fid_domain"] == pytest.approx(
            by_seed[run.data.tags["lightning_mim.repeat"]]["val/fid_domain"], rel=1e-6)
    again = run_module("lightning_mim.sweep", args, home)
    assert again.stdout.count("0 to run") == 2 and chosen in again.stdout


def _rounds(home: Path) -> list[dict]:
    study, _ = _trials(home)
    return study.user_attrs["rounds"]


def test_seeds_auto_adds_seeds_in_rounds_and_a_kill_between_rounds_changes_nothing(tmp_path, tiny_stage2_overrides):
    """`sweep.seeds=auto` on a tiny grid (2 seeds a point first, then 1 more, at most 3), run by two
    workers (`sweep.jobs=2`): the design decides after each round which points get more seeds (stored in
    the study, shown on the command's console whichever worker decided, in the parent run and the
    report); one worker, killed right after a round's decision and run again, ends with the two workers'
    decisions and values, and redoes no finished trial."""
    from mlflow.tracking import MlflowClient

    from lightning_mim.sequential import RoundState

    overrides = [o for o in tiny_stage2_overrides if not o.startswith("decode.steps")]
    args = ["decode.steps=2,8", "sweep.seeds=auto", "sweep.first_round=2", "sweep.round_size=1", "sweep.max_seeds=3",
            *overrides]
    reference = tmp_path / "uninterrupted"
    proc = run_module("lightning_mim.sweep", [*args, "sweep.jobs=2"], reference)
    # at 2 seeds the paired t-test has 1 degree of freedom and O'Brien-Fleming spends ~1.6 % of α by
    # then: |t| would have to exceed ~40, so the first round leaves the pair open and a second follows
    rounds = [RoundState.from_dict(r) for r in _rounds(reference)]
    assert [r.seeds for r in rounds] == [2, 3] and not rounds[0].finished and rounds[1].finished
    lines = proc.stdout.splitlines()
    first = next(line for line in lines if line.startswith("round 1 of at most 2 (2 seeds a point): "))
    assert first.endswith("next round: 3 seeds for decode.steps=2, decode.steps=8"), first
    assert any(line.startswith("round 2 of at most 2 (3 seeds a point): ") for line in lines), proc.stdout
    study, trials = _trials(reference)
    seeds = Counter(t.params["decode.steps"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert seeds == {"2": 3, "8": 3} and len(trials) == 6
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers ran trials
    assert len(list((reference / "sweeps").glob("*/trial-*/train.log"))) == 3  # a model per seed, both T evaluate it
    assert "seeds in rounds (sweep.seeds=auto" in proc.stdout and "p (nominal, at its round)" in proc.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{reference}/mlflow.db")
    parent = study.user_attrs["mlflow_parent_run_id"]
    logged = json.loads(Path(client.download_artifacts(parent, "rounds.json", str(tmp_path))).read_text())
    assert logged["rounds"] == _rounds(reference)
    report = next((reference / "sweeps").glob("*/report/summary.md")).read_text()
    assert "## Rounds (sweep.seeds=auto)" in report and logged["lines"][0] in report

    home = tmp_path / "killed"
    args = [*args, f"paths.cache_dir={reference / 'cache'}"]  # the reference's trained models (a cache hit per seed)
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "LIGHTNING_MIM_HOME": str(home), "LIGHTNING_MIM_PHASE_HOOK": "_sweep_kill:kill_sweep_at",
           "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]),
           "LIGHTNING_MIM_TEST_KILL_AT": json.dumps({"phase": "decided"})}
    killed = subprocess.run([sys.executable, "-m", "lightning_mim.sweep", *args], env=env, capture_output=True, text=True,
                            timeout=600, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, (killed.stdout[-2000:], killed.stderr[-3000:])
    assert len(_rounds(home)) == 1  # the first round was decided and stored before the kill
    again = run_module("lightning_mim.sweep", args, home)
    assert "incomplete" not in again.stdout
    assert _rounds(home) == _rounds(reference)
    _, resumed = _trials(home)
    complete = {json.dumps(t.params, sort_keys=True): t.value for t in resumed if t.state == optuna.trial.TrialState.COMPLETE}
    assert complete == {json.dumps(t.params, sort_keys=True): t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(resumed) == len(trials)  # no finished trial redone
