"""Writing and locating webdataset shards: image shards, token shards and their `manifest.json`.

A shard directory holds `{split}-{index:06d}.tar` files and one `manifest.json`:

```
{"format": "lightning-mim-shards", "version": 1, "kind": "image" | "tokens",
 "class_names": [...], "num_classes": C, ...kind-specific keys (resolution, encoding / grid_size, token_dtype),
 "splits": {"train": {"count": N, "class_counts": [n_0, ..., n_{C-1}],
                      "shards": [{"name": "train-000000.tar", "count": 1000, "bytes": ..., "sha256": ...}],
                      "content_sha256": ..., "num_skipped": k, "skipped": [{"path": ..., "error": ...}]}}}
```

`content_sha256` hashes what the samples *are* (keys, labels, pixels or tokens, encoding settings), not
the tar bytes, so it survives a different zlib; the data fingerprint is built from it. The manifest is
written last (after the shards of a split), and a split is removed from it before its shards are
rewritten, so a reader never trusts a half-written split. Whole datasets built by this package
(digits, image-folder caches, the prepare CLI) are written into a temporary directory that is renamed
into place only when complete (`build_dir_atomically`).

Samples inside a tar: `{key}.png|jpg` (encoded image), `{key}.cls` (decimal label), optional
`{key}.json` (provenance); token shards: `{key}.tokens` (raw little-endian uint16, or int32 when the
codebook has more than 65536 entries; shape and dtype in the manifest) and `{key}.cls`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from lightning_mim.locks import pid_alive

MANIFEST = "manifest.json"
FORMAT = "lightning-mim-shards"
VERSION = 1
ENCODINGS = ("png", "jpg")
TOKEN_EXT = "tokens"
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")  # webdataset splits file names at the first dot


class ShardError(RuntimeError):
    """A shard directory is missing, incomplete or does not match its manifest."""


# ----------------------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodedImage:
    """An image already encoded for a shard (lets a process pool do the expensive part)."""

    data: bytes
    ext: str  # "png" | "jpg"
    digest: str  # sha256 of shape + pixels + encoding settings: the content, not the bytes


def _as_uint8_rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"images must be (H, W, 3) or (H, W) uint8, got shape {array.shape}")
    return np.ascontiguousarray(array)


def encode_image(image: np.ndarray | Image.Image, encoding: str = "png", quality: int = 95) -> EncodedImage:
    """Encode an (H, W, 3) uint8 array or PIL image as PNG (lossless) or JPEG (`quality`)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding '{encoding}'; valid: {', '.join(ENCODINGS)}")
    array = _as_uint8_rgb(image)
    buffer = io.BytesIO()
    if encoding == "png":
        Image.fromarray(array).save(buffer, format="PNG")
        settings = "png"
    else:
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"jpg quality must be in [1, 100], got {quality}")
        Image.fromarray(array).save(buffer, format="JPEG", quality=int(quality))
        settings = f"jpg{int(quality)}"
    digest = hashlib.sha256(f"{array.shape}|{settings}|".encode() + array.tobytes()).hexdigest()
    return EncodedImage(buffer.getvalue(), encoding, digest)


