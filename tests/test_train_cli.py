"""`python -m lightning_mim.train` end to end: MLflow tracking, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_module


@pytest.mark.slow
def test_train_maskgit_logs_to_mlflow_and_resumes(session_home, tiny_stage2_overrides):
    from mlflow.tracking import MlflowClient

    args = [*tiny_stage2_overrides, "run_name=resume-me", "experiment_name=train-cli"]
    run_module("lightning_mim.train", args, session_home)
    out = session_home / "runs" / "resume-me"
    first = json.loads((out / "result.json").read_text())
    assert first["global_step"] == 6
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert torch.isfinite(torch.tensor(first["metrics"]["val/loss"]))

    client = MlflowClient(tracking_uri=f"sqlite:///{session_home}/mlflow.db")
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.params["schedule.name"] == "cosine"
    assert run.data.params["decode.steps"] == "4"
    assert "val/loss" in run.data.metrics
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts

    # resume from last.ckpt with a larger budget: the global step continues from 6, not from 0
    run_module("lightning_mim.train", [*args, "ckpt_path=last", "trainer.max_steps=9"], session_home)
    second = json.loads((out / "result.json").read_text())
    assert second["global_step"] == 9

    # the checkpoint scored at two inference settings without retraining: a table and two MLflow runs
    result_file = out / "evaluate.json"
    proc = run_module(
        "lightning_mim.evaluate",
        [f"ckpt={second['checkpoint']}", "decode.steps=2,4", "run_name=eval-me", f"+result_file={result_file}"],
        session_home,
    )
    assert "fid_domain" in proc.stdout and "decode.steps" in proc.stdout
    evaluations = client.search_runs(
        [run.info.experiment_id], filter_string="tags.`lightning_mim.role` = 'evaluation' and attributes.run_name = 'eval-me'"
    )
    assert sorted(r.data.params["decode.steps"] for r in evaluations) == ["2", "4"]
    assert all("val/fid_domain" in r.data.metrics and "val/cas" in r.data.metrics for r in evaluations)
    assert "val/fid_domain" in json.loads(result_file.read_text())["metrics"]


def test_missing_checkpoint_path_is_named(session_home, tmp_path):
    missing = tmp_path / "nope.ckpt"
    proc = run_module("lightning_mim.train", [f"ckpt_path={missing}", f"tokenizer.ckpt={missing}"], session_home, check=False)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr
