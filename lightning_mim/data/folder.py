"""Image folders (ImageNet-style class sub-folders) → image shards.

Two layouts: `root/<class>/<image>` split deterministically into train/val by `stratified_split`, or
`root/train/<class>/...` + `root/val/<class>/...` (+ optional `root/test/...`). Classes are the sorted
sub-folder names of the train tree (torchvision `ImageFolder` order); labels are their indices.
Unreadable images are skipped, counted and listed in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from lightning_mim.data.shards import EncodedImage, build_dir_atomically, encode_image, write_image_shards

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
# Pillow decoders we let read source files: no EPS (Ghostscript) or other exotic plugins.
PIL_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP")
LAYOUTS = ("auto", "split", "flat")
SPLIT_DIR_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def interpolation_mode(name: str):
    """torchvision InterpolationMode for a name in INTERPOLATIONS."""
    from torchvision.transforms import InterpolationMode

    if name not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation '{name}'; valid: {', '.join(INTERPOLATIONS)}")
    return InterpolationMode(name)


def stratified_split(
    labels: Sequence[int] | np.ndarray,
    *,
    val_fraction: float | None = 0.1,
    val_per_class: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class train/val split: (train indices, val indices), each in shuffled order.

    Each class gives `val_per_class` samples (or round(val_fraction·n), at least 1) to val, chosen by a seeded
    permutation; both index lists are shuffled with the same seed so any prefix is class-balanced.
    """
    labels = np.asarray(labels)
    if val_per_class is None and (val_fraction is None or not 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if val_per_class is not None:
            n_val = int(val_per_class)
        else:  # round half up, and at least one per class when asked for any (tiny folders)
            n_val = int(np.floor(val_fraction * len(idx) + 0.5))
            if val_fraction > 0 and len(idx) > 1:
                n_val = max(n_val, 1)
        if n_val >= len(idx) and n_val > 0:
            raise ValueError(f"class {c} has {len(idx)} samples; cannot put {n_val} into val and keep one for train")
        idx = rng.permutation(idx)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    train_idx = rng.permutation(np.concatenate(train)) if train else np.zeros(0, dtype=np.int64)
    val_idx = rng.permutation(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    return train_idx.astype(np.int64), val_idx.astype(np.int64)


@dataclass
class FolderIndex:
    """What `scan_image_folder` found: class names and, per split, (relative path, label) pairs."""

    root: Path
    layout: str
    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]] = field(default_factory=dict)


