"""A sweep on the stores of a cluster: the Optuna study in a real PostgreSQL server, the runs in an
`mlflow server` whose backend store is a database of that server (artifacts in a local directory), and
two workers started as separate `python -m lightning_mim.sweep` processes with homes of their own, as on
two nodes — the recipe of docs/SCALING.md "Distributed sweeps", run as written there.

One worker is killed (SIGKILL) in the middle of a trial; the other finishes the remaining points. The
dead worker's trial is then failed by Optuna's heartbeat (it ran on another node: no pid to check) and
redone by the next run of the workers, which also ends its MLflow run KILLED. At the end the grid, the
complete Optuna trials and the FINISHED MLflow child runs agree, one per point.

Nodes: each worker process reports the node name it is given as its host name (a `sitecustomize`
on its PYTHONPATH), so the sweep's "same host, dead pid" check cannot see the kill and only the
heartbeat can.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from _postgres import DB_USER, mlflow_server, postgres_server
from _processes import child_env
from conftest import run_module
from optuna.trial import TrialState

from lightning_mim.orchestration import report
from lightning_mim.orchestration.sweep import HEARTBEAT_SECONDS, point_name

pytestmark = pytest.mark.slow

GRID = {"schedule": ["cosine", "linear", "sqrt"]}
PASSWORD = "s3cret"  # in the study's URL: never printed nor logged
NODE_SITECUSTOMIZE = """\
import os, socket
if os.environ.get("LMIM_TEST_NODE"):  # this process and its children run "on" that node
    socket.gethostname = lambda: os.environ["LMIM_TEST_NODE"]
