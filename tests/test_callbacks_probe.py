"""LinearProbe inside Trainer runs: frozen features from `encode_features`, logged top-1 metrics."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_mim.callbacks import LinearProbe
from lightning_mim.callbacks.linear_probe import encode_split
from _fakes import FakeGenerator, SyntheticImageDataModule


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _trainer(quiet_trainer, callback, **kw) -> pl.Trainer:
    return quiet_trainer(accelerator="cpu", callbacks=[callback], **kw)


def test_probe_knn_fewshot_logged_during_fit_and_test(quiet_trainer):
    callback = LinearProbe(fewshot_shots=[1, 5], knn_k=5)
    trainer = _trainer(quiet_trainer, callback, max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0)
    module, dm = FakeGenerator(), SyntheticImageDataModule()
    trainer.fit(module, datamodule=dm)
    logged = trainer.callback_metrics
    assert set(callback.last_metrics) == {"probe_top1", "knn_top1", "fewshot1_top1", "fewshot5_top1"}
    # the fake's features (4x4-pooled pixels) separate the synthetic classes
    assert float(logged["val/probe_top1"]) >= 0.9
    assert float(logged["val/knn_top1"]) >= 0.9
    assert 0.0 <= float(logged["val/fewshot1_top1"]) <= 1.0
    trainer.test(module, datamodule=dm)
    assert float(trainer.callback_metrics["test/probe_top1"]) >= 0.9


def test_encode_split_caps_and_keeps_order():
    module, dm = FakeGenerator(), SyntheticImageDataModule()
    feats, labels = encode_split(module, dm.val_dataloader(), max_samples=40)
    x, y = dm.data["val"]
    assert feats.shape == (40, 48) and torch.equal(labels, y[:40])
    assert torch.allclose(feats, module.encode_features(x[:40]))


def test_module_without_encode_features_fails_at_setup(quiet_trainer):
    class NoFeatures(FakeGenerator):
        encode_features = None

    with pytest.raises(TypeError, match="encode_features"):
        _trainer(quiet_trainer, LinearProbe(), max_steps=1).fit(NoFeatures(), datamodule=SyntheticImageDataModule())


def test_bad_optimizer_lists_valid():
    with pytest.raises(ValueError, match="valid: \\['lbfgs', 'sgd', 'adam'\\]"):
        LinearProbe(optimizer="lars")