def _listdir(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as entries:
            return sorted(entries, key=lambda e: e.name)
    except PermissionError as err:
        raise PermissionError(f"cannot read {path}: permission denied") from err


def _class_dirs(tree: Path) -> list[str]:
    return [e.name for e in _listdir(tree) if e.is_dir() and not e.name.startswith(".")]


def _image_files(class_dir: Path) -> list[str]:
    """Image files below a class folder (recursive, sorted), relative to it."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True, onerror=_raise):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(dirpath, name), class_dir))
    return found


def _raise(err: OSError) -> None:
    if isinstance(err, PermissionError):
        raise PermissionError(f"cannot read {err.filename}: permission denied") from err
    raise err


def _scan_tree(tree: Path, root: Path, class_names: list[str] | None) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path relative to root, label)]) of one class tree."""
    classes = _class_dirs(tree)
    if class_names is None:
        class_names = classes
    else:
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise ValueError(f"{tree} has classes not in the train tree: {', '.join(unknown[:10])}")
    label_of = {name: i for i, name in enumerate(class_names)}
    items = []
    for name in classes:
        rel_root = os.path.relpath(tree / name, root)
        for rel in _image_files(tree / name):
            items.append((os.path.join(rel_root, rel), label_of[name]))
    return class_names, items


def scan_image_folder(
    root: str | os.PathLike,
    *,
    layout: str = "auto",
    val_fraction: float | None = 0.1,
    val_per_class: int | None = None,
    seed: int = 0,
) -> FolderIndex:
    """Find classes and images; split them into train/val (and test if the folder has one).

    layout: `flat` = root/<class>/..., split by `stratified_split`; `split` = root/train/<class>/...
    and root/val/<class>/... (val may also be called `validation`; `test` is optional); `auto` picks
    `split` when every sub-folder of root is one of train/val/validation/test and train exists.
    Paths in the index are relative to root.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}'; valid: {', '.join(LAYOUTS)}")
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    top = _class_dirs(root)
    if layout == "auto":
        layout = "split" if "train" in top and set(top) <= set(SPLIT_DIR_NAMES) else "flat"
    expected = "root/<class>/<image>" if layout == "flat" else "root/train/<class>/<image> + root/val/<class>/<image>"
    if not top:
        raise ValueError(f"{root} is empty: no class sub-folders (expected {expected})")

    if layout == "flat":
        class_names, items = _scan_tree(root, root, None)
        if not items:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root} (expected {expected})")
        train_idx, val_idx = stratified_split(
            [label for _, label in items], val_fraction=val_fraction, val_per_class=val_per_class, seed=seed
        )
        splits = {"train": [items[i] for i in train_idx], "val": [items[i] for i in val_idx]}
        return FolderIndex(root, layout, class_names, splits)

    if "train" not in top:
        raise ValueError(f"{root} has no train/ sub-folder (expected {expected})")
    class_names, train_items = _scan_tree(root / "train", root, None)
    if not class_names:
        raise ValueError(f"{root / 'train'} has no class sub-folders (expected {expected})")
    if not train_items:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root / 'train'}")
    rng = np.random.default_rng(seed)
    splits = {"train": [train_items[i] for i in rng.permutation(len(train_items))]}
    for dirname in top:
        split = SPLIT_DIR_NAMES.get(dirname)
        if split in (None, "train"):
            continue
        if split in splits:
            raise ValueError(f"{root} has both val/ and validation/; keep one")
        _, items = _scan_tree(root / dirname, root, class_names)
        splits[split] = [items[i] for i in rng.permutation(len(items))]
    return FolderIndex(root, layout, class_names, splits)


def load_image(
    path: str | os.PathLike,
    resolution: int | None = None,
    *,
    crop: bool = True,
    interpolation: str = "bicubic",
) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8; optionally resize the shorter side to `resolution`
    and centre-crop a square (the same torchvision calls the DataModule's eval transform makes)."""
    from torchvision.transforms.v2 import functional as F

    with Image.open(path, formats=PIL_FORMATS) as opened:
        image = opened.convert("RGB")  # decodes fully: truncated files raise here
    if resolution:
        if min(image.size) != resolution:
            image = F.resize(image, resolution, interpolation=interpolation_mode(interpolation), antialias=True)
        if crop and image.size != (resolution, resolution):
            image = F.center_crop(image, [resolution, resolution])
    return np.asarray(image)


def _encode_file(job: tuple[str, int | None, bool, str, str, int]) -> tuple[EncodedImage | None, str | None]:
    """Pool worker: (encoded image, None) or (None, error message) for one file."""
    path, resolution, crop, interpolation, encoding, quality = job
    try:
        return encode_image(load_image(path, resolution, crop=crop, interpolation=interpolation), encoding, quality), None
    except Exception as err:  # any decoder failure means "unreadable", never a crash of the whole run
        return None, f"{type(err).__name__}: {err}"


@dataclass(frozen=True)
class FolderShardOptions:
    """Every option that changes the shards written from an image folder: what `write_folder_shards`
    writes, and so what `ensure_folder_shards` hashes into its cache key (one list, not three).

    `resolution` None keeps the stored size; `val_fraction` / `val_per_class` / `seed` only split a
    flat layout (see `stratified_split`).
    """

    resolution: int | None = 256
    crop: bool = True
    interpolation: str = "bicubic"
    encoding: str = "png"
    quality: int = 95
    shard_size: int = 1000
    layout: str = "auto"
    val_fraction: float | None = 0.1
    val_per_class: int | None = None
    seed: int = 0

    def scan(self, root: str | os.PathLike) -> FolderIndex:
        """`scan_image_folder` with these options' layout and split."""
        return scan_image_folder(
            root, layout=self.layout, val_fraction=self.val_fraction, val_per_class=self.val_per_class, seed=self.seed
        )


def write_folder_shards(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: FolderShardOptions | None = None,
    *,
    workers: int = 0,
    progress: bool = True,
    index: FolderIndex | None = None,
) -> dict[str, Any]:
    """Write every split of an image folder as shards into `out_dir`; returns the manifest.

    `workers` > 0 decodes/resizes/encodes in that many processes (output order is unchanged).
    `index` (from `options.scan(root)`) saves scanning the folder again.
    """
    opts = options or FolderShardOptions()
    interpolation_mode(opts.interpolation)  # fail early on a bad name
    index = index or opts.scan(root)
    source = {
        "type": "imagefolder",
        "root": str(Path(root).resolve()),
        "layout": index.layout,
        "crop": opts.crop,
        "interpolation": opts.interpolation,
        "val_fraction": opts.val_fraction if index.layout == "flat" else None,
        "val_per_class": opts.val_per_class if index.layout == "flat" else None,
        "seed": opts.seed,
    }
    pool = ProcessPoolExecutor(workers) if workers > 0 else None
    manifest: dict[str, Any] = {}
    try:
        for split, items in index.splits.items():
            skipped: list[dict] = []
            jobs = [
                (str(index.root / rel), opts.resolution, opts.crop, opts.interpolation, opts.encoding, opts.quality)
                for rel, _ in items
            ]
            results = _bounded_map(pool, _encode_file, jobs, 64 * workers) if pool else map(_encode_file, jobs)

            def samples(items=items, results=results, skipped=skipped, split=split) -> Iterator[tuple]:
                position = 0
                for (rel, label), (encoded, error) in zip(items, results):
                    if encoded is None:
                        skipped.append({"path": rel, "error": error})
                        continue
                    yield f"{split}_{position:08d}", encoded, label, {"path": rel, "class": index.class_names[label]}
                    position += 1

            manifest = write_image_shards(
                out_dir,
                split,
                samples(),
                shard_size=opts.shard_size,
                encoding=opts.encoding,
                quality=opts.quality,
                class_names=index.class_names,
                resolution=opts.resolution,
                skipped=skipped,
                extra_manifest={"source": source, "crop": opts.crop if opts.resolution else None},
                progress=progress,
                total=len(items),
            )
            if items and manifest["splits"][split]["count"] == 0:
                raise ValueError(f"none of the {len(items)} {split} images under {root} could be read; first error: {skipped[0]['error']}")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return manifest


def _bounded_map(pool: Executor, fn: Callable, jobs: Iterable, window: int) -> Iterator:
    """`pool.map` that keeps at most `window` jobs in flight (Executor.map submits everything at once,
    which for a million images means a million futures in memory)."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(fn, job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def ensure_folder_shards(
    root: str | os.PathLike,
    cache_dir: str | os.PathLike,
    options: FolderShardOptions | None = None,
    *,
    workers: int = 0,
    progress: bool = True,
) -> Path:
    """Shards of an image folder, cached in `cache_dir/<folder name>-<hash>` and written only once.

    The hash covers the folder's absolute path, its file list and every option that changes the
    shards, so adding images or changing the resolution builds a new cache entry. (Editing files in
    place under the same names is not detected: delete the cache entry then.)
    """
    opts = options or FolderShardOptions()
    index = opts.scan(root)
    blob = json.dumps(
        {"root": str(Path(root).resolve()), "options": asdict(opts), "classes": index.class_names, "splits": index.splits},
        sort_keys=True,
    ).encode()
    final = Path(cache_dir) / f"{Path(root).resolve().name}-{hashlib.sha256(blob).hexdigest()[:12]}"
    return build_dir_atomically(
        final, lambda tmp: write_folder_shards(root, tmp, opts, workers=workers, progress=progress, index=index)
    )
