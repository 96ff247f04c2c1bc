"""`python -m lightning_mim.tokenize`: image shards -> token shards for `TokenDataModule` (stage 2 fast path).

    python -m lightning_mim.tokenize --shards DIR_OR_PATTERN --tokenizer CKPT --out DIR \
        [--copies K] [--batch-size 64] [--device auto] [--split train] [--image-size S]

- `--shards`: an image-shard directory (every split of its manifest is tokenized) or a shard pattern /
  URL (`/data/train-{000000..000099}.tar`; then `--split` names the output split, default `train`).
- `--tokenizer`: our TokenizerModule checkpoint, a stage-2 checkpoint or the official MAGE/MaskGIT file
  (`checkpoints.vqgan.load_vqgan`).
- `--copies K` (K >= 1): copy 0 of every image is the plain image (resize + centre crop, key unchanged);
  copies 1..K-1 of the *train* split are RandomResizedCrop(scale 0.2-1) + flip augmentations (the papers'
  training augmentation; keys `{key}-aug{j}`; `--scale LO HI`, `--no-hflip`). Other splits always get
  one plain copy.

The manifest records the tokenizer checkpoint's sha256 (`tokenizer.sha256`). Token shards are tied to the
exact tokenizer weights: writing into a directory made with another tokenizer is refused, and readers call
`check_token_manifest(dir, ckpt)` to make sure they never mix tokens of different tokenizers.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_mim.orchestration.config import ArgumentParser, ConfigError, checkpoint_file, report_config_error

AUG_SCALE = (0.2, 1.0)  # MAGE main_pretrain / MaskGIT: RandomResizedCrop(scale 0.2-1) + horizontal flip
AUG_RATIO = (3 / 4, 4 / 3)


class TokenizerMismatchError(ValueError):
    """Token shards were written by a different tokenizer than the one in use."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_token_manifest(directory: str | Path, tokenizer_ckpt: str | Path) -> dict[str, Any]:
    """The token-shard manifest of `directory`, after checking it was written with `tokenizer_ckpt`.

    Raises TokenizerMismatchError (naming both checksums and the command to regenerate) otherwise.
    """
    from lightning_mim.data.shards import read_manifest

    manifest = read_manifest(directory)
    if manifest.get("kind") != "tokens":
        raise TokenizerMismatchError(f"{directory} holds '{manifest.get('kind')}' shards, not token shards")
    recorded = (manifest.get("tokenizer") or {}).get("sha256")
    actual = sha256_file(tokenizer_ckpt)
    if recorded != actual:
        raise TokenizerMismatchError(
            f"token shards in {directory} were written with tokenizer sha256 {recorded} "
            f"({(manifest.get('tokenizer') or {}).get('path')}), but {tokenizer_ckpt} has sha256 {actual}: "
            f"re-tokenize with `python -m lightning_mim.tokenize --tokenizer {tokenizer_ckpt} --out NEW_DIR ...`"
        )
    return manifest


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _sources(shards: str, split: str | None) -> tuple[list[tuple[str, str, int | None]], dict[str, Any] | None]:
    """[(split, urls, count)] and the image manifest (None when the shards have none)."""
    from lightning_mim.data.shards import manifest_for_urls, read_manifest, shard_urls

    path = Path(shards).expanduser()
    if path.is_dir():
        manifest = read_manifest(path)
        if manifest.get("kind") != "image":
            raise ValueError(f"{path} holds '{manifest.get('kind')}' shards; --shards needs image shards")
        names = [split] if split else list(manifest["splits"])
        missing = [s for s in names if s not in manifest["splits"]]
        if missing:
            raise ValueError(f"{path} has no split {missing}; it has: {', '.join(manifest['splits'])}")
        return [(s, shard_urls(path, s), manifest["splits"][s].get("count")) for s in names], manifest
    manifest = manifest_for_urls(shards)
    return [(split or "train", shards, None)], manifest