# ------------------------------------------------------------------------------------------ writing


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through (one read saved)."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _SplitWriter:
    """Writes one split as `{split}-{index:06d}.tar` shards of `shard_size` samples each.

    Plain `tarfile` in webdataset's layout (`{key}.{ext}` members, in sample order): the same as
    `webdataset.TarWriter(encoder=False)`, without importing torch into a pure writing process.
    """

    def __init__(self, out_dir: Path, split: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if not _KEY_RE.match(split):
            raise ValueError(f"split names may use letters, digits, '_' and '-' only, got '{split}'")
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.shards: list[dict[str, Any]] = []
        self.labels: dict[int, int] = {}
        self.content = hashlib.sha256()
        self.count = 0
        self._file: _HashingFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0
        self._seen_keys: set[str] = set()

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._file = _HashingFile(self.out_dir / name)
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "count": 0})
        self._in_shard = 0

    def _add(self, name: str, data: bytes) -> None:
        # fixed mtime / owner / mode: the same samples give the same tar bytes
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "lmim", "lmim"
        self._tar.addfile(info, io.BytesIO(data))

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        self.shards[-1].update(count=self._in_shard, bytes=self._file.bytes, sha256=self._file.sha256.hexdigest())
        self._tar = self._file = None

    def write(self, key: str, entries: dict[str, bytes], label: int, digest: str) -> None:
        if not _KEY_RE.match(key):
            raise ValueError(f"sample key '{key}' may only use letters, digits, '_' and '-' (no dots)")
        if key in self._seen_keys:
            raise ValueError(f"duplicate sample key '{key}' in split '{self.split}'")
        self._seen_keys.add(key)
        label = int(label)
        if label < 0:
            raise ValueError(f"labels must be >= 0, got {label} for '{key}'")
        if self._tar is None or self._in_shard >= self.shard_size:
            self._close_shard()
            self._open()
        for ext, data in {**entries, "cls": str(label).encode()}.items():
            self._add(f"{key}.{ext}", bytes(data))
        self._in_shard += 1
        self.count += 1
        self.labels[label] = self.labels.get(label, 0) + 1
        self.content.update(f"{key}|{label}|{digest}\n".encode())

    def finish(self, num_classes: int) -> dict[str, Any]:
        self._close_shard()
        if self.labels and max(self.labels) >= num_classes:
            raise ValueError(f"label {max(self.labels)} >= num_classes {num_classes} in split '{self.split}'")
        return {
            "count": self.count,
            "class_counts": [self.labels.get(c, 0) for c in range(num_classes)],
            "shards": self.shards,
            "content_sha256": self.content.hexdigest(),
        }

    def abort(self) -> None:
        if self._tar is not None:
            try:
                self._tar.close()
            finally:
                self._file.close()


def progress_bar(enabled: bool = True):
    """A rich progress bar (disabled: draws nothing) for the shard writers and the prepare CLI."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _run_split(
    out_dir: Path,
    split: str,
    items: Iterable[tuple[str, dict[str, bytes], int, str]],
    *,
    shard_size: int,
    num_classes_hint: int | None,
    progress: bool,
    total: int | None,
) -> tuple[dict[str, Any], int]:
    """Write a split's shards; returns (its manifest entry, number of classes seen or hinted)."""
    writer = _SplitWriter(out_dir, split, shard_size)
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task(f"{split} shards", total=total)
            for key, entries, label, digest in items:
                writer.write(key, entries, label, digest)
                bar.advance(task)
    except BaseException:
        writer.abort()
        raise
    observed = (max(writer.labels) + 1) if writer.labels else 0
    num_classes = max(num_classes_hint or 0, observed)
    return writer.finish(num_classes), num_classes


def _remove_split(out_dir: Path, split: str) -> dict[str, Any] | None:
    """Drop `split` from the manifest first, then its old shard files (never a stale listing)."""
    manifest = None
    path = out_dir / MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text())
        if split in manifest.get("splits", {}):
            del manifest["splits"][split]
            _write_manifest(out_dir, manifest)
    for old in out_dir.glob(f"{split}-*.tar"):
        if re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar", old.name):
            old.unlink()
    return manifest


def _write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = out_dir / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out_dir / MANIFEST)


def _merge_manifest(
    existing: dict[str, Any] | None, kind: str, top: dict[str, Any], split: str, entry: dict[str, Any]
) -> dict[str, Any]:
    manifest = existing or {"format": FORMAT, "version": VERSION, "kind": kind, "splits": {}}
    if manifest.get("kind") != kind:
        raise ShardError(f"directory holds '{manifest.get('kind')}' shards; cannot add '{kind}' shards to it")
    for key in ("grid_size", "token_dtype", "encoding", "resolution"):
        if key in top and key in manifest and manifest[key] != top[key] and manifest["splits"]:
            raise ShardError(f"split '{split}' has {key}={top[key]!r} but the other splits have {manifest[key]!r}")
    manifest.update(top)
    num_classes = max(int(manifest.get("num_classes") or 0), len(entry["class_counts"]))
    manifest["num_classes"] = num_classes
    for other in manifest["splits"].values():  # keep every class_counts list num_classes long
        other["class_counts"] += [0] * (num_classes - len(other["class_counts"]))
    entry["class_counts"] += [0] * (num_classes - len(entry["class_counts"]))
    splits = dict(manifest.pop("splits"))
    splits[split] = entry
    manifest["splits"] = splits  # keep "splits" as the last key: easy to read
    return manifest


