"""LightningDataModules over webdataset shards: images (stage 1, MAGE-C) and tokens (stage 2).

Shards can be named three ways: a shard directory with a manifest (`data_dir=`), explicit URLs
(`train_shards=` — local paths, brace patterns `shards-{000000..000099}.tar`, or anything
webdataset opens, e.g. `pipe:aws s3 cp s3://bucket/train-000000.tar -`), or, for the subclasses,
a source that is turned into cached shards on first use (`DigitsDataModule`, `ImageFolderDataModule`).

Batches: `(images float32 (B, 3, S, S) in [0, 1], labels int64 (B,))` and
`(tokens int64 (B, h·w), labels int64 (B,))`. Training yields exactly `batches_per_epoch` batches per
epoch on every rank (default: one pass over the train split across all ranks); validation is an
exact, deterministic pass over the val split (see `pipeline.py`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_mim.data import pipeline as P
from lightning_mim.data.digits import (
    DEFAULT_SHARD_SIZE,
    DEFAULT_VAL_PER_CLASS,
    NUM_CLASSES as DIGITS_CLASSES,
    DigitsShardOptions,
    ensure_digits_shards,
)
from lightning_mim.data.folder import FolderShardOptions, ensure_folder_shards, interpolation_mode
from lightning_mim.data.shards import (
    manifest_for_urls,
    read_manifest,
    shard_urls,
)

SPLITS = ("train", "val", "test")


def _num_classes(explicit: int | None, manifest: dict | None) -> int:
    """The configured number of classes, checked against the manifest (labels must fit)."""
    stored = None if manifest is None else manifest.get("num_classes")
    if explicit is None:
        if stored is None:
            raise ValueError("num_classes is unknown: the shards have no manifest; pass num_classes=")
        return int(stored)
    if stored is not None and int(explicit) < int(stored):
        raise ValueError(f"num_classes={explicit} but the shards have {stored} classes")
    return int(explicit)


class _ShardDataModule(pl.LightningDataModule):
    """Shared plumbing: where the shards are, rank/world size, counters, the loader shapes."""

    kind = "?"

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        *,
        test_shards: str | None = None,
        data_dir: str | os.PathLike | None = None,
        manifest: str | dict | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        batches_per_epoch: int | None = None,
        val_batches: int | None = None,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        max_consecutive_errors: int | None = 100,
    ):
        super().__init__()
        if int(batch_size) < 1 or (val_batch_size is not None and int(val_batch_size) < 1):
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, val_batch_size={val_batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self._shards = {"train": train_shards, "val": val_shards, "test": test_shards}
        self.data_dir = Path(data_dir).expanduser() if data_dir else None
        self._manifest_arg = manifest
        self._manifest: dict | None = None
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.batches_per_epoch = batches_per_epoch
        self.val_batches = val_batches
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.max_consecutive_errors = max_consecutive_errors
        self._counters: dict[str, P.CorruptCounter] = {}
        self._resolved = False

    # ------------------------------------------------------------------ where the data is

    def _build(self) -> Path | None:
        """Subclasses with a source build/find their cached shard directory here."""
        return None

    def prepare_data(self) -> None:
        self._build()

    def setup(self, stage: str | None = None) -> None:
        self._resolve()

    def _resolve(self) -> None:
        if self._resolved:
            return
        built = self._build()
        if built is not None:
            self.data_dir = built
        if self.data_dir is not None:
            self._manifest = read_manifest(self.data_dir)
            for split in SPLITS:
                entry = self._manifest["splits"].get(split)
                if self._shards[split] is None and entry and entry["shards"]:
                    self._shards[split] = shard_urls(self.data_dir, split)
        if isinstance(self._manifest_arg, dict):
            self._manifest = self._manifest_arg
        elif self._manifest_arg:
            self._manifest = read_manifest(self._manifest_arg)
        elif self._manifest is None:
            first = self._shards["train"] or self._shards["val"]
            self._manifest = manifest_for_urls(first) if first else None
        if self._manifest is not None and self._manifest.get("kind") != self.kind:
            raise ValueError(f"{type(self).__name__} needs '{self.kind}' shards; the manifest says '{self._manifest.get('kind')}'")
        self._resolved = True

    def shards(self, split: str) -> str | None:
        """The URL pattern a split is read from (None when there is none)."""
        self._resolve()
        return self._shards[split]

    @property
    def manifest(self) -> dict | None:
        self._resolve()
        return self._manifest

    def _split_count(self, split: str) -> int | None:
        manifest = self.manifest
        if manifest and split in manifest.get("splits", {}):
            return int(manifest["splits"][split]["count"])
        return None

    # ------------------------------------------------------------------ identity

    def _preprocessing(self) -> dict[str, Any]:
        return {}

    @property
    def fingerprint(self) -> str:
        """A short stable hash of the dataset content + deterministic preprocessing.

        Built from the manifest's per-split content hashes (keys, labels, pixels/tokens, encoding)
        when there is a manifest, else from the shard URLs. Training augmentation is not part of it:
        it identifies what an exact evaluation pass sees (FID reference statistics, classifiers).
        """
        manifest = self.manifest
        if manifest is not None:
            content: Any = {s: e.get("content_sha256") for s, e in sorted(manifest["splits"].items())}
            layout = {k: manifest.get(k) for k in ("kind", "encoding", "quality", "resolution", "grid_size", "token_dtype")}
        else:
            content = {s: self._shards[s] for s in SPLITS}
            layout = {"kind": self.kind}
        blob = json.dumps({"content": content, "layout": layout, "preprocessing": self._preprocessing()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ distributed + counters

    def _dist(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return P.dist_info()

    def _counter(self, split: str) -> P.CorruptCounter:
        if split not in self._counters:  # created lazily: shared-memory tensors belong to this process
            self._counters[split] = P.CorruptCounter(f"{self.kind} {split}", self.max_consecutive_errors)
        return self._counters[split]

    @property
    def corrupt_counts(self) -> dict[str, int]:
        """Unreadable samples/shards skipped so far in this process, per split (all workers)."""
        return {split: counter.count for split, counter in self._counters.items()}

    @property
    def corrupt_count(self) -> int:
        return sum(self.corrupt_counts.values())

    # ------------------------------------------------------------------ loaders

    def _sample_map(self, train: bool, counter: P.CorruptCounter):
        raise NotImplementedError

    def _train_batches(self, world_size: int) -> int:
        if self.batches_per_epoch is not None:
            return int(self.batches_per_epoch)
        count = self._split_count("train")
        if count is None:
            raise ValueError("batches_per_epoch is needed when the train shards have no manifest")
        return max(1, math.ceil(count / (self.batch_size * world_size)))

    def train_dataloader(self) -> P.FixedBatches:
        self._resolve()
        urls = self._shards["train"]
        if not urls:
            raise ValueError(f"{type(self).__name__} has no train shards (pass train_shards= or data_dir=)")
        rank, world_size = self._dist()
        counter = self._counter("train")
        return P.train_loader(
            urls,
            self._sample_map(True, counter),
            batch_size=self.batch_size,
            batches_per_epoch=self._train_batches(world_size),
            counter=counter,
            num_workers=self.num_workers,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def _eval_dataloader(self, split: str, *, limit: int | None = None, whole: bool = False) -> P.EvalBatches:
        self._resolve()
        urls = self._shards[split]
        if not urls:
            raise ValueError(f"{type(self).__name__} has no {split} shards (pass {split}_shards= or data_dir=)")
        rank, world_size = (0, 1) if whole else self._dist()
        counter = self._counter(split)
        return P.eval_loader(
            urls,
            self._sample_map(False, counter),
            batch_size=self.val_batch_size,
            counter=counter,
            num_workers=self.num_workers,
            rank=rank,
            world_size=world_size,
            limit=limit,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def val_dataloader(self) -> P.EvalBatches:
        """Exact pass over the val split: finite, deterministic, the same order every time."""
        return self._eval_dataloader("val", limit=self.val_batches)

    def test_dataloader(self) -> P.EvalBatches:
        """The test split when there is one, else the val split."""
        self._resolve()
        return self._eval_dataloader("test" if self._shards["test"] else "val", limit=self.val_batches)

    def exact_dataloader(self, split: str, *, whole: bool = False) -> P.EvalBatches:
        """This rank's share (or with `whole`, all) of an exact, unaugmented pass over a whole split
        ("train", "val", "test").

        Unlike `train_dataloader` (resampled, `batches_per_epoch` long) and `val_dataloader` (cut to
        `val_batches`), it ignores the run's budget: cached artifacts derived from a split (the domain
        classifier, FID reference statistics) must not depend on how long one run chose to train.
        """
        self._resolve()
        if split == "test" and not self._shards["test"]:
            split = "val"
        return self._eval_dataloader(split, whole=whole)


class ImageDataModule(_ShardDataModule):
    """Image shards -> `(float images (B, 3, S, S) in [0, 1], int64 labels)`.

    `train_augment`: None = the papers' augmentation (RandomResizedCrop(S, scale (0.2, 1), ratio
    (3/4, 4/3)) + horizontal flip), False = none (resize + centre crop, as for val), or a dict
    overriding keys of it: `random_resized_crop`, `scale`, `ratio`, `hflip`. Val/test are always
    resize-shorter-side + centre crop. `interpolation` is used by every resize.
    """

    kind = "image"

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        *,
        image_size: int = 32,
        train_augment: dict | bool | None = None,
        interpolation: str = "bicubic",
        num_classes: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(train_shards, val_shards, **kwargs)
        if int(image_size) < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.train_augment = P.augment_options(train_augment)  # validates early
        interpolation_mode(interpolation)
        self.interpolation = interpolation
        self._num_classes = num_classes

    @property
    def num_classes(self) -> int:
        return _num_classes(self._num_classes, self.manifest)

    @property
    def deterministic_train_images(self) -> bool:
        """True when a training image is the same tensor every epoch (no random crop, no flip): a
        frozen tokenizer's codes can then be remembered instead of recomputed (`modules.token_memo`)."""
        return not (self.train_augment["random_resized_crop"] or self.train_augment["hflip"])

    def _preprocessing(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "interpolation": self.interpolation, "eval": "resize_shorter+center_crop"}

    def _sample_map(self, train: bool, counter: P.CorruptCounter):
        return P.image_map(
            self.image_size, train=train, augment=self.train_augment, interpolation=self.interpolation, counter=counter
        )


class DigitsDataModule(ImageDataModule):
    """The embedded digits (scikit-learn, 1 797 images, 10 classes) at `resolution`, cached as shards.

    Training augmentation is off by default: a flipped digit is another glyph (or none), and the
    digits fill the frame, so random crops cut strokes. Pass `train_augment={"random_resized_crop":
    True, "scale": [0.8, 1.0], "hflip": False}` for a mild one.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        resolution: int = 32,
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        split_seed: int = 0,
        val_per_class: int = DEFAULT_VAL_PER_CLASS,
        upscale: str = "bicubic",
        image_size: int | None = None,
        train_augment: dict | bool | None = False,
        num_classes: int | None = DIGITS_CLASSES,
        progress: bool = True,
        **kwargs: Any,
    ):
        if num_classes is not None and int(num_classes) != DIGITS_CLASSES:
            raise ValueError(f"the digits have {DIGITS_CLASSES} classes, not {num_classes}")
        super().__init__(image_size=image_size or resolution, train_augment=train_augment, num_classes=DIGITS_CLASSES, **kwargs)
        self.cache_dir = Path(cache_dir).expanduser()
        self.resolution = int(resolution)
        self._options = DigitsShardOptions(
            resolution=self.resolution, shard_size=int(shard_size), seed=int(split_seed),
            val_per_class=int(val_per_class), interpolation=upscale,
        )
        self._progress = progress

    def _build(self) -> Path:
        return ensure_digits_shards(self.cache_dir, self._options, progress=self._progress)


class ImageFolderDataModule(ImageDataModule):
    """An image folder (class sub-folders; flat or train/ + val/) turned into cached shards on first use.

    `resolution` (default: image_size) is the stored size: shorter side resized, centre-cropped unless
    `crop=False`. Store larger than image_size when RandomResizedCrop should see more pixels.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        cache_dir: str | os.PathLike,
        *,
        resolution: int | None = None,
        crop: bool = True,
        encoding: str = "png",
        quality: int = 95,
        shard_size: int = 1000,
        layout: str = "auto",
        val_fraction: float | None = 0.1,
        val_per_class: int | None = None,
        split_seed: int = 0,
        prepare_workers: int = 0,
        progress: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.cache_dir = Path(cache_dir).expanduser()
        self._options = FolderShardOptions(
            resolution=int(resolution or self.image_size), crop=crop, interpolation=self.interpolation,
            encoding=encoding, quality=quality, shard_size=shard_size, layout=layout, val_fraction=val_fraction,
            val_per_class=val_per_class, seed=split_seed,
        )
        self._prepare_workers = prepare_workers
        self._progress = progress
        self._built: Path | None = None

    def _build(self) -> Path:
        if self._built is None:
            self._built = ensure_folder_shards(
                self.root, self.cache_dir, self._options, workers=self._prepare_workers, progress=self._progress
            )
        return self._built