def _augmenter(image_size: int, scale: tuple[float, float], hflip: bool):
    from torchvision.transforms import InterpolationMode, v2

    steps = [v2.RandomResizedCrop(image_size, scale=scale, ratio=AUG_RATIO, interpolation=InterpolationMode.BICUBIC,
                                  antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    return v2.Compose(steps)


def _with_copies(
    samples: Iterable[tuple[str, Tensor, int]], copies: int, image_size: int, scale: tuple[float, float], hflip: bool
) -> Iterator[tuple[str, Tensor, int]]:
    augment = _augmenter(image_size, scale, hflip) if copies > 1 else None
    for key, image, label in samples:
        yield key, image, label
        for j in range(1, copies):
            yield f"{key}-aug{j}", augment(image).clamp_(0.0, 1.0), label


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode(model, samples: Iterable[tuple[str, Tensor, int]], batch_size: int, device: torch.device) -> Iterator[tuple[str, np.ndarray, int]]:
    for batch in _batched(samples, batch_size):
        images = torch.stack([image for _, image, _ in batch]).to(device)
        with torch.inference_mode():
            tokens = model.encode_to_indices(images).cpu().numpy()
        for (key, _, label), grid in zip(batch, tokens):
            yield key, grid, label


def _prepare_out_dir(out: Path, sha: str, overwrite: bool) -> None:
    """Refuse to add tokens of one tokenizer to a directory holding another's (unless overwriting)."""
    from lightning_mim.data.shards import MANIFEST, read_manifest

    if not (out / MANIFEST).is_file():
        return
    existing = read_manifest(out)
    recorded = (existing.get("tokenizer") or {}).get("sha256")
    if existing.get("kind") == "tokens" and recorded == sha:
        return  # same tokenizer: splits are rewritten in place
    if not overwrite:
        raise TokenizerMismatchError(
            f"{out} already holds {existing.get('kind')} shards written with tokenizer sha256 {recorded}; "
            f"this tokenizer is {sha}. Use another --out or pass --overwrite to replace them."
        )
    (out / MANIFEST).unlink()
    for tar in out.glob("*.tar"):
        tar.unlink()


def tokenize_shards(
    shards: str,
    tokenizer_ckpt: str | Path,
    out_dir: str | Path,
    *,
    copies: int = 1,
    batch_size: int = 64,
    device: str = "auto",
    split: str | None = None,
    image_size: int | None = None,
    shard_size: int = 1000,
    seed: int = 0,
    scale: Sequence[float] = AUG_SCALE,
    hflip: bool = True,
    overwrite: bool = False,
    weights_only: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize every requested split of `shards` into `out_dir`; returns the token manifest.

    `scale` / `hflip` configure the augmented copies (digits: a flipped digit is another glyph, use
    hflip=False and a mild scale such as (0.8, 1.0)).
    """
    from lightning_mim.checkpoints.vqgan import load_vqgan
    from lightning_mim.data.pipeline import iter_image_samples
    from lightning_mim.data.shards import write_token_shards

    if copies < 1:
        raise ValueError(f"--copies must be >= 1, got {copies}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    scale = (float(scale[0]), float(scale[1]))
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"--scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    ckpt = Path(tokenizer_ckpt).expanduser()
    sha = sha256_file(ckpt)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _prepare_out_dir(out, sha, overwrite)

    dev = _resolve_device(device)
    model = load_vqgan(ckpt, weights_only=weights_only).to(dev).eval()
    sources, image_manifest = _sources(shards, split)
    size = image_size or (image_manifest or {}).get("resolution")
    if size is None:  # no manifest: the first image decides
        _, first, _ = next(iter_image_samples(sources[0][1]))
        size = int(first.shape[-1])
    size = int(size)
    grid = model.grid_size(size)  # also checks divisibility by the downsample factor

    extra: dict[str, Any] = {
        "codebook_size": model.codebook_size,
        "image_size": size,
        "tokenizer": {
            "sha256": sha,
            "path": str(ckpt.resolve()),
            "codebook_size": model.codebook_size,
            "downsample_factor": model.downsample_factor,
            "arch": model.config,
        },
        "source_shards": str(shards),
        "copies": int(copies),
        "augmented_splits": ["train"] if copies > 1 else [],
        "augment": {"random_resized_crop": {"scale": list(scale), "ratio": list(AUG_RATIO)}, "hflip": bool(hflip),
                    "seed": int(seed)} if copies > 1 else None,
    }
    if image_manifest is not None:
        for key in ("num_classes", "class_names"):
            if image_manifest.get(key) is not None:
                extra[key] = image_manifest[key]
        extra["source_content_sha256"] = {
            s: e.get("content_sha256") for s, e in image_manifest.get("splits", {}).items()
        }

    manifest: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, urls, count in sources:
            k = copies if name == "train" else 1
            samples = iter_image_samples(urls, image_size=size)
            encoded = _encode(model, _with_copies(samples, k, size, scale, hflip), batch_size, dev)
            manifest = write_token_shards(out, name, encoded, shard_size=shard_size, extra_manifest=extra,
                                          progress=progress, total=None if count is None else count * k)
            if manifest.get("grid_size") and list(manifest["grid_size"]) != [grid, grid]:
                raise RuntimeError(f"wrote grid {manifest['grid_size']}, expected {[grid, grid]}")
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m lightning_mim.tokenize",
        description="Encode image shards into token shards (with the tokenizer checkpoint's sha256 in the manifest).",
    )
    p.add_argument("--shards", required=True, help="image-shard directory (all splits) or shard pattern/URL")
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (ours, stage-2 or official)")
    p.add_argument("--out", required=True, help="output directory for token shards + manifest.json")
    p.add_argument("--copies", type=int, default=1, help="copies per train image: 1 plain + K-1 augmented (default 1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--split", default=None, help="only this split (directory input) / output split name (pattern input)")
    p.add_argument("--image-size", type=int, default=None, help="resize + centre crop to this size (default: shard resolution)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per token shard")
    p.add_argument("--seed", type=int, default=0, help="augmentation seed")
    p.add_argument("--scale", type=float, nargs=2, default=list(AUG_SCALE), metavar=("LO", "HI"),
                   help="RandomResizedCrop area range of the augmented copies (default 0.2 1.0)")
    p.add_argument("--no-hflip", action="store_true", help="no horizontal flips in the augmented copies")
    p.add_argument("--overwrite", action="store_true", help="replace shards of another tokenizer in --out")
    p.add_argument("--no-weights-only", action="store_true", help="allow pickled objects in a trusted checkpoint")
    p.add_argument("--no-progress", action="store_true")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Every argument, before the tokenizer is loaded or a shard read: ConfigError naming the first
    bad one (`--copies=0: must be >= 1`)."""
    for name in ("copies", "batch_size", "shard_size", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={value}: must be >= 1")
    low, high = args.scale
    if not 0 < low <= high <= 1:
        raise ConfigError(f"--scale={low} {high}: must be LO HI with 0 < LO <= HI <= 1")
    if args.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", args.device):
        raise ConfigError(f"--device={args.device}: must be auto, cpu, cuda, cuda:N or mps")
    shards = str(args.shards)
    if "://" not in shards and "{" not in shards and not Path(shards).expanduser().exists():
        raise ConfigError(f"--shards={shards}: no such image-shard directory or file")
    checkpoint_file("--tokenizer", args.tokenizer)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        manifest = tokenize_shards(
            args.shards, args.tokenizer, args.out, copies=args.copies, batch_size=args.batch_size, device=args.device,
            split=args.split, image_size=args.image_size, shard_size=args.shard_size, seed=args.seed,
            scale=args.scale, hflip=not args.no_hflip,
            overwrite=args.overwrite, weights_only=not args.no_weights_only, progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
        return report_config_error(err)
    counts = {s: e["count"] for s, e in manifest["splits"].items()}
    print(f"wrote token shards to {args.out}: {counts}, grid {manifest['grid_size']}, "
          f"tokenizer sha256 {manifest['tokenizer']['sha256'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
