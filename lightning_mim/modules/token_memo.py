"""`TokenMemo`: the frozen tokenizer's token grids remembered by image content, within one process.

A stage-2 model trains on the codes of a *frozen* tokenizer. When the training images are
deterministic (no random crop, no flip: the digits presets), every epoch feeds the tokenizer the same
images again, and on CPU its forward pass is about a tenth of a digits trial (`benchmarks/sweep_cost.py`).
The memo maps each image's bytes to its codes, so the tokenizer runs once per distinct image (the
first epoch and the first validation pass) and is skipped after that.

Why here and not token shards: `python -m lightning_mim.tokenize` + `data=tokens` is the fast path for
large datasets, but the generation metrics, the domain classifier and the reconstruction pictures need
the image DataModule; the memo keeps the run's data exactly as it is and changes nothing it computes
(tested: the same codes, the same trained weights with and without it).

Limits: CPU tensors only (on an accelerator, hashing would cost a device-to-host copy per batch and
the tokenizer pass is cheap there); at most `max_entries` images (then new images are encoded but not
remembered); keyed by content (shape, dtype, bytes), so it never returns codes of another image.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import Tensor

DEFAULT_MAX_ENTRIES = 200_000  # 200k grids of 256 int32 codes: 200 MB at most


class TokenMemo:
    """`memo(images, encode)` == `encode(images)` for a deterministic `encode`, calling `encode` only on
    images not seen before. `hits` / `misses` count images."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if int(max_entries) < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = int(max_entries)
        self._codes: dict[bytes, Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._codes)

    @staticmethod
    def key(image: Tensor) -> bytes:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{tuple(image.shape)}{image.dtype}".encode())
        digest.update(image.contiguous().numpy().tobytes())
        return digest.digest()

    def __call__(self, images: Tensor, encode: Callable[[Tensor], Tensor]) -> Tensor:
        """(B, ...) CPU `images` -> (B, ...) codes; `encode` maps a batch of images to a batch of codes."""
        if images.device.type != "cpu":
            raise ValueError(f"TokenMemo works on CPU tensors, got {images.device}")
        if images.shape[0] == 0:
            return encode(images)
        keys = [self.key(image) for image in images]
        missing = [i for i, k in enumerate(keys) if k not in self._codes]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            fresh = encode(images[missing])
            for index, codes in zip(missing, fresh):
                if len(self._codes) < self.max_entries:
                    self._codes[keys[index]] = codes.clone()
            if len(missing) == len(keys):
                return fresh
            found = {i: c for i, c in zip(missing, fresh)}
            return torch.stack([found[i] if i in found else self._codes[k] for i, k in enumerate(keys)])
        return torch.stack([self._codes[k] for k in keys])
