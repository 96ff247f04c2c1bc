"""Against the real embedded digits (DigitsDataModule shards): domain classifier, CAS, FID ordering."""

from __future__ import annotations

import pytest
import torch

from lightning_mim.eval.domain_classifier import load_or_train_domain_classifier
from lightning_mim.eval.generation import evaluate_generation


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class ReplayGenerator(torch.nn.Module):
    """A 'generator' that returns training digits of the requested class (or of a random class)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, shuffle_labels: bool = False, blur: bool = False):
        super().__init__()
        self.images, self.labels = images, labels
        self.num_classes = 10
        self.shuffle_labels, self.blur = shuffle_labels, blur

    def generate(self, labels, num_samples=None, *, generator=None, **overrides):
        if self.shuffle_labels:
            labels = torch.randint(0, 10, (len(labels),), generator=generator)
        out = []
        for c in labels.tolist():
            pool = (self.labels == c).nonzero().flatten()
            out.append(self.images[pool[torch.randint(len(pool), (1,), generator=generator)]])
        images = torch.cat(out)
        if self.blur:
            images = torch.nn.functional.avg_pool2d(images, 5, stride=1, padding=2)
        return images


def test_digits_cas_and_fid(tmp_path):
    from lightning_mim.data.datamodules import DigitsDataModule

    dm = DigitsDataModule(tmp_path / "data", batch_size=64, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    images, labels = [], []
    for x, y in dm.train_dataloader():
        images.append(x)
        labels.append(y)
    images, labels = torch.cat(images), torch.cat(labels)

    # the domain classifier, trained on the digits' train split through the DataModule (cached)
    model, info = load_or_train_domain_classifier(dm, tmp_path / "eval")
    assert info["val_acc"] >= 0.95, info
    assert info["val_images"] == 200 and info["image_size"] == 32
    assert info["train_seconds"] < 30, info  # "trains in seconds" (one CPU thread)

    kw = dict(num_samples=200, extractor="domain", cache_dir=tmp_path / "eval", batch_size=100, progress=False)
    perfect = evaluate_generation(ReplayGenerator(images, labels), dm, **kw)
    assert perfect["domain_classifier_acc"] == info["val_acc"]  # the cached classifier
    assert perfect["cas"] >= 0.95
    shuffled = evaluate_generation(ReplayGenerator(images, labels, shuffle_labels=True), dm, **kw)
    assert shuffled["cas"] == pytest.approx(0.1, abs=0.07)
    blurred = evaluate_generation(ReplayGenerator(images, labels, blur=True), dm, **kw)
    assert blurred["fid_domain"] > 3 * perfect["fid_domain"]
    assert blurred["precision_domain"] < perfect["precision_domain"]
