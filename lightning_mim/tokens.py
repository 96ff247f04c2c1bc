"""The token-id layout shared by MaskGIT and MAGE: codes, then class slots, then the mask id.

Official models: 1024 codes + 1000 class slots + 1 mask = vocabulary 2025, mask id 2024.
"""

from __future__ import annotations

from dataclasses import dataclass


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
