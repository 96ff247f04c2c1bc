"""The `inception` extractor: local weights only, a clear start-up error, the real torch-fidelity path.

No test downloads anything: the weights are a randomly initialised `inception-v3-compat` whose
BatchNorm statistics are calibrated on a few images (uncalibrated random weights give constant
features: docs/DEPENDENCIES.md "FID / IS / KID / precision-recall"), saved to a file and loaded
through the same code path as the real file.
"""

from __future__ import annotations

import pickle
from unittest import mock

import pytest
import torch

from lightning_mim.callbacks import GenerationMetrics
from lightning_mim.eval.extractors import INCEPTION_FILENAME, InceptionExtractor, _file_digest, build_extractor
from _fakes import FakeGenerator, SyntheticImageDataModule


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    tmp = tmp_path_factory.mktemp("inception")
    empty = tmp / "empty.pt"
    torch.save({}, empty)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (module-scoped: runs before the per-test one_thread fixture)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)
            )
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batch
        images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        net.train()
        with torch.no_grad():
            net(images)
    torch.set_num_threads(threads)
    path = tmp / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("attempted to download weights")

    monkeypatch.setattr("torch.hub.load_state_dict_from_url", refuse)
    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", refuse)


@pytest.mark.parametrize("configured", ["missing", None])
def test_missing_weights_error_names_file_source_and_key(tmp_path, no_download, configured):
    path = tmp_path / "weights.pth" if configured else None
    with pytest.raises(FileNotFoundError) as err:
        build_extractor("inception", inception_weights=path)
    msg = str(err.value)
    if path is not None:
        assert str(path) in msg
    assert INCEPTION_FILENAME in msg
    assert "https://github.com/toshas/torch-fidelity/releases/download/" in msg
    assert "callbacks.generation_metrics.inception_weights" in msg


def test_callback_fails_at_start_up_before_any_training(tmp_path, no_download, quiet_trainer):
    module = FakeGenerator()
    callback = GenerationMetrics(extractors=["inception"], inception_weights=tmp_path / "nope.pth", cache_dir=tmp_path)
    trainer = quiet_trainer(max_steps=3, callbacks=[callback])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        trainer.fit(module, datamodule=SyntheticImageDataModule())
    assert trainer.global_step == 0 and module.weight.item() == 0.0


def test_unknown_extractor_lists_valid_ones():
    with pytest.raises(ValueError, match=r"evaluation.extractor=\['clip'\]: must be one of domain, inception"):
        GenerationMetrics(extractors=["clip"])
    with pytest.raises(ValueError, match=r"valid: \['domain', 'inception'\]"):
        build_extractor("vgg")


class Payload:
    """An arbitrary Python object: unpickling it needs code execution, which weights_only refuses."""


def test_weights_are_loaded_with_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"payload": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        InceptionExtractor(path)


def test_extractor_matches_torchmetrics_inception_with_antialias_off(inception_weights, no_download):
    from torchmetrics.image.fid import NoTrainInceptionV3

    ours = InceptionExtractor(inception_weights)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats, logits = ours(images)
        reference = NoTrainInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(inception_weights),
            antialias=False,
        )
        ref_feats, ref_logits = reference._torch_fidelity_forward((images * 255 + 0.5).to(torch.uint8))
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.allclose(feats, ref_feats, rtol=1e-5, atol=1e-6)
    assert torch.allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert feats.std(0).mean() > 1e-3  # calibrated: features differ between images
    assert ours.cache_id == f"inception-{_file_digest(inception_weights)}"  # the weights are in the cache key


def test_evaluate_generation_with_the_inception_extractor(inception_weights, tmp_path, no_download):
    from lightning_mim.eval.generation import evaluate_generation

    out = evaluate_generation(
        FakeGenerator(),
        SyntheticImageDataModule(),
        num_samples=8,
        num_real=8,
        batch_size=8,
        extractor="inception",
        inception_weights=inception_weights,
        cache_dir=tmp_path,
        progress=False,
        is_splits=2,
    )
    assert set(out) == {f"{m}_inception" for m in ("fid", "is", "is_std", "kid", "kid_std", "precision", "recall")}
    assert out["fid_inception"] > 0 and out["is_inception"] >= 1.0
    assert len(list((tmp_path / "real_stats").glob("inception-val-*.pt"))) == 1
