"""The domain classifier: determinism, on-disk cache by fingerprint, extractor outputs.

Its accuracy on the real digits is pinned in test_eval_digits.py.
"""

from __future__ import annotations

import pytest
import torch

import lightning_mim.eval.domain_classifier as dc
from lightning_mim.eval.extractors import DomainExtractor, build_extractor
from _fakes import SyntheticImageDataModule


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_training_is_deterministic_and_leaves_global_rng_alone():
    dm = SyntheticImageDataModule()
    x, y = dm.data["train"]
    state = torch.random.get_rng_state()
    a, _ = dc.train_domain_classifier(x, y, x, y, num_classes=4, epochs=1)
    assert torch.equal(state, torch.random.get_rng_state())
    b, _ = dc.train_domain_classifier(x, y, x, y, num_classes=4, epochs=1)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_unknown_option_lists_valid_ones():
    x, y = torch.rand(4, 3, 8, 8), torch.arange(4) % 2
    with pytest.raises(ValueError, match="valid: .*epochs"):
        dc.train_domain_classifier(x, y, x, y, num_classes=2, epochz=3)


def test_cached_by_fingerprint_trained_once(tmp_path, monkeypatch):
    dm = SyntheticImageDataModule()
    model, info = dc.load_or_train_domain_classifier(dm, tmp_path, epochs=20)
    assert info["val_acc"] >= 0.95 and info["fingerprint"] == dm.fingerprint
    files = list((tmp_path / "domain_classifier").glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith(dm.fingerprint)

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(dc, "train_domain_classifier", no_training)
    again, info2 = dc.load_or_train_domain_classifier(dm, tmp_path, epochs=20)
    assert info2 == info
    for (k, v), (_, w) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(v, w), k
    # other options or another dataset -> another file (and training)
    with pytest.raises(AssertionError, match="retrained"):
        dc.load_or_train_domain_classifier(dm, tmp_path, epochs=21)
    with pytest.raises(AssertionError, match="retrained"):
        dc.load_or_train_domain_classifier(SyntheticImageDataModule(seed=1), tmp_path, epochs=20)


def test_domain_extractor_outputs_and_resizing(tmp_path):
    dm = SyntheticImageDataModule()
    ext, info = build_extractor("domain", datamodule=dm, cache_dir=tmp_path, domain_classifier={"epochs": 20})
    assert isinstance(ext, DomainExtractor) and set(info) == {"domain_classifier_acc"}
    x, y = dm.data["val"]
    feats, logits = ext(x)
    assert feats.shape == (len(x), 64) and logits.shape == (len(x), 4)
    assert (logits.argmax(1) == y).float().mean() >= 0.95
    # uint8 input equals the rounded float input; a larger image is resized to the classifier's size
    u8 = (x * 255 + 0.5).to(torch.uint8)
    assert torch.equal(ext(u8)[0], feats)
    big = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    assert (ext(big)[1].argmax(1) == y).float().mean() >= 0.9
    with pytest.raises(ValueError, match="datamodule and a cache_dir"):
        build_extractor("domain")
