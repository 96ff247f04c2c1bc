"""`python -m lightning_mim.data.prepare`: image folders or the embedded digits -> webdataset shards.

```
python -m lightning_mim.data.prepare digits --out DIR [--resolution 32] [--shard-size 50]
python -m lightning_mim.data.prepare imagefolder ROOT --out DIR [--resolution 256] [--no-crop]
       [--encoding png|jpg] [--quality 95] [--shard-size 1000] [--layout auto|split|flat]
       [--val-fraction 0.1 | --val-per-class N] [--seed 0] [--workers N] [--overwrite]
python -m lightning_mim.data.prepare verify DIR     # sizes + sha256 of every shard
```

The output directory appears only when complete (written beside it, then renamed). Unreadable
images are skipped, counted and listed in `manifest.json`. ImageNet: `imagefolder /data/ILSVRC2012
--out /data/imagenet-wds --resolution 256 --encoding jpg --workers 32` gives the 256x256 centre crops
the papers evaluate on; keep `--no-crop` (and a larger `--resolution`) if RandomResizedCrop should
see the whole image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from lightning_mim.data.digits import (
    DEFAULT_SHARD_SIZE,
    DEFAULT_VAL_PER_CLASS,
    DigitsShardOptions,
    write_digits_shards,
)
from lightning_mim.data.folder import INTERPOLATIONS, LAYOUTS, FolderShardOptions, write_folder_shards
from lightning_mim.data.shards import ENCODINGS, ShardError, build_dir_atomically, check_shards, is_complete, read_manifest
from lightning_mim.orchestration.config import ArgumentParser, report_config_error


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m lightning_mim.data.prepare", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, type=Path, help="output directory (created; must not exist unless --overwrite)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--interpolation", default="bicubic", choices=INTERPOLATIONS)
        p.add_argument("--seed", type=int, default=0, help="seed of the train/val split and of the shard order")

    digits = sub.add_parser("digits", help="the embedded scikit-learn digits (1 797 images, 10 classes)")
    common(digits)
    digits.add_argument("--resolution", type=int, default=32)
    digits.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    digits.add_argument("--val-per-class", type=int, default=DEFAULT_VAL_PER_CLASS)

    folder = sub.add_parser("imagefolder", help="a folder of class sub-folders (flat, or train/ + val/)")
    folder.add_argument("root", type=Path)
    common(folder)
    folder.add_argument("--resolution", type=int, default=256, help="shorter side after resizing (0 = keep size)")
    folder.add_argument("--no-crop", action="store_true", help="resize only, no centre crop to a square")
    folder.add_argument("--encoding", default="png", choices=ENCODINGS)
    folder.add_argument("--quality", type=int, default=95, help="JPEG quality")
    folder.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    folder.add_argument("--layout", default="auto", choices=LAYOUTS)
    folder.add_argument("--val-fraction", type=float, default=0.1, help="flat layout: fraction of each class for val")
    folder.add_argument("--val-per-class", type=int, default=None, help="flat layout: images of each class for val")
    folder.add_argument("--workers", type=int, default=0, help="processes that decode/resize/encode")

    verify = sub.add_parser("verify", help="check a shard directory against its manifest (sizes, sha256)")
    verify.add_argument("dir", type=Path)
    return parser


def _summary(out: Path, manifest: dict) -> str:
    lines = [f"wrote {out}"]
    for split, entry in manifest["splits"].items():
        skipped = f", {entry['num_skipped']} unreadable skipped" if entry.get("num_skipped") else ""
        lines.append(f"  {split}: {entry['count']} images in {len(entry['shards'])} shards{skipped}")
        for item in entry.get("skipped", [])[:5]:
            lines.append(f"    skipped {item['path']}: {item['error']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "verify":
            manifest = check_shards(args.dir, checksums=True)
            total = sum(len(e["shards"]) for e in manifest["splits"].values())
            print(f"{args.dir}: {total} shards match the manifest")
            return 0
        out: Path = args.out
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            state = "a complete shard directory" if is_complete(out) else "not empty"
            raise FileExistsError(f"{out} exists and is {state}; pass --overwrite to replace it")
        progress = not args.no_progress
        if args.command == "digits":
            options = DigitsShardOptions(  # checks its values before anything is written
                resolution=args.resolution, shard_size=args.shard_size, seed=args.seed,
                val_per_class=args.val_per_class, interpolation=args.interpolation,
            )

            def build(tmp: Path) -> None:
                write_digits_shards(tmp, options, progress=progress)
        else:
            options = FolderShardOptions(
                resolution=args.resolution or None, crop=not args.no_crop, interpolation=args.interpolation,
                encoding=args.encoding, quality=args.quality, shard_size=args.shard_size, layout=args.layout,
                val_fraction=None if args.val_per_class is not None else args.val_fraction,
                val_per_class=args.val_per_class, seed=args.seed,
            )
            index = options.scan(args.root)  # scan before creating anything: a bad folder fails fast

            def build(tmp: Path) -> None:
                write_folder_shards(args.root, tmp, options, workers=args.workers, progress=progress, index=index)
        build_dir_atomically(out, build, overwrite=True)  # an existing `out` was refused above unless --overwrite
        print(_summary(out, read_manifest(out)))
        return 0
    except (FileNotFoundError, NotADirectoryError, PermissionError, FileExistsError, ValueError, ShardError) as err:
        return report_config_error(err)


if __name__ == "__main__":
    sys.exit(main())
