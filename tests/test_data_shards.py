"""Shard writer + manifest: bit-exact round trips, counts, checksums, atomic builds."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_mim.data import ImageDataModule, TokenDataModule, read_manifest, shard_urls, write_image_shards, write_token_shards
from lightning_mim.data.pipeline import iter_image_samples
from lightning_mim.data.shards import (
    ShardError,
    build_dir_atomically,
    check_local_shards,
    check_shards,
    encode_image,
    is_complete,
)


def _images(n: int, size: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 5, n)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_png_round_trip_is_bit_exact_and_manifest_counts_match(tmp_path):
    images, labels = _images(23)
    samples = [(f"s{i:03d}", images[i], int(labels[i])) for i in range(23)]
    manifest = write_image_shards(tmp_path, "val", samples, shard_size=10, class_names=list("abcde"), resolution=12)

    entry = manifest["splits"]["val"]
    assert entry["count"] == 23
    assert entry["class_counts"] == np.bincount(labels, minlength=5).tolist()
    assert [s["count"] for s in entry["shards"]] == [10, 10, 3]
    assert [s["name"] for s in entry["shards"]] == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    for shard in entry["shards"]:
        path = tmp_path / shard["name"]
        assert shard["sha256"] == _sha(path) and shard["bytes"] == path.stat().st_size
    assert manifest["num_classes"] == 5 and manifest["class_names"] == list("abcde")
    assert manifest["encoding"] == "png" and manifest["resolution"] == 12 and manifest["kind"] == "image"
    assert read_manifest(tmp_path) == manifest

    # through the keys-preserving reader ...
    read = {key: (x, y) for key, x, y in iter_image_samples(shard_urls(tmp_path, "val"))}
    assert sorted(read) == [k for k, _, _ in samples]
    for i, (key, image, label) in enumerate(samples):
        x, y = read[key]
        assert y == label
        assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(image).permute(2, 0, 1))
    # ... and through the DataModule's exact val pass (same order as written)
    dm = ImageDataModule(val_shards=shard_urls(tmp_path, "val"), image_size=12, batch_size=8)
    xs, ys = zip(*dm.val_dataloader())
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (23, 3, 12, 12)
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(y, torch.from_numpy(labels).long())
    assert dm.num_classes == 5


def test_jpg_encoding_is_close_and_recorded(tmp_path):
    # smooth image: JPEG at q=95 stays within a few levels
    ramp = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    image = np.stack([ramp, ramp.T, np.full_like(ramp, 128)], axis=2)
    manifest = write_image_shards(tmp_path, "train", [("a", image, 0)], encoding="jpg", quality=95)
    assert manifest["encoding"] == "jpg" and manifest["quality"] == 95
    assert (tmp_path / "train-000000.tar").is_file()
    ((_, x, _),) = list(iter_image_samples(str(tmp_path / "train-000000.tar")))
    error = (x * 255 - torch.from_numpy(image).permute(2, 0, 1).float()).abs().mean()
    assert error < 3.0
    with pytest.raises(ValueError, match="valid: png, jpg"):
        encode_image(image, "gif")


def test_same_samples_give_identical_shard_bytes(tmp_path):
    images, labels = _images(7)
    for name in ("a", "b"):
        write_image_shards(tmp_path / name, "train", [(f"k{i}", images[i], int(labels[i])) for i in range(7)])
    first, second = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert first["splits"]["train"]["shards"][0]["sha256"] == second["splits"]["train"]["shards"][0]["sha256"]
    assert first["splits"]["train"]["content_sha256"] == second["splits"]["train"]["content_sha256"]


def test_content_hash_tracks_pixels_labels_and_keys(tmp_path):
    images, labels = _images(5)
    base = [(f"k{i}", images[i], int(labels[i])) for i in range(5)]
    changed_pixel = images.copy()
    changed_pixel[2, 0, 0, 0] ^= 1
    variants = {
        "base": base,
        "pixel": [(k, changed_pixel[i], y) for i, (k, _, y) in enumerate(base)],
        "label": [(k, x, (y + 1) % 5) for k, x, y in base],
        "key": [(k + "x", x, y) for k, x, y in base],
    }
    hashes = {name: write_image_shards(tmp_path / name, "train", s)["splits"]["train"]["content_sha256"] for name, s in variants.items()}
    assert len(set(hashes.values())) == 4


def test_rewriting_a_split_replaces_its_shards_and_keeps_the_others(tmp_path):
    images, labels = _images(30)
    write_image_shards(tmp_path, "train", [(f"t{i}", images[i], int(labels[i])) for i in range(30)], shard_size=10)
    write_image_shards(tmp_path, "val", [(f"v{i}", images[i], int(labels[i])) for i in range(4)], shard_size=10)
    manifest = write_image_shards(tmp_path, "train", [(f"t{i}", images[i], int(labels[i])) for i in range(12)], shard_size=10)
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert manifest["splits"]["train"]["count"] == 12 and manifest["splits"]["val"]["count"] == 4
    assert list(manifest["splits"]) == ["val", "train"]
    check_shards(tmp_path, checksums=True)


def test_shard_urls_brace_pattern(tmp_path):
    images, labels = _images(25)
    write_image_shards(tmp_path, "train", [(f"t{i}", images[i], 0) for i in range(25)], shard_size=10)
    write_image_shards(tmp_path, "val", [(f"v{i}", images[i], 0) for i in range(3)], shard_size=10)
    assert shard_urls(tmp_path, "train") == f"{tmp_path.resolve()}/train-{{000000..000002}}.tar"
    assert shard_urls(tmp_path, "val") == f"{tmp_path.resolve()}/val-000000.tar"
    assert len(check_local_shards(shard_urls(tmp_path, "train"))) == 3
    with pytest.raises(ShardError, match="no split 'test'; it has: train, val"):
        shard_urls(tmp_path, "test")


def test_writer_rejects_bad_keys_and_labels(tmp_path):
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="no dots"):
        write_image_shards(tmp_path, "train", [("a.b", image, 0)])
    with pytest.raises(ValueError, match="duplicate sample key 'a'"):
        write_image_shards(tmp_path, "train", [("a", image, 0), ("a", image, 1)])
    with pytest.raises(ValueError, match="labels must be >= 0"):
        write_image_shards(tmp_path, "train", [("a", image, -1)])
    with pytest.raises(ValueError, match="no name in class_names"):
        write_image_shards(tmp_path, "train", [("a", image, 2)], class_names=["x", "y"])
    with pytest.raises(TypeError, match="uint8"):
        write_image_shards(tmp_path, "train", [("a", image.astype(np.float32), 0)])


def test_token_shards_round_trip_uint16(tmp_path):
    rng = np.random.default_rng(0)
    grids = rng.integers(0, 1024, (9, 4, 6))
    labels = rng.integers(0, 3, 9)
    extra = {"codebook_size": 1024, "num_classes": 3, "tokenizer_sha256": "abc"}
    manifest = write_token_shards(tmp_path, "train", [(f"k{i}", grids[i], int(labels[i])) for i in range(9)], 4, extra)
    write_token_shards(tmp_path, "val", [(f"v{i}", grids[i], int(labels[i])) for i in range(5)], 4, extra)
    manifest = read_manifest(tmp_path)
    assert manifest["kind"] == "tokens" and manifest["grid_size"] == [4, 6] and manifest["token_dtype"] == "<u2"
    assert manifest["tokenizer_sha256"] == "abc" and manifest["num_classes"] == 3
    assert manifest["splits"]["train"]["count"] == 9 and len(manifest["splits"]["train"]["shards"]) == 3
    # raw little-endian uint16, h*w values per sample
    import tarfile

    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        data = tar.extractfile("k0.tokens").read()
    assert data == grids[0].astype("<u2").tobytes()

    dm = TokenDataModule(data_dir=tmp_path, batch_size=2, val_batch_size=2)
    assert dm.grid_size == (4, 6) and dm.seq_len == 24 and dm.num_classes == 3 and dm.codebook_size == 1024
    tokens, ys = zip(*dm.val_dataloader())
    tokens, ys = torch.cat(tokens), torch.cat(ys)
    assert tokens.dtype == torch.int64 and tokens.shape == (5, 24)
    assert torch.equal(tokens, torch.from_numpy(grids[:5].reshape(5, 24)))
    assert torch.equal(ys, torch.from_numpy(labels[:5]).long())
    train = dm.train_dataloader()
    assert len(train) == 5  # ceil(9 / 2)
    batches = list(train)
    assert len(batches) == 5 and all(b[0].shape == (2, 24) and b[0].dtype == torch.int64 for b in batches)


def test_token_shards_use_int32_for_big_codebooks_and_validate(tmp_path):
    grid = np.full((2, 2), 70000)
    manifest = write_token_shards(tmp_path / "big", "train", [("a", grid, 0)], 10, {"codebook_size": 100000})
    assert manifest["token_dtype"] == "<i4"
    dm = TokenDataModule(val_shards=shard_urls(tmp_path / "big", "train"))
    ((tokens, _),) = list(dm.val_dataloader())
    assert tokens.tolist() == [[70000] * 4]
    with pytest.raises(ValueError, match="outside"):
        write_token_shards(tmp_path / "x", "train", [("a", np.full((2, 2), 1024), 0)], 10, {"codebook_size": 1024})
    with pytest.raises(ValueError, match="codebook_size"):
        write_token_shards(tmp_path / "y", "train", [("a", np.full((2, 2), 70000), 0)], 10, {})
    with pytest.raises(ValueError, match="2-D integer"):
        write_token_shards(tmp_path / "z", "train", [("a", np.zeros(4, int), 0)], 10, {})
    with pytest.raises(ValueError, match="grid"):
        write_token_shards(tmp_path / "w", "train", [("a", np.zeros((2, 2), int), 0), ("b", np.zeros((2, 3), int), 0)], 10, {})


def test_read_manifest_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        read_manifest(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train-000000.tar").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="never completely written"):
        read_manifest(tmp_path / "half")
    assert not is_complete(tmp_path / "half")


def test_check_shards_detects_truncation_and_corruption(tmp_path):
    images, labels = _images(12)
    write_image_shards(tmp_path, "train", [(f"t{i}", images[i], 0) for i in range(12)], shard_size=5)
    assert is_complete(tmp_path)
    shard = tmp_path / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert is_complete(tmp_path)  # same size: only the checksum sees it
    with pytest.raises(ShardError, match="train-000001.tar: sha256 mismatch"):
        check_shards(tmp_path, checksums=True)
    shard.write_bytes(bytes(data[:1000]))
    assert not is_complete(tmp_path)
    with pytest.raises(ShardError, match="train-000001.tar: 1000 bytes"):
        check_shards(tmp_path)


def _build_ok(tmp: Path) -> None:
    write_image_shards(tmp, "train", [("a", np.zeros((4, 4, 3), np.uint8), 0)])


def test_build_dir_atomically_never_leaves_a_half_written_dir(tmp_path):
    final = tmp_path / "ds"

    def failing(tmp: Path) -> None:
        _build_ok(tmp)
        raise KeyboardInterrupt  # killed mid-way (after shards, before returning)

    with pytest.raises(KeyboardInterrupt):
        build_dir_atomically(final, failing)
    assert not final.exists() and list(tmp_path.iterdir()) == []

    calls = []
    assert build_dir_atomically(final, lambda tmp: (calls.append(1), _build_ok(tmp))) == final
    assert build_dir_atomically(final, lambda tmp: calls.append(2)) == final  # complete: not rebuilt
    assert calls == [1] and is_complete(final)

    (final / "manifest.json").unlink()  # an incomplete dir is rebuilt, not read
    build_dir_atomically(final, lambda tmp: (calls.append(3), _build_ok(tmp)))
    assert calls == [1, 3] and is_complete(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_stale_temporary_dir_of_a_dead_writer_is_removed(tmp_path):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".tmp-ds-{socket.gethostname()}-{pid}-0123abcd"
    stale.mkdir()
    (stale / "train-000000.tar").write_bytes(b"partial")
    alive = tmp_path / f".tmp-ds-{socket.gethostname()}-{os.getpid()}-0123abcd"
    alive.mkdir()
    build_dir_atomically(tmp_path / "ds", _build_ok)
    assert not stale.exists() and alive.exists()
    json.loads((tmp_path / "ds" / "manifest.json").read_text())


def test_token_shards_and_manifest_through_pipe_urls(tmp_path):
    grids = np.arange(3 * 2 * 2).reshape(3, 2, 2)
    write_token_shards(tmp_path, "train", [(f"k{i}", grids[i], i) for i in range(3)], 2, {"codebook_size": 16})
    dm = TokenDataModule(
        val_shards=f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar", manifest=f"pipe:cat {tmp_path}/manifest.json"
    )
    assert dm.grid_size == (2, 2) and dm.num_classes == 3
    ((tokens, labels),) = list(dm.val_dataloader())
    assert tokens.tolist() == grids.reshape(3, 4).tolist() and labels.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="need their manifest"):
        TokenDataModule(val_shards=f"pipe:cat {tmp_path}/train-000000.tar").grid_size
