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
