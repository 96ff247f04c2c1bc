"""The sweep's console: each running trial's phase from its progress file, and an ETA."""

from __future__ import annotations

import sys
import time

import lightning.pytorch as pl
import pytest

from lightning_mim.callbacks._cadence import EvalCadence
from lightning_mim.orchestration import trial_progress as progress_module
from lightning_mim.orchestration.sweep_console import SweepClock, describe, format_duration, point_name, running_trials
from lightning_mim.orchestration.trial_progress import TrialProgress
from lightning_mim.orchestration.protocol import PROGRESS_FILE, TrialContext, read_progress, write_progress
from lightning_mim.orchestration.launchers import run_local
from test_trial_cost import _module
from _fakes import SyntheticImageDataModule

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class EveryFourSteps(pl.Callback):
    """Stands in for an evaluation callback: only its schedule matters to TrialProgress."""

    cadence = EvalCadence(every_n_epochs=None, every_n_steps=4)


def test_a_trial_reports_training_steps_evaluations_and_done(quiet_trainer, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(progress_module, "write_progress", lambda path, phase, **f: seen.append((phase, f["step"], f["max_steps"])))
    monkeypatch.setattr(progress_module, "WRITE_EVERY_S", 0.0)
    pl.seed_everything(0, verbose=False)
    datamodule = SyntheticImageDataModule(num_classes=4, image_size=16, train_per_class=8, val_per_class=4, batch_size=8)
    trainer = quiet_trainer(accelerator="cpu", devices=1, max_steps=6, limit_val_batches=1,
                            callbacks=[TrialProgress(tmp_path / PROGRESS_FILE), EveryFourSteps()])
    trainer.fit(_module(), datamodule=datamodule)
    assert seen[0] == ("training", 0, 6)
    assert [s for s in seen if s[0] == "evaluation"] == [("evaluation", 4, 6), ("evaluation", 6, 6)]  # every 4 + the end
    assert [s[1] for s in seen if s[0] == "training"] == [0, 1, 2, 3, 5]
    assert seen[-1] == ("done", 6, 6)


def test_progress_files_round_trip_and_are_described():
    assert describe(None) == "starting"
    assert describe({"phase": "training", "step": 450, "max_steps": 600, "loss": 3.91234}) == "training 450/600 loss 3.912"
    assert describe({"phase": "tokenizer", "step": 80, "max_steps": 1500, "loss": None}) == "tokenizer 80/1500"
    assert describe({"phase": "evaluation", "step": 600, "max_steps": 600}) == "evaluation at step 600"
    assert describe({"phase": "set-up"}) == "set-up"


def test_write_and_read_progress(tmp_path):
    path = tmp_path / "t" / PROGRESS_FILE
    assert read_progress(path) is None
    write_progress(path, "training", step=3, max_steps=9, loss=1.5)
    record = read_progress(path)
    assert record["phase"] == "training" and record["step"] == 3 and abs(record["time"] - time.time()) < 60
    write_progress(None, "training")  # nobody watching: nothing written, no error
    env = TrialContext(progress_file=str(path)).environment()
    assert TrialContext.from_environment(env).progress_file == str(path)


def test_the_eta_comes_from_the_median_finished_trial_and_the_workers():
    clock = SweepClock(workers=1)
    assert clock.eta(5) is None and format_duration(None) == "ETA after the first trial"
    for seconds in (300.0, 100.0, 120.0):  # the first trial also trained the tokenizer
        clock.finished(seconds)
    assert clock.eta(3, running_elapsed=20.0) == pytest.approx(100 + 2 * 120)
    assert SweepClock(workers=2).eta(1) is None
    two = SweepClock(workers=2)
    two.finished(100.0)
    assert two.eta(4) == pytest.approx(200.0)
    assert format_duration(340) == "ETA 5m40s" and format_duration(3 * 3600 + 120) == "ETA 3h02m"


def test_the_console_line_lists_every_fresh_running_trial(tmp_path):
    write_progress(tmp_path / "trial-0003" / PROGRESS_FILE, "training", step=450, max_steps=600, loss=3.9)
    write_progress(tmp_path / "trial-0004" / PROGRESS_FILE, "evaluation", step=600, max_steps=600)
    write_progress(tmp_path / "trial-0001" / PROGRESS_FILE, "done", step=600, max_steps=600)
    write_progress(tmp_path / "trial-0000" / PROGRESS_FILE, "training", step=5, max_steps=600)
    stale = read_progress(tmp_path / "trial-0000" / PROGRESS_FILE)
    (tmp_path / "trial-0000" / PROGRESS_FILE).write_text(__import__("json").dumps({**stale, "time": time.time() - 3600}))
    line = running_trials(tmp_path, "ETA 4m10s")
    assert line == "trial 3: training 450/600 loss 3.900 | trial 4: evaluation at step 600 | ETA 4m10s"


def test_the_driver_refreshes_while_a_trial_runs(tmp_path):
    calls = []
    run_local([sys.executable, "-c", "import time; time.sleep(2.5)"], tmp_path / "log.txt", {}, lambda: calls.append(1))
    assert len(calls) >= 1


def test_points_are_named_as_people_write_them():
    assert point_name({"seed": "1", "schedule": "cosine", "decode.steps": "8"}) == "decode.steps=8 schedule=cosine seed=1"


def test_the_training_bar_counts_steps_when_the_budget_is_steps():
    from lightning_mim.callbacks.progress_bar import train_description

    assert train_description(11, -1, 450, 600) == "Epoch 11 · step 450/600"  # Lightning printed "Epoch 11/-2"
    assert train_description(2, 10, 30, -1) == "Epoch 2/9"
    assert train_description(2, 10, 30, 100) == "Epoch 2/9 · step 30/100"


def test_known_library_noise_is_filtered_and_the_rest_is_not(caplog):
    import logging
    import warnings

    from lightning_mim.orchestration.noise import filter_known_noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_known_noise()
        warnings.warn("Found 87 module(s) in eval mode at the start of training. This may lead to ...")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...")
        warnings.warn("something new")
    assert [str(w.message) for w in caught] == ["something new"]
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: For seamless cloud logging ... try installing [litlogger](https://pypi.org/project/litlogger/)")
        logger.info("`Trainer.fit` stopped: `max_steps=6` reached.")
    assert [r.getMessage() for r in caplog.records] == ["`Trainer.fit` stopped: `max_steps=6` reached."]


def test_results_record_metrics_at_float32_precision_whichever_process_measured_them(tmp_path):
    from lightning_mim.orchestration.protocol import float32, read_result, write_result

    path = write_result(tmp_path / "result.json", {"metrics": {"fid": 147.87922943695284, "big": 1e39}, "global_step": 6})
    result = read_result(path)
    assert result["metrics"] == {"fid": 147.8792266845703, "big": 1e39}  # what Lightning's float32 tensor gives
    assert result["global_step"] == 6
    import torch

    assert float32(147.87922943695284) == float(torch.tensor(147.87922943695284))


PHASES_SEEN: list = []


def record_phase(phase, **info):  # a phase hook, named as module:function
    PHASES_SEEN.append((phase, info))


def test_the_phase_hook_hears_the_driver_and_every_progress_write(tmp_path, monkeypatch):
    from lightning_mim.orchestration.protocol import PHASE_HOOK_ENV, phase_reached

    PHASES_SEEN.clear()
    phase_reached("asked", trial=3)  # no hook set: nothing happens
    monkeypatch.setenv(PHASE_HOOK_ENV, f"{__name__}:record_phase")
    phase_reached("asked", trial=3)
    write_progress(tmp_path / "trial-0003" / PROGRESS_FILE, "training", step=4)
    assert PHASES_SEEN == [("asked", {"trial": 3}),
                           ("training", {"progress_file": str(tmp_path / "trial-0003" / PROGRESS_FILE), "step": 4})]
    monkeypatch.setenv(PHASE_HOOK_ENV, "no_colon")
    with pytest.raises(ValueError, match="module:function"):
        phase_reached("asked")


def test_a_trial_config_is_written_as_composed_and_read_back_or_refused_in_one_line(tmp_path):
    from omegaconf import OmegaConf

    from lightning_mim.orchestration.config import ConfigError, compose
    from lightning_mim.orchestration.protocol import read_config, write_config

    cfg = compose(["schedule=sqrt", "paths.home=/tmp/h"])
    back = read_config(write_config(cfg, tmp_path / "trial-0001" / "config.yaml"))
    assert OmegaConf.to_container(back, resolve=False) == OmegaConf.to_container(cfg, resolve=False)
    assert OmegaConf.to_container(back, resolve=False)["data"]["seed"] == "${seed}"  # interpolations kept
    assert back.model.ratio.schedule == "sqrt"
    with pytest.raises(ConfigError, match="no such file"):
        read_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(ConfigError, match="not a config file"):
        read_config(tmp_path / "bad.yaml")
    (tmp_path / "other.yaml").write_text("a: 1\n")
    with pytest.raises(ConfigError, match="no model section"):
        read_config(tmp_path / "other.yaml")
