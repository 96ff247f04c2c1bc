"""`sweep.launcher=submitit`: every trial a submitit job (here the local executor, as on a laptop;
`sweep.submitit.cluster=slurm` on a cluster), the sweep's results unchanged."""

from __future__ import annotations

import pytest

from lightning_mim.orchestration.config import compose
from lightning_mim.orchestration.launchers import SubmititOptions, job_resources
from lightning_mim.orchestration.sweep_spec import parse
from conftest import run_module
from test_sweep_e2e import _child_runs, _complete_params, _trials


def test_options_and_resources_come_from_the_sweep_and_the_trials_config():
    spec = parse(["schedule=cosine,sqrt", "sweep.launcher=submitit", "sweep.submitit.cluster=slurm",
                  "sweep.submitit.timeout_min=60", "sweep.submitit.slurm_partition=gpu"])
    options = SubmititOptions(**spec.submitit_options())
    assert options.cluster == "slurm" and options.parameters == {"timeout_min": 60, "slurm_partition": "gpu"}
    assert options.trainer_overrides() == ["trainer=slurm"]  # Lightning reads its ranks from SLURM
    assert SubmititOptions(cluster="local").trainer_overrides() == []
    cfg = compose(["trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=8", "trainer.num_nodes=2"])
    assert job_resources(cfg) == {"nodes": 2, "tasks_per_node": 8, "gpus_per_node": 8}
    assert job_resources(compose([])) == {"nodes": 1, "tasks_per_node": 1}
    with pytest.raises(Exception, match="unknown sweep.launcher 'pbs'"):
        parse(["schedule=cosine", "sweep.launcher=pbs"])


@pytest.mark.slow
def test_a_two_point_sweep_through_submitits_local_executor(tmp_path, tiny_stage2_overrides):
    home = tmp_path
    args = ["schedule=cosine,sqrt", "sweep.launcher=submitit", "sweep.submitit.cluster=local",
            "sweep.submitit.timeout_min=20", *tiny_stage2_overrides]
    proc = run_module("lightning_mim.sweep", args, home)
    study, trials = _trials(home)
    assert len(_complete_params(trials)) == 2
    children = _child_runs(home, study.user_attrs["mlflow_parent_run_id"])
    assert sorted(r.info.run_name for r in children) == ["schedule=cosine", "schedule=sqrt"]
    assert all(r.info.status == "FINISHED" for r in children)
    # each trial ran as a submitit job: its folder holds the job's pickled call and submitit's own logs
    for number in (0, 1):
        folder = home / "sweeps" / study.study_name / f"trial-{number:04d}" / "submitit"
        assert list(folder.glob("*_submitted.pkl")) and list(folder.glob("*_log.out"))
        assert "lightning_mim.train" in (folder.parent / "train.log").read_text()  # the job appended its command and output
    assert "val/fid_domain" in proc.stdout