"""


@pytest.fixture
def shared_stores(tmp_path):
    """(Optuna storage URL, MLflow tracking URL, artifact directory): a PostgreSQL server with the
    databases `optuna` and `mlflow`, and an MLflow server on the latter."""
    with postgres_server() as pg:
        pg.createdb("optuna")
        pg.createdb("mlflow")
        artifacts = tmp_path / "mlartifacts"
        with mlflow_server(pg.url("mlflow"), artifacts, tmp_path / "mlflow-server.log") as tracking_uri:
            yield pg.url("optuna"), tracking_uri, artifacts


class Workers:
    """Sweep workers started as separate processes, each "on" a node of its own with its own
    LIGHTNING_MIM_HOME; output in `<home>/worker.log`. Whatever is still running at the end is killed."""

    def __init__(self, root: Path, args: list[str]) -> None:
        self.root, self.args, self.started = root, args, []
        (root / "node").mkdir(parents=True, exist_ok=True)
        (root / "node" / "sitecustomize.py").write_text(NODE_SITECUSTOMIZE)

    def start(self, node: str, home: Path) -> subprocess.Popen:
        pythonpath = os.pathsep.join(filter(None, [str(self.root / "node"), os.environ.get("PYTHONPATH")]))
        env = {**child_env(home), "PYTHONPATH": pythonpath, "LMIM_TEST_NODE": node}
        home.mkdir(parents=True, exist_ok=True)
        with open(home / "worker.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "lightning_mim.sweep", *self.args], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        proc.home = home
        self.started.append(proc)
        return proc

    def wait(self, *procs: subprocess.Popen, timeout: float = 600) -> None:
        for proc in procs:
            proc.wait(timeout=timeout)
        logs = "\n".join(f"=== {p.home}/worker.log (exit {p.returncode})\n{(p.home / 'worker.log').read_text(errors='replace')[-4000:]}"
                         for p in procs)
        assert all(p.returncode == 0 for p in procs), logs

    def kill_all(self) -> None:
        for proc in self.started:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker and the trial process it runs
            except ProcessLookupError:
                pass
            proc.wait()


def _study(storage: str) -> optuna.Study:
    summaries = optuna.study.get_all_study_summaries(storage)
    assert len(summaries) == 1, [s.study_name for s in summaries]
    return optuna.load_study(study_name=summaries[0].study_name, storage=storage)


def _children(tracking_uri: str, parent_run_id: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def _wait_for(what: str, found, deadline: float, every: float = 0.5):
    while time.time() < deadline:
        value = found()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_node_sweep_on_postgres_and_mlflow_server_survives_a_killed_worker(tmp_path, shared_stores, tiny_stage2_overrides):
    storage, tracking_uri, artifacts = shared_stores
    storage = storage.replace(f"//{DB_USER}@", f"//{DB_USER}:{PASSWORD}@")  # trust authentication ignores it
    args = [*(f"{axis}={','.join(values)}" for axis, values in GRID.items()), *tiny_stage2_overrides,
            f"sweep.storage={storage}", f"logger.tracking_uri={tracking_uri}", f"logger.artifact_location={artifacts}"]
    home_a, home_b = tmp_path / "node-a", tmp_path / "node-b"
    # once, before the workers: the study, the MLflow experiment and the sweep's parent run
    prepared = run_module("lightning_mim.sweep", [*args, "--prepare-only"], tmp_path / "submit")
    assert f"in {storage.replace(PASSWORD, '***')}" in prepared.stdout
    study = _study(storage)
    parent = study.user_attrs["mlflow_parent_run_id"]

    workers = Workers(tmp_path, args)
    try:
        worker_a, worker_b = workers.start("node-a", home_a), workers.start("node-b", home_b)
        deadline = time.time() + 300

        def a_trial_training():  # worker a's trial, once its training process has its MLflow run
            trials = [t for t in study.get_trials() if t.state == TrialState.RUNNING and t.user_attrs.get("host") == "node-a"]
            runs = _children(tracking_uri, parent)
            return next((t for t in trials for r in runs
                         if r.data.tags.get("optuna.trial_number") == str(t.number) and r.info.status == "RUNNING"), None)

        killed = _wait_for("worker a's trial to start training", a_trial_training, deadline)
        worker_a.send_signal(signal.SIGKILL)  # the driver only: its trial's process dies with it (PDEATHSIG)
        worker_a.wait()
        workers.wait(worker_b)  # ... and the other worker runs the remaining points

        trials = {t.number: t for t in study.get_trials()}
        assert trials[killed.number].state == TrialState.RUNNING  # nobody on node-b can know yet that it is dead
        assert {t.state for n, t in trials.items() if n != killed.number} == {TrialState.COMPLETE}
        assert len(trials) == len(GRID["schedule"])
        dead_run = [r for r in _children(tracking_uri, parent) if r.data.tags["optuna.trial_number"] == str(killed.number)]
        assert [r.info.status for r in dead_run] == ["RUNNING"]

        # The dead trial's last heartbeat is at most HEARTBEAT_SECONDS old; Optuna fails it once it is older
        # than the grace period (4 heartbeats). Move that heartbeat back past it instead of waiting 2 minutes.
        import sqlalchemy

        engine = sqlalchemy.create_engine(storage)
        with engine.begin() as connection:
            moved = connection.execute(
                sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = heartbeat - make_interval(secs => :s) WHERE trial_id = :id"),
                {"s": 10 * HEARTBEAT_SECONDS, "id": killed._trial_id},
            ).rowcount
        engine.dispose()
        assert moved == 1  # the dead worker's heartbeats reached PostgreSQL

        # The next run of both workers (worker a's job, resubmitted, lands on node-c): the stale trial is
        # failed by the heartbeat, its MLflow run ended, and its point redone once.
        workers.wait(workers.start("node-c", home_a), workers.start("node-b", home_b))
    finally:
        workers.kill_all()

    # Optuna: every grid point complete exactly once, plus the killed trial, failed by the heartbeat
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    grid = sorted(json.dumps({"schedule": s}) for s in GRID["schedule"])
    assert sorted(json.dumps(t.params) for t in complete) == grid  # no duplicate, nothing missing
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [killed.number] and len(trials) == len(grid) + 1
    assert "error" not in failed[0].user_attrs  # a stale heartbeat, not the same-host dead-pid check
    redone = next(t for t in complete if t.params == killed.params)
    assert redone.number > killed.number and redone.user_attrs["host"] in ("node-b", "node-c")
    assert {t.user_attrs["host"] for t in complete} <= {"node-b", "node-c"}

    # MLflow (the server): one FINISHED child per grid point; the dead trial's run ended KILLED with the reason
    children = _children(tracking_uri, parent)
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(r.info.run_name for r in finished) == sorted(point_name({"schedule": s}) for s in GRID["schedule"])
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in finished) == sorted(t.number for t in complete)
    assert all(r.data.metrics.get("val/fid_domain") is not None for r in finished)
    killed_runs = [r for r in children if r.data.tags["optuna.trial_number"] == str(killed.number)]
    assert [r.info.status for r in killed_runs] == ["KILLED"]
    assert "driver process died" in killed_runs[0].data.tags["error"]
    assert len(children) == len(trials)  # one child run per Optuna trial, none left RUNNING
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED" and parent_run.data.metrics["trials_complete"] == len(grid)
    # artifacts went to the local artifact root the server was given
    assert any(artifacts.rglob("config.yaml"))

    # links: the tracking server is its own UI (no `mlflow ui` line); no password printed or logged
    last = (home_b / "worker.log").read_text()
    assert "MLflow UI:" not in last
    assert f"runs table: {tracking_uri}/#/experiments/{parent_run.info.experiment_id}?workflowType=machine_learning" in last
    assert f"compare:    {tracking_uri}/#/compare-runs?runs=" in last
    assert parent_run.data.tags["lightning_mim.compare_url"].startswith(f"{tracking_uri}/#/compare-runs?runs=")
    assert parent_run.data.tags["optuna.storage"] == storage.replace(PASSWORD, "***")
    logged_spec = Path(client.download_artifacts(parent, "spec.yaml", str(tmp_path)))
    printed = [prepared.stdout] + [(h / "worker.log").read_text() for h in (home_a, home_b)]
    assert not any(PASSWORD in text for text in [*printed, logged_spec.read_text(), json.dumps(parent_run.data.tags)])
    # the report and the notebook read the study's own tracking URI (the server), not a file in the home
    study_read = report.find_study(tmp_path / "submit")
    assert study_read.tracking_uri == tracking_uri and study_read.parent_run_id == parent


def test_a_sweep_tracked_directly_in_postgres_prints_its_ui_command_and_reads_back(tmp_path, tiny_stage2_overrides):
    """`logger.tracking_uri=postgresql+psycopg2://...` with no tracking server: the console prints the
    `mlflow ui` command that serves that database (password redacted) and the runs-table and compare
    links on that local UI; the study records the URI, and the report's reader (the notebook's) finds the
    parent run and its child through it."""
    from mlflow.tracking import MlflowClient

    with postgres_server() as pg:
        pg.createdb("mlflow")
        tracking_uri = pg.url("mlflow").replace(f"{DB_USER}@", f"{DB_USER}:{PASSWORD}@")  # trust auth ignores it
        home = tmp_path / "home"
        proc = run_module("lightning_mim.sweep", ["schedule=cosine", f"logger.tracking_uri={tracking_uri}",
                                                  *tiny_stage2_overrides], home)
        shown = tracking_uri.replace(PASSWORD, "***")
        assert f"MLflow UI:  mlflow ui --backend-store-uri {shown} --host 127.0.0.1 --port 5000\n" in proc.stdout
        assert "runs table: http://127.0.0.1:5000/#/experiments/" in proc.stdout
        assert "compare:    http://127.0.0.1:5000/#/compare-runs?runs=" in proc.stdout
        assert PASSWORD not in proc.stdout + proc.stderr
        study = report.find_study(home)
        assert study.tracking_uri == tracking_uri  # what the notebook reads through
        client = MlflowClient(tracking_uri=study.tracking_uri)
        assert client.get_run(study.parent_run_id).info.status == "FINISHED"
        children = _children(study.tracking_uri, study.parent_run_id)
        assert [r.data.params["schedule.name"] for r in children] == ["cosine"]
