"""Image conversions shared by the evaluation code, its callbacks and the picture writers."""

from __future__ import annotations

import torch
from torch import Tensor


def to_uint8(images: Tensor) -> Tensor:
    """Float images in [0, 1] -> uint8 by rounding (CONVENTIONS.md); uint8 passes through.

    Values outside [0, 1] are clamped; other integer dtypes are a TypeError (their scale is unknown).
    Not `(x * 255).byte()`, which truncates and biases most pixels one level down (docs/DEPENDENCIES.md).
    """
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"to_uint8 takes float images in [0, 1] or uint8, got {images.dtype}")
    return (images.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8)
