"""The embedded dataset: scikit-learn's bundled 8x8 handwritten digits, upscaled, as image shards.

1 797 grey images (values 0..16, white ink on black), 10 classes, shipped inside scikit-learn (no
download). Pixels become uint8 as round(v · 255 / 16), are upscaled to `resolution` (bicubic by
default) and repeated to 3 channels. The train/val split is stratified and seeded (`val_per_class`
images of every class go to val). The shards are built once into `cache_dir` and reused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lightning_mim.data.folder import INTERPOLATIONS, stratified_split
from lightning_mim.data.shards import build_dir_atomically, write_image_shards

NUM_CLASSES = 10
NUM_IMAGES = 1797
CLASS_NAMES = [str(i) for i in range(NUM_CLASSES)]
DEFAULT_SHARD_SIZE = 50  # 200 val images -> 4 shards: an exact val pass splits over 2 ranks x 2 workers
DEFAULT_VAL_PER_CLASS = 20


def digits_arrays(resolution: int = 32, interpolation: str = "bicubic") -> tuple[np.ndarray, np.ndarray]:
    """All digits as (uint8 (1797, R, R, 3), int64 (1797,)) in scikit-learn's order."""
    from sklearn.datasets import load_digits

    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation '{interpolation}'; valid: {', '.join(INTERPOLATIONS)}")
    if int(resolution) < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    digits = load_digits()
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), exact for 0 and 16
    if resolution != small.shape[1]:
        resample = Image.Resampling[interpolation.upper()]
        small = np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution), resample)) for im in small])
    return np.repeat(small[..., None], 3, axis=3), digits.target.astype(np.int64)


@dataclass(frozen=True)
class DigitsShardOptions:
    """Every option that changes the digits' shards: what `write_digits_shards` writes and what names
    `ensure_digits_shards`' cache entry (one list, not three)."""

    resolution: int = 32
    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0
    val_per_class: int = DEFAULT_VAL_PER_CLASS
    interpolation: str = "bicubic"

    @property
    def dir_name(self) -> str:
        """Sub-directory of the cache that holds this variant (different options never share a dir)."""
        return (
            f"digits-{self.resolution}px-{self.interpolation}-val{self.val_per_class}"
            f"-seed{self.seed}-shard{self.shard_size}"
        )


def write_digits_shards(
    out_dir: str | os.PathLike, options: DigitsShardOptions | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Write the digits as `train` and `val` PNG shards into `out_dir`; returns the manifest."""
    opts = options or DigitsShardOptions()
    images, labels = digits_arrays(opts.resolution, opts.interpolation)
    train_idx, val_idx = stratified_split(labels, val_per_class=opts.val_per_class, seed=opts.seed)
    source = {
        "type": "sklearn.datasets.load_digits",
        "resolution": int(opts.resolution),
        "interpolation": opts.interpolation,
        "seed": int(opts.seed),
        "val_per_class": int(opts.val_per_class),
    }
    manifest: dict[str, Any] = {}
    for split, indices in (("train", train_idx), ("val", val_idx)):
        # the key carries the index into scikit-learn's array; no per-sample json (tar headers dominate)
        samples = ((f"digit_{i:04d}", images[i], int(labels[i])) for i in indices)
        manifest = write_image_shards(
            out_dir,
            split,
            samples,
            shard_size=opts.shard_size,
            encoding="png",
            class_names=CLASS_NAMES,
            resolution=int(opts.resolution),
            extra_manifest={"source": source},
            progress=progress,
            total=len(indices),
        )
    return manifest


def ensure_digits_shards(
    cache_dir: str | os.PathLike, options: DigitsShardOptions | None = None, *, progress: bool = True
) -> Path:
    """Directory with the digits' train/val shards + manifest.json, built on first use.

    Idempotent; a half-written or damaged cache (no manifest, a missing or truncated shard) is
    rebuilt, never read.
    """
    opts = options or DigitsShardOptions()
    final = Path(cache_dir) / opts.dir_name
    return build_dir_atomically(final, lambda tmp: write_digits_shards(tmp, opts, progress=progress))
