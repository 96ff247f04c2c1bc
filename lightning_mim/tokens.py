"""The token-id layout shared by MaskGIT and MAGE: codes, then class slots, then the mask id; and the
token grid's cell size in pixels (`downsample_factor`).

Official models: 1024 codes + 1000 class slots + 1 mask = vocabulary 2025, mask id 2024.
Torch-free, so that config checks (`orchestration.schema`) can use it without importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def downsample_factor(channel_multipliers: Sequence[int]) -> int:
    """Pixels per token cell along each side: one 2x down-sampling between consecutive levels,
    2 ** (levels - 1) (the official [1, 1, 2, 2, 4] -> 16)."""
    if not channel_multipliers:
        raise ValueError("channel_multipliers must name at least one level")
    return 2 ** (len(channel_multipliers) - 1)


@dataclass(frozen=True)
class TokenLayout:
    """Where codes, class slots and the mask id live in the transformer's vocabulary."""

    codebook_size: int = 1024
    num_classes: int = 1000

    @property
    def mask_id(self) -> int:
        return self.codebook_size + self.num_classes

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_classes + 1

    def class_id(self, label: int) -> int:
        """Id of the class token for `label` (0-based)."""
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside [0, {self.num_classes})")
        return self.codebook_size + label
