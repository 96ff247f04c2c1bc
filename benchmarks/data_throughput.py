"""Images/s of ImageDataModule with 0, 1 and 2 DataLoader workers.

Two shard sets: the embedded digits (32x32 PNG, no augmentation, the digits default) and a generated
set of 10 000 synthetic 256x256 JPEGs (the papers' RandomResizedCrop + flip for training, resize +
centre crop for val), written into a temporary directory. Run by hand:

    python benchmarks/data_throughput.py [--images 10000] [--batch-size 64] [--seconds 6]

Prints one table; "ratio" is the throughput relative to 0 workers of the same row group. The load
average is printed too: on a shared machine the numbers move with it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from conditions import print_conditions


def synthetic_images(n: int, size: int, seed: int = 0):
    """Smooth colour fields with a few rectangles: JPEG sizes close to natural photos (~15-30 KB)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        a, b, c = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3), rng.uniform(0, 1, 3)
        image = (c + a * xx[..., None] + b * yy[..., None]) * 255
        for _ in range(4):
            x0, y0 = rng.integers(0, size - 32, 2)
            w, h = rng.integers(16, size // 2, 2)
            image[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, 3)
        image += rng.normal(0, 6, image.shape)
        yield f"img_{i:06d}", np.clip(image, 0, 255).astype(np.uint8), int(i % 1000)


def measure(loader, seconds: float) -> float:
    """Images/s over roughly `seconds`, excluding the very first batch (worker start-up). A finite
    (val) loader is passed over again until the time is up; its later start-ups are counted."""
    iterator = iter(loader)
    next(iterator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for x, _ in iterator:
            count += len(x)
            if time.perf_counter() - start > seconds:
                break
        iterator = iter(loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=6.0, help="measuring time per cell")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    print_conditions()

    import torch

    from lightning_mim.data import DigitsDataModule, ImageDataModule, write_image_shards
    from lightning_mim.data.shards import shard_urls

    torch.set_num_threads(1)  # loaders run per-sample PIL work; keep the comparison about workers
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        DigitsDataModule(tmp / "digits", progress=False).prepare_data()
        digits_s = time.perf_counter() - start
        start = time.perf_counter()
        write_image_shards(tmp / "jpeg", "train", synthetic_images(args.images, 256), shard_size=500, encoding="jpg", quality=90)
        write_image_shards(tmp / "jpeg", "val", synthetic_images(1000, 256, seed=1), shard_size=250, encoding="jpg", quality=90)
        jpeg_s = time.perf_counter() - start
        jpeg_bytes = sum(p.stat().st_size for p in (tmp / "jpeg").glob("train-*.tar"))
        print(f"built digits shards in {digits_s:.1f} s; {args.images} JPEG 256x256 train + 1000 val in {jpeg_s:.1f} s "
              f"({jpeg_bytes / args.images / 1024:.1f} KB/image incl. tar headers)")

        def digits(workers: int) -> ImageDataModule:
            return DigitsDataModule(tmp / "digits", batch_size=args.batch_size, val_batch_size=args.batch_size,
                                    batches_per_epoch=10**6, num_workers=workers, progress=False)

        def jpeg(workers: int) -> ImageDataModule:
            return ImageDataModule(shard_urls(tmp / "jpeg", "train"), shard_urls(tmp / "jpeg", "val"), image_size=256,
                                   batch_size=args.batch_size, val_batch_size=args.batch_size, batches_per_epoch=10**6,
                                   num_workers=workers, num_classes=1000)

        for name, make, train_note in (("digits 32px png", digits, "no aug"), ("synthetic 256px jpg", jpeg, "RRC+flip")):
            for split in ("train", "val"):
                base = None
                for workers in args.workers:
                    dm = make(workers)
                    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
                    rate = measure(loader, args.seconds)
                    base = base or rate
                    note = train_note if split == "train" else "resize+crop"
                    rows.append((name, f"{split} ({note})", workers, rate, rate / base))
                    print(f"  {name:20s} {split:5s} workers={workers}: {rate:8.0f} images/s", flush=True)

    load = os.getloadavg()
    print(f"\ncpu cores: {os.cpu_count()}, load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, batch {args.batch_size}")
    header = f"| {'shards':20s} | {'loader':22s} | workers | images/s | ratio |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, loader, workers, rate, ratio in rows:
        print(f"| {name:20s} | {loader:22s} | {workers:7d} | {rate:8.0f} | {ratio:5.2f} |")


if __name__ == "__main__":
    main()
