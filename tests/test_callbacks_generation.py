"""GenerationMetrics inside real Trainer runs (fake stage-2 module, synthetic data), and its schedule."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger

from lightning_mim.callbacks import GenerationMetrics
from lightning_mim.callbacks._cadence import EvalCadence
from _fakes import FakeGenerator, SyntheticImageDataModule


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _trainer(quiet_trainer, callbacks, **kw) -> pl.Trainer:
    return quiet_trainer(accelerator="cpu", devices=1, callbacks=callbacks, **kw)


def _callback(tmp_path, **kw) -> GenerationMetrics:
    return GenerationMetrics(
        extractors=["domain"],
        num_samples=32,
        batch_size=16,
        cache_dir=tmp_path / "cache",
        domain_classifier={"epochs": 20},
        progress=False,
        **kw,
    )


def test_fit_logs_val_metrics_each_epoch_and_test_logs_test_metrics(tmp_path, quiet_trainer):
    callback = _callback(tmp_path)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(quiet_trainer, [callback], max_epochs=2, limit_train_batches=2, logger=logger, num_sanity_val_steps=2)
    module, dm = FakeGenerator(), SyntheticImageDataModule()
    trainer.fit(module, datamodule=dm)
    logged = trainer.callback_metrics
    for name in (
        "fid_domain",
        "is_domain",
        "kid_domain",
        "precision_domain",
        "recall_domain",
        "cas",
        "domain_classifier_acc",
    ):
        assert f"val/{name}" in logged, name
    assert float(logged["val/cas"]) == 1.0 and float(logged["val/domain_classifier_acc"]) >= 0.95
    # two epochs -> two evaluations of 2 batches each; the sanity check triggers none
    assert module.generate_calls == [16, 16] * 2
    logger.save()
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/fid_domain")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]

    trainer.test(module, datamodule=dm)
    assert "test/fid_domain" in trainer.callback_metrics and "test/cas" in trainer.callback_metrics
    assert callback.last_metrics["fid_domain"] == pytest.approx(float(trainer.callback_metrics["test/fid_domain"]))


def test_every_n_steps_without_validation(tmp_path, quiet_trainer):
    callback = _callback(tmp_path, every_n_epochs=None, every_n_steps=3)
    module = FakeGenerator()
    trainer = _trainer(quiet_trainer, [callback], max_steps=7, limit_val_batches=0)
    trainer.fit(module, datamodule=SyntheticImageDataModule())
    assert len(module.generate_calls) == 3 * 2  # at steps 3 and 6 and the last step 7, two batches each
    assert "val/fid_domain" in trainer.callback_metrics


def test_metrics_do_not_live_on_the_module(tmp_path, quiet_trainer):
    """docs/DEPENDENCIES.md: a metric stored on the LightningModule bloats every checkpoint."""
    module = FakeGenerator()
    before = set(module.state_dict())
    trainer = _trainer(quiet_trainer, [_callback(tmp_path)], max_epochs=1, limit_train_batches=1)
    trainer.fit(module, datamodule=SyntheticImageDataModule())
    assert set(module.state_dict()) == before


def _fake_trainer(step: int, epoch: int = 0, sanity: bool = False):
    return SimpleNamespace(global_step=step, current_epoch=epoch, sanity_checking=sanity)


def test_eval_schedule_fires_at_the_last_step_or_epoch():
    s = EvalCadence(every_n_epochs=None, every_n_steps=100)
    last = SimpleNamespace(global_step=7, current_epoch=0, sanity_checking=False, max_steps=7, max_epochs=-1)
    assert s.at_train_batch_end(last)
    assert not s.at_train_batch_end(last)  # never twice for one step
    s = EvalCadence(every_n_epochs=5, every_n_steps=None)
    final_epoch = SimpleNamespace(global_step=30, current_epoch=2, sanity_checking=False, max_steps=-1, max_epochs=3)
    assert s.at_validation_end(final_epoch)
    off = EvalCadence(every_n_epochs=None, every_n_steps=100, at_end=False)
    assert not off.at_train_batch_end(SimpleNamespace(global_step=7, current_epoch=0, sanity_checking=False, max_steps=7))


def test_eval_schedule_fires_when_a_run_at_its_budget_is_validated_on_its_own():
    """A run resumed from a checkpoint taken at its last step trains nothing; `trainer.validate` then
    stands in for its end: the final measurement fires there, once, and never in fit's own validations."""
    def trainer(fn, step):
        return SimpleNamespace(global_step=step, current_epoch=1, sanity_checking=False, max_steps=6, max_epochs=-1,
                               state=SimpleNamespace(fn=fn))

    cadence = EvalCadence(every_n_epochs=None, every_n_steps=None)
    assert not cadence.at_validation_end(trainer("fit", 6))  # fit's validation at the end: the batch-end hook measured
    assert cadence.at_validation_end(trainer("validate", 6))
    assert not cadence.at_validation_end(trainer("validate", 6))  # once per step
    assert not EvalCadence(every_n_epochs=None).at_validation_end(trainer("validate", 5))  # short of its budget
    assert not EvalCadence(every_n_epochs=None, at_end=False).at_validation_end(trainer("validate", 6))


def test_eval_schedule():
    s = EvalCadence(every_n_epochs=2, every_n_steps=None)
    assert not s.at_validation_end(_fake_trainer(5, epoch=0))
    assert s.at_validation_end(_fake_trainer(10, epoch=1))
    assert not s.at_validation_end(_fake_trainer(10, epoch=1))  # once per global step
    assert not s.at_validation_end(_fake_trainer(0, epoch=1, sanity=True))
    assert not s.at_train_batch_end(_fake_trainer(10))
    s = EvalCadence(every_n_epochs=None, every_n_steps=4)
    assert [s.at_train_batch_end(_fake_trainer(k)) for k in (0, 3, 4, 4, 5, 8)] == [
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    assert not s.at_validation_end(_fake_trainer(8, epoch=0))
    with pytest.raises(ValueError, match="every_n_steps"):
        EvalCadence(every_n_steps=0)


def test_needs_a_datamodule_with_fingerprint(tmp_path, quiet_trainer):
    trainer = _trainer(quiet_trainer, [_callback(tmp_path)], max_steps=1)
    dm = SyntheticImageDataModule()
    with pytest.raises(ValueError, match="fingerprint"):
        trainer.fit(FakeGenerator(), train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.val_dataloader())


def test_module_without_generate_warns_and_stays_inactive(tmp_path, quiet_trainer):
    class Tokenizerish(FakeGenerator):
        generate = None

    callback = _callback(tmp_path)
    trainer = _trainer(quiet_trainer, [callback], max_epochs=1, limit_train_batches=1)
    with pytest.warns(UserWarning, match="GenerationMetrics is inactive.*has no generate.*callbacks=tokenizer"):
        trainer.fit(Tokenizerish(), datamodule=SyntheticImageDataModule())
    assert not callback.active and not callback.extractors and not callback.last_metrics
    assert not any(k.startswith("val/fid") for k in trainer.callback_metrics)
