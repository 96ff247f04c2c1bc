"""Data: the embedded digits, image folders, the shard writer and the DataModules.

Entry points:
- `python -m lightning_mim.data.prepare {digits,imagefolder,verify} ...` writes / checks shards;
- `DigitsDataModule`, `ImageFolderDataModule`, `ImageDataModule` (any image shards, any URL),
  `TokenDataModule` (pre-tokenized shards for stage 2); their skipped-sample counts are logged by
  `lightning_mim.callbacks.CorruptSampleLogger`;
- `write_image_shards`, `write_token_shards`, `read_manifest`, `shard_urls` (from `shards`).

Names are imported lazily, so the writer and the prepare CLI start without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DigitsDataModule": "datamodules",
    "DigitsShardOptions": "digits",
    "ImageDataModule": "datamodules",
    "ImageFolderDataModule": "datamodules",
    "TokenDataModule": "datamodules",
    "ensure_digits_shards": "digits",
    "AUGMENT_DEFAULTS": "pipeline",
    "NO_AUGMENT": "pipeline",
    "ImageTransform": "pipeline",
    "iter_image_samples": "pipeline",
    "read_manifest": "shards",
    "shard_urls": "shards",
    "write_image_shards": "shards",
    "write_token_shards": "shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_mim.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"lightning_mim.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