def write_image_shards(
    out_dir: str | os.PathLike,
    split: str,
    samples: Iterable[tuple],
    *,
    shard_size: int = 1000,
    encoding: str = "png",
    quality: int = 95,
    class_names: Sequence[str] | None = None,
    resolution: int | None = None,
    skipped: list[dict] | None = None,
    extra_manifest: dict[str, Any] | None = None,
    progress: bool = False,
    total: int | None = None,
) -> dict[str, Any]:
    """Write `(key, image, label)` or `(key, image, label, meta)` samples of one split as image shards.

    `image` is an (H, W, 3) / (H, W) uint8 array, a PIL image or an `EncodedImage` (already encoded,
    e.g. by a process pool); `meta`, a JSON-able dict, is stored as `{key}.json` (provenance). `skipped`
    is a list the caller may fill while `samples` is consumed (unreadable source files); it goes into
    the manifest after the last sample. Returns the updated manifest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = _remove_split(out, split)

    def items() -> Iterator[tuple[str, dict[str, bytes], int, str]]:
        for key, image, label, *meta in samples:
            encoded = image if isinstance(image, EncodedImage) else encode_image(image, encoding, quality)
            if encoded.ext != encoding:
                raise ValueError(f"sample '{key}' is encoded as {encoded.ext}, the split as {encoding}")
            entries = {encoded.ext: encoded.data}
            if meta and meta[0] is not None:
                entries["json"] = json.dumps(meta[0], sort_keys=True).encode()
            yield key, entries, label, encoded.digest

    hint = len(class_names) if class_names is not None else None
    entry, num_classes = _run_split(
        out, split, items(), shard_size=shard_size, num_classes_hint=hint, progress=progress, total=total
    )
    if class_names is not None and num_classes > len(class_names):
        raise ValueError(f"label {num_classes - 1} has no name in class_names ({len(class_names)} names)")
    skipped = list(skipped or [])
    entry["num_skipped"] = len(skipped)
    entry["skipped"] = skipped
    top: dict[str, Any] = {
        "encoding": encoding,
        "quality": int(quality) if encoding == "jpg" else None,
        "resolution": resolution,
    }
    if class_names is not None:
        top["class_names"] = list(class_names)
    top.update(extra_manifest or {})
    manifest = _merge_manifest(existing, "image", top, split, entry)
    _write_manifest(out, manifest)
    return manifest


def token_dtype_for(codebook_size: int | None) -> np.dtype:
    """uint16 holds codes < 65536; bigger codebooks use int32."""
    if codebook_size is not None and int(codebook_size) > 65536:
        return np.dtype("<i4")
    return np.dtype("<u2")


def write_token_shards(
    out_dir: str | os.PathLike,
    split: str,
    samples: Iterable[tuple[str, np.ndarray, int]],
    shard_size: int = 1000,
    extra_manifest: dict[str, Any] | None = None,
    *,
    progress: bool = False,
    total: int | None = None,
) -> dict[str, Any]:
    """Write `(key, tokens (h, w) integer array, label)` samples of one split; returns the manifest.

    Tokens are stored as raw little-endian uint16 (int32 if `extra_manifest["codebook_size"]` > 65536)
    under the extension `tokens`; `grid_size` [h, w] and `token_dtype` go into the manifest with
    everything in `extra_manifest` (tokenizer checksum, codebook_size, num_classes, class_names, ...).
    Every sample of a directory must have the same grid.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(extra_manifest or {})
    dtype = token_dtype_for(extra.get("codebook_size"))
    limit = np.iinfo(dtype).max if extra.get("codebook_size") is None else int(extra["codebook_size"]) - 1
    existing = _remove_split(out, split)
    grid: list[int] = []

    def items() -> Iterator[tuple[str, dict[str, bytes], int, str]]:
        for key, tokens, label in samples:
            array = np.asarray(tokens)
            if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
                raise ValueError(f"tokens of '{key}' must be a 2-D integer array (h, w), got {array.dtype} {array.shape}")
            if not grid:
                grid.extend(array.shape)
            elif list(array.shape) != grid:
                raise ValueError(f"tokens of '{key}' have grid {array.shape}, earlier samples {tuple(grid)}")
            if array.size and (array.min() < 0 or array.max() > limit):
                raise ValueError(
                    f"tokens of '{key}' outside [0, {limit}] (min {array.min()}, max {array.max()}); "
                    "pass extra_manifest={'codebook_size': K} for codebooks larger than 65536"
                )
            data = array.astype(dtype).tobytes()
            yield key, {TOKEN_EXT: data}, label, hashlib.sha256(data).hexdigest()

    hint = extra.get("num_classes")
    entry, _ = _run_split(out, split, items(), shard_size=shard_size, num_classes_hint=hint, progress=progress, total=total)
    top = {"token_dtype": dtype.str, **extra, "grid_size": grid or (existing or {}).get("grid_size")}
    manifest = _merge_manifest(existing, "tokens", top, split, entry)
    _write_manifest(out, manifest)
    return manifest


