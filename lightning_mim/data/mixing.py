"""Mixup / CutMix on image batches (MAGE fine-tuning), with timm's `Mixup` semantics on torchvision v2.

They act on the *images*, before tokenization, as the official fine-tuning does (timm Mixup on the
pixel batch); the labels become soft targets (B, C) and the loss is the soft-target cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2


def mixup_transform(
    num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0, switch_prob: float = 0.5
) -> nn.Module | None:
    """torchvision v2 MixUp / CutMix on an (images, int labels) batch -> (mixed images, soft labels (B, C)).

    timm's `Mixup` semantics: with both on, CutMix is chosen with `switch_prob`; the whole batch is
    mixed with probability `prob` (otherwise the labels are still returned one-hot, so the loss is
    the same soft-target cross-entropy every step). None when both alphas are 0.
    """
    if mixup < 0 or cutmix < 0:
        raise ValueError(f"mixup and cutmix alphas must be >= 0, got {mixup}, {cutmix}")
    if not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
        raise ValueError(f"mixup_prob and mixup_switch_prob must be in [0, 1], got {prob}, {switch_prob}")
    if mixup == 0 and cutmix == 0:
        return None
    if mixup > 0 and cutmix > 0:
        mix: nn.Module = v2.RandomChoice(
            [v2.MixUp(alpha=mixup, num_classes=num_classes), v2.CutMix(alpha=cutmix, num_classes=num_classes)],
            p=[1 - switch_prob, switch_prob],
        )
    elif mixup > 0:
        mix = v2.MixUp(alpha=mixup, num_classes=num_classes)
    else:
        mix = v2.CutMix(alpha=cutmix, num_classes=num_classes)
    return _MaybeMix(mix, num_classes, prob)


class _MaybeMix(nn.Module):
    """Apply `mix` with probability `prob`, else return one-hot labels (same output type either way)."""

    def __init__(self, mix: nn.Module, num_classes: int, prob: float) -> None:
        super().__init__()
        self.mix, self.num_classes, self.prob = mix, int(num_classes), float(prob)

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.prob >= 1 or torch.rand(()) < self.prob:
            return self.mix(images, labels)
        return images, F.one_hot(labels, self.num_classes).to(images.dtype)
