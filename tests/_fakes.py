"""Tiny stand-ins that implement the evaluation contracts, for the tests (`from _fakes import ...`).

- `SyntheticImageDataModule`: class c = a bright block in grid cell c (+ per-image noise), map-style,
  deterministic val/test order, `num_classes`, `image_size`, `fingerprint`.
- `FakeGenerator`: a LightningModule with the stage-2 interface (`num_classes`, `generate`,
  `encode_features`, `reconstruct`, `decode_settings`) whose samples come from the same pattern
  distribution; knobs make it worse in known ways (`shuffle_labels` for CAS, `brightness` for FID).
- `ProjectionExtractor`: a fixed random-projection `FeatureExtractor` (no training, no weights file).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mim.eval.extractors import FeatureExtractor
from lightning_mim.eval.images import to_uint8


def pattern_images(
    labels: Tensor, image_size: int, num_classes: int, *, generator: torch.Generator | None = None, noise: float = 0.08
) -> Tensor:
    """(B, 3, S, S) in [0, 1]: a 0.85 block in class cell c on a 0.1 background, class-tinted, plus noise."""
    k = math.ceil(math.sqrt(num_classes))
    cell = image_size // k
    device = labels.device
    b = len(labels)
    images = torch.full((b, 3, image_size, image_size), 0.1, device=device)
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(int(c), k)
        images[i, :, r * cell : (r + 1) * cell, q * cell : (q + 1) * cell] = 0.85
        images[i, int(c) % 3] *= 0.8  # a class-dependent tint
    images = images + noise * torch.randn(
        images.shape, generator=generator, device=generator.device if generator else device
    ).to(device)
    return images.clamp(0, 1)


class SyntheticImageDataModule(pl.LightningDataModule):
    def __init__(
        self,
        num_classes: int = 4,
        image_size: int = 16,
        *,
        train_per_class: int = 32,
        val_per_class: int = 16,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        key = f"synthetic-{num_classes}-{image_size}-{train_per_class}-{val_per_class}-{seed}"
        self.fingerprint = hashlib.sha256(key.encode()).hexdigest()[:12]
        g = torch.Generator().manual_seed(seed)
        self.data: dict[str, tuple[Tensor, Tensor]] = {}
        for split, per in (("train", train_per_class), ("val", val_per_class)):
            labels = torch.arange(num_classes).repeat(per)
            self.data[split] = (pattern_images(labels, image_size, num_classes, generator=g), labels)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(TensorDataset(*self.data[split]), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("val")


class FakeGenerator(pl.LightningModule):
    """Stage-2 interface over `pattern_images`; trains nothing (one dummy parameter)."""

    def __init__(
        self,
        num_classes: int = 4,
        image_size: int = 16,
        *,
        shuffle_labels: bool = False,
        brightness: float = 0.0,
        steps: int = 4,
        noise: float = 0.08,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.shuffle_labels = shuffle_labels
        self.brightness = float(brightness)
        self.noise = float(noise)
        self.weight = nn.Parameter(torch.zeros(()))
        self.decode_settings = {"steps": int(steps), "choice_temperature": 4.5}
        self.generate_calls: list[int] = []

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor | None = None,
        num_samples: int | None = None,
        *,
        generator: torch.Generator | None = None,
        return_steps: bool = False,
        **decode_overrides: Any,
    ):
        unknown = set(decode_overrides) - set(self.decode_settings)
        if unknown:
            raise TypeError(f"unknown decode settings {sorted(unknown)}")
        if labels is None:
            if num_samples is None:
                raise ValueError("give labels or num_samples")
            labels = torch.randint(0, max(1, self.num_classes), (num_samples,), generator=generator, device=self.device)
        labels = labels.to(self.device)
        self.generate_calls.append(len(labels))
        shown = labels
        if self.shuffle_labels:
            shown = torch.randint(0, self.num_classes, (len(labels),), generator=generator, device=self.device)
        images = (
            pattern_images(shown, self.image_size, max(1, self.num_classes), generator=generator, noise=self.noise)
            + self.brightness
        ).clamp(0, 1)
        if not return_steps:
            return images
        steps = int(decode_overrides.get("steps", self.decode_settings["steps"]))
        frames = []
        for t in range(steps):  # reveal the image left to right; unrevealed columns grey
            frame = torch.full_like(images, 0.5)
            cols = (t + 1) * self.image_size // (steps + 1)
            frame[..., :cols] = images[..., :cols]
            frames.append(frame)
        return images, frames

    def encode_features(self, images: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(images.float(), 4).flatten(1)

    def reconstruct(self, images: Tensor) -> Tensor:
        return F.avg_pool2d(images, 3, stride=1, padding=1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return (self.weight - 1.0) ** 2

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return None

    def test_step(self, batch: Any, batch_idx: int) -> None:
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ProjectionExtractor(FeatureExtractor):
    """Fixed random projections of 4x4-pooled pixels: features (D) and logits (num_logits)."""

    name = "proj"

    def __init__(self, num_features: int = 16, num_logits: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_features, self.num_logits = num_features, num_logits
        self.register_buffer("w_feat", torch.randn(48, num_features, generator=g))
        self.register_buffer("w_logit", torch.randn(num_features, num_logits, generator=g))
        self.cache_id = f"proj-{num_features}-{num_logits}-{seed}"

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = F.adaptive_avg_pool2d(to_uint8(images).float() / 255, 4).flatten(1)
        feats = x @ self.w_feat
        return feats, feats @ self.w_logit