# ------------------------------------------------------------------------------------------ reading


def _is_remote(url: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", url)) and not url.startswith("file:")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a shard directory (or a `manifest.json` path / `pipe:` / URL webdataset opens)."""
    text_path = str(path)
    if _is_remote(text_path):
        from webdataset.gopen import gopen

        with gopen(text_path, "rb") as stream:
            manifest = json.loads(stream.read())
    else:
        local = Path(text_path.removeprefix("file:"))
        if not local.exists():
            raise FileNotFoundError(f"shard directory or manifest not found: {local}")
        file = local / MANIFEST if local.is_dir() else local
        if not file.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST} in {local}: not a shard directory, or it was never completely written (rebuild it)"
            )
        manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} manifest")
    if int(manifest.get("version", 0)) > VERSION:
        raise ShardError(f"{path}: manifest version {manifest['version']} is newer than this code ({VERSION})")
    return manifest


def _split_entry(manifest: dict[str, Any], split: str, where: Any) -> dict[str, Any]:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ShardError(f"{where} has no split '{split}'; it has: {', '.join(splits) or 'none'}")
    return splits[split]


def shard_paths(directory: str | os.PathLike, split: str) -> list[Path]:
    """The shard files of a split as listed in the directory's manifest."""
    directory = Path(directory)
    entry = _split_entry(read_manifest(directory), split, directory)
    return [directory / shard["name"] for shard in entry["shards"]]