class TokenDataModule(_ShardDataModule):
    """Token shards (written by `write_token_shards`) -> `(int64 tokens (B, h·w), int64 labels)`.

    The manifest (from `data_dir`, `manifest=` — a path or any URL webdataset opens — or beside
    local shards) gives the grid size, token dtype, number of classes and codebook size.
    """

    kind = "tokens"

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        *,
        num_classes: int | None = None,
        image_size: int | None = None,
        **kwargs: Any,
    ):
        """`num_classes` / `image_size` default to the manifest's; set them when configs need the values
        before the data exists (they are checked against the manifest when it is read)."""
        super().__init__(train_shards, val_shards, **kwargs)
        self._num_classes = num_classes
        self._image_size = image_size

    @property
    def manifest(self) -> dict:
        manifest = super().manifest
        if manifest is None:
            raise ValueError("token shards need their manifest (grid size, dtype): pass data_dir= or manifest=")
        return manifest

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.manifest["grid_size"]
        return int(h), int(w)

    @property
    def seq_len(self) -> int:
        h, w = self.grid_size
        return h * w

    @property
    def num_classes(self) -> int:
        return _num_classes(self._num_classes, self.manifest)

    @property
    def image_size(self) -> int | None:
        """Resolution of the images the tokens encode (explicit, or the manifest's `image_size`)."""
        stored = self.manifest.get("image_size")
        if self._image_size is not None and stored is not None and int(stored) != int(self._image_size):
            raise ValueError(f"image_size={self._image_size} but the token shards encode {stored}px images")
        value = self._image_size if self._image_size is not None else stored
        return None if value is None else int(value)

    @property
    def codebook_size(self) -> int | None:
        value = self.manifest.get("codebook_size")
        return None if value is None else int(value)

    def _sample_map(self, train: bool, counter: P.CorruptCounter):
        return P.token_map(self.manifest["token_dtype"], self.seq_len, counter)
