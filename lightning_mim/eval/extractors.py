"""Feature extractors for the generation metrics: uint8 images -> (features, logits).

One forward per batch gives both outputs; FID / KID / precision-recall use the features, IS and CAS
the logits. All metric math is torchmetrics' / torch-fidelity's (see `generation.py`).

- `inception`: torch-fidelity's `inception-v3-compat` (the TF-ported InceptionV3 the papers' numbers
  use), pool3 2048-d features and `logits_unbiased`, resized to 299 the TF1 way (= torchmetrics
  `antialias=False`). Weights come from a local file only, never downloaded.
- `domain`: a `DomainClassifier` trained on the dataset (`domain_classifier.py`).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mim.eval.domain_classifier import (
    DomainClassifier,
    classifier_cache_path,
    load_or_train_domain_classifier,
)
from lightning_mim.eval.images import to_uint8
from lightning_mim.settings import EXTRACTORS  # the extractor names are settings'

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILENAME}"
INCEPTION_CONFIG_KEY = "callbacks.generation_metrics.inception_weights"
INCEPTION_ENV = "LIGHTNING_MIM_INCEPTION_WEIGHTS"


class FeatureExtractor(nn.Module):
    """uint8 (B,3,H,W) -> (features (B, num_features) float32, logits (B, num_logits) float32)."""

    name: str
    num_features: int
    num_logits: int
    cache_id: str  # identifies the weights: part of the real-statistics cache key

    def train(self, mode: bool = True) -> "FeatureExtractor":  # frozen: always in eval mode
        return super().train(False)


def missing_inception_message(path: str | os.PathLike | None) -> str:
    where = f"'{path}' does not exist" if path else "no InceptionV3 weights file was configured"
    return (
        f"Inception feature extractor: {where}. Nothing is downloaded at run time. Get torch-fidelity's "
        f"InceptionV3 weights ({INCEPTION_FILENAME}, from {INCEPTION_URL}; torch-fidelity also caches it as "
        f"$TORCH_HOME/hub/checkpoints/{INCEPTION_FILENAME}) onto this machine and set `{INCEPTION_CONFIG_KEY}` "
        f"(or the env var {INCEPTION_ENV}) to its path, or drop 'inception' from the extractors."
    )


def check_inception_weights(path: str | os.PathLike | None) -> Path:
    """The weights path, or a FileNotFoundError that says what to download and which key to set."""
    if not path or not Path(path).is_file():
        raise FileNotFoundError(missing_inception_message(path))
    return Path(path)


def _file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:12]


class InceptionExtractor(FeatureExtractor):
    """torch-fidelity's `inception-v3-compat`: 2048-d pool3 features + 1008 `logits_unbiased`."""

    name = "inception"
    num_features = 2048
    num_logits = 1008

    def __init__(self, weights_path: str | os.PathLike | None) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = check_inception_weights(weights_path)
        # torch-fidelity reads the file with weights_only=False; read it safely ourselves and hand it
        # an in-memory copy of the plain tensor dict instead.
        state = torch.load(path, map_location="cpu", weights_only=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=buffer
        )
        self.cache_id = f"inception-{_file_digest(path)}"

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features, logits = self.net(to_uint8(images))
        return features.float(), logits.float()


class DomainExtractor(FeatureExtractor):
    """A trained `DomainClassifier`: penultimate features + class logits, at its training resolution."""

    name = "domain"

    def __init__(self, classifier: DomainClassifier, *, image_size: int, cache_id: str) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.num_features = classifier.feature_dim
        self.num_logits = classifier.num_classes
        self.cache_id = cache_id

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = to_uint8(images).float() / 255
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=False
            )
        features = self.classifier.features(x)
        return features.float(), self.classifier.head(features).float()


def build_extractor(
    name: str,
    *,
    datamodule=None,
    cache_dir: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    domain_classifier: dict | None = None,
    device: str | torch.device = "cpu",
) -> tuple[FeatureExtractor, dict]:
    """Build extractor `name` (one of EXTRACTORS); returns (extractor on `device`, info to log)."""
    if name == "inception":
        return InceptionExtractor(inception_weights).to(device), {}
    if name == "domain":
        if datamodule is None or cache_dir is None:
            raise ValueError("the 'domain' extractor needs a datamodule and a cache_dir")
        options = dict(domain_classifier or {})
        model, info = load_or_train_domain_classifier(datamodule, cache_dir, device=device, **options)
        cache_id = "domain-" + classifier_cache_path(cache_dir, str(datamodule.fingerprint), options).stem
        extractor = DomainExtractor(model, image_size=info["image_size"], cache_id=cache_id).to(device)
        return extractor, {"domain_classifier_acc": float(info["val_acc"])}
    raise ValueError(f"unknown feature extractor {name!r}; valid: {list(EXTRACTORS)}")