def shard_urls(directory: str | os.PathLike, split: str) -> str:
    """A brace pattern over a split's shards: `/abs/dir/train-{000000..000031}.tar`."""
    directory = Path(directory).resolve()
    entry = _split_entry(read_manifest(directory), split, directory)
    names = [shard["name"] for shard in entry["shards"]]
    if not names:
        raise ShardError(f"split '{split}' of {directory} has no shards (0 samples)")
    if len(names) == 1:
        return str(directory / names[0])
    expected = [f"{split}-{i:06d}.tar" for i in range(len(names))]
    if names != expected:
        return "::".join(str(directory / n) for n in names)  # webdataset also accepts '::'-joined lists
    return str(directory / f"{split}-{{{0:06d}..{len(names) - 1:06d}}}.tar")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace patterns and '::'-joined lists to the list of shard URLs (as webdataset reads them)."""
    from webdataset.shardlists import expand_urls as wds_expand

    if isinstance(urls, str):
        return wds_expand(urls)
    out: list[str] = []
    for url in urls:
        out.extend(wds_expand(url))
    return out


def check_local_shards(urls: str | Sequence[str]) -> list[str]:
    """Expand `urls`; raise FileNotFoundError naming the missing local files. Returns the list.

    Remote URLs (`pipe:`, `http:`, `s3:` ...) are not checked: webdataset opens them when read.
    """
    expanded = expand_urls(urls)
    if not expanded:
        raise FileNotFoundError(f"no shards in '{urls}'")
    missing = [u for u in expanded if not _is_remote(u) and not Path(u.removeprefix("file:")).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(expanded)})" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard file not found: {missing[0]}{more}; from '{urls}'")
    return expanded


def manifest_for_urls(urls: str | Sequence[str]) -> dict[str, Any] | None:
    """The manifest beside local shards (None for remote URLs or when there is none)."""
    expanded = expand_urls(urls)
    if not expanded or _is_remote(expanded[0]):
        return None
    file = Path(expanded[0].removeprefix("file:")).parent / MANIFEST
    return read_manifest(file) if file.is_file() else None


def check_shards(directory: str | os.PathLike, *, checksums: bool = False) -> dict[str, Any]:
    """Check that every shard the manifest lists exists with its size (and sha256 if `checksums`).

    Returns the manifest; raises ShardError listing the problems.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            path = directory / shard["name"]
            if not path.is_file():
                problems.append(f"{shard['name']}: missing")
            elif path.stat().st_size != shard["bytes"]:
                problems.append(f"{shard['name']}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
            elif checksums and _sha256_file(path) != shard["sha256"]:
                problems.append(f"{shard['name']}: sha256 mismatch")
    if problems:
        raise ShardError(f"{directory}: " + "; ".join(problems))
    return manifest


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_complete(directory: str | os.PathLike) -> bool:
    """True when `directory` has a manifest and every shard it lists, at the listed size."""
    try:
        check_shards(directory)
        return True
    except (FileNotFoundError, ShardError, ValueError, KeyError):
        return False


# ------------------------------------------------------------------------- building a dataset once

_TMP_PREFIX = ".tmp-"


def _stale_tmp_dirs(parent: Path, name: str) -> Iterator[Path]:
    """Temporary build dirs of `name` whose writer died (this host, pid gone).

    Leftovers of writers on other hosts are kept: we cannot tell whether they are still running.
    """
    host = socket.gethostname()
    for path in parent.glob(f"{_TMP_PREFIX}{name}-*"):
        if re.fullmatch(rf"{re.escape(_TMP_PREFIX + name)}-trash-[0-9a-f]{{8}}", path.name):
            yield path  # an incomplete directory moved aside; its remover died
            continue
        match = re.fullmatch(rf"{re.escape(_TMP_PREFIX + name)}-(.+)-(\d+)-[0-9a-f]{{8}}", path.name)
        if match is None:
            continue
        if match.group(1) == host and not pid_alive(int(match.group(2))):
            yield path


def build_dir_atomically(
    final: str | os.PathLike,
    build: Callable[[Path], Any],
    *,
    complete: Callable[[Path], bool] = is_complete,
    overwrite: bool = False,
) -> Path:
    """Make `final` by `build(tmp_dir)` + atomic rename, unless it is already complete.

    A killed build leaves only a `.tmp-*` sibling (removed by the next call), never a half-written
    `final`; an incomplete `final` (no manifest, missing or truncated shards) is rebuilt. When two
    processes race, one rename wins and the other discards its copy.
    """
    final = Path(final)
    if complete(final) and not overwrite:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_tmp_dirs(final.parent, final.name):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f"{_TMP_PREFIX}{final.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        if not complete(tmp):
            raise ShardError(f"building {final} produced an incomplete directory")
        if final.exists() and (overwrite or not complete(final)):
            trash = final.parent / f"{_TMP_PREFIX}{final.name}-trash-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if complete(final):  # another process finished first: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
