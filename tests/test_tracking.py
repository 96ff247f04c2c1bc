"""MLflow bookkeeping of a sweep trial: the objective's one name, and its place as the run's first metric."""

from __future__ import annotations

import math

import pytest

from lightning_mim.orchestration.protocol import OBJECTIVE_ENV, TrialContext, objective_metric
from lightning_mim.orchestration.tracking import reserve_first_metric


def test_the_trial_context_carries_the_objective_to_the_trial():
    env = TrialContext(objective="val/fid_domain").environment()
    assert env[OBJECTIVE_ENV] == "val/fid_domain"
    assert TrialContext.from_environment(env).objective == "val/fid_domain"
    assert TrialContext.from_environment({}).objective is None  # outside a sweep
    assert OBJECTIVE_ENV not in TrialContext().environment()
    assert objective_metric("val/cas") == "objective/val/cas"
    with pytest.raises(ValueError, match="objective must be a metric name"):
        objective_metric("")


def test_the_reserved_objective_stays_first_and_ends_with_the_real_value(tmp_path):
    """What MLflow's compare view relies on: the store lists a run's metrics in the order their keys
    were first logged, and a later value of the reserved key replaces the NaN as the latest one."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    finished, killed = (MLFlowLogger(experiment_name="e", tracking_uri=uri, run_name=n) for n in ("a", "b"))
    key = objective_metric("val/fid_domain")
    for logger in (finished, killed):
        logger.log_hyperparams({"schedule.name": "cosine"})
        reserve_first_metric(logger, key)
        logger.log_metrics({"train/loss": 4.0, "val/cas": 0.5}, step=10)
        logger.log_metrics({"train/loss": 3.0, "val/fid_domain": 2.5}, step=20)
    client = MlflowClient(tracking_uri=uri)
    client.log_metric(finished.run_id, key, 2.5)  # what the sweep driver does when the trial ends

    done = client.get_run(finished.run_id).data.metrics
    assert list(done) == [key, "train/loss", "val/cas", "val/fid_domain"]
    assert done[key] == 2.5
    dead = client.get_run(killed.run_id).data.metrics
    assert next(iter(dead)) == key and math.isnan(dead[key])  # a trial that never ended has no objective
    with pytest.raises(ValueError, match="needs a metric name"):
        reserve_first_metric(finished, "")


# -- where a person opens the runs: each store kind gets links to its own UI, no password shown ----------
SQLITE = "sqlite:///lmim/mlflow.db"
POSTGRES = "postgresql+psycopg2://me:s3cret@db.lab:5432/mlflow"
SERVER = "http://tracking.lab:8080/"


@pytest.mark.parametrize("uri, command, base", [
    (SQLITE, f"mlflow ui --backend-store-uri {SQLITE} --host 127.0.0.1 --port 5000", "http://127.0.0.1:5000"),
    (POSTGRES, "mlflow ui --backend-store-uri postgresql+psycopg2://me:***@db.lab:5432/mlflow --host 127.0.0.1 --port 5000",
     "http://127.0.0.1:5000"),
    (SERVER, None, "http://tracking.lab:8080"),  # a server is its own UI: no command to start one
    ("https://me:tok3n@tracking.lab", None, "https://me:***@tracking.lab"),
])
def test_links_point_at_the_ui_of_the_tracking_uri_in_use(uri, command, base):
    from lightning_mim.orchestration.tracking import compare_runs_url, runs_table_url, ui_command

    assert ui_command(uri) == command
    assert runs_table_url(uri, "7") == f"{base}/#/experiments/7?workflowType=machine_learning"
    assert compare_runs_url(uri, ["a1", "b2"], ["7"]) == f'{base}/#/compare-runs?runs=%5B%22a1%22%2C%20%22b2%22%5D&experiments=%5B%227%22%5D'


def test_passwords_in_uris_are_redacted_wherever_they_stand_in_text():
    from lightning_mim.orchestration.tracking import redacted

    text = f"storage: {POSTGRES}\nfixed:\n- logger.tracking_uri=mysql://root:pa%40ss@h/db\n- sweep.storage={SQLITE}\n"
    assert redacted(text) == ("storage: postgresql+psycopg2://me:***@db.lab:5432/mlflow\nfixed:\n"
                              f"- logger.tracking_uri=mysql://root:***@h/db\n- sweep.storage={SQLITE}\n")
    assert redacted("postgresql://me@db/optuna") == "postgresql://me@db/optuna"  # no password: unchanged


@pytest.mark.parametrize("typed", ["schedule=linear", "schedule.name=linear"])
def test_a_named_group_is_one_param_however_it_was_typed(typed):
    from lightning_mim.orchestration.config import compose
    from lightning_mim.orchestration.tracking import run_params

    params = run_params(compose([typed]))
    assert params["schedule.name"] == "linear" and "choices.schedule" not in params
    assert "choices.ratio" in params  # a group whose options carry no name of their own keeps its choice
