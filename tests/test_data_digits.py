"""The embedded digits: content, split, caching, and rebuilding a half-written cache."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_mim.data import DigitsShardOptions, ensure_digits_shards, read_manifest, shard_urls
from lightning_mim.data.digits import digits_arrays
from lightning_mim.data.pipeline import iter_image_samples
from lightning_mim.data.shards import is_complete


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    return ensure_digits_shards(tmp_path_factory.mktemp("cache"), progress=False)


def test_split_counts_and_manifest(digits_dir):
    manifest = read_manifest(digits_dir)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    per_class = np.bincount(load_digits().target)  # 178 182 177 183 181 182 181 179 174 180
    assert val["count"] == 200 and val["class_counts"] == [20] * 10
    assert train["count"] == 1597 and train["class_counts"] == (per_class - 20).tolist()
    assert len(val["shards"]) == 4 and len(train["shards"]) == 32  # shard_size 50
    assert manifest["num_classes"] == 10 and manifest["class_names"] == [str(i) for i in range(10)]
    assert manifest["resolution"] == 32 and manifest["encoding"] == "png"
    assert digits_dir.name == DigitsShardOptions(resolution=32).dir_name


def test_shards_hold_the_source_pixels_bit_exact(digits_dir):
    images, labels = digits_arrays(32)
    indices, read, read_labels = [], [], []
    for split in ("train", "val"):
        for key, x, y in iter_image_samples(shard_urls(digits_dir, split)):
            indices.append(int(key.removeprefix("digit_")))
            read.append(x)
            read_labels.append(y)
    assert sorted(indices) == list(range(1797))  # train and val are disjoint and cover the dataset
    assert read_labels == labels[indices].tolist()
    pixels = (torch.stack(read) * 255).round().to(torch.uint8)
    assert torch.equal(pixels, torch.from_numpy(images[indices]).permute(0, 3, 1, 2))


def test_native_resolution_is_the_raw_data_scaled_to_uint8(tmp_path):
    images, labels = digits_arrays(8)
    raw = load_digits()
    assert images.shape == (1797, 8, 8, 3) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], np.round(raw.images * 255 / 16).astype(np.uint8))
    assert np.array_equal(images[..., 0], images[..., 2])
    assert images.max() == 255 and images.min() == 0
    assert np.array_equal(labels, raw.target)
    big, _ = digits_arrays(32)
    assert big.shape == (1797, 32, 32, 3)
    with pytest.raises(ValueError, match="valid: nearest, bilinear, bicubic"):
        digits_arrays(32, "cubic")


def test_split_is_deterministic_per_seed(tmp_path):
    first = ensure_digits_shards(tmp_path / "a", DigitsShardOptions(resolution=8), progress=False)
    again = ensure_digits_shards(tmp_path / "b", DigitsShardOptions(resolution=8), progress=False)
    other = ensure_digits_shards(tmp_path / "b", DigitsShardOptions(resolution=8, seed=1), progress=False)
    assert other != again
    ref = read_manifest(first)["splits"]["val"]
    assert read_manifest(again)["splits"]["val"]["content_sha256"] == ref["content_sha256"]
    assert read_manifest(again)["splits"]["val"]["shards"] == ref["shards"]  # identical bytes too
    assert read_manifest(other)["splits"]["val"]["content_sha256"] != ref["content_sha256"]


def test_second_call_reuses_the_cache(tmp_path):
    first = ensure_digits_shards(tmp_path, DigitsShardOptions(resolution=8), progress=False)
    stamp = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert ensure_digits_shards(tmp_path, DigitsShardOptions(resolution=8), progress=False) == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamp


def test_damaged_cache_is_rebuilt_not_read(tmp_path):
    first = ensure_digits_shards(tmp_path, DigitsShardOptions(resolution=8), progress=False)
    shard = first / "train-000003.tar"
    shard.write_bytes(shard.read_bytes()[:5000])  # truncated after the manifest was written
    assert not is_complete(first)
    assert ensure_digits_shards(tmp_path, DigitsShardOptions(resolution=8), progress=False) == first
    assert is_complete(first) and len(list(iter_image_samples(str(shard)))) == 50

    (first / "manifest.json").unlink()  # e.g. copied without its manifest
    for extra in first.glob("val-*.tar"):
        extra.unlink()
    ensure_digits_shards(tmp_path, DigitsShardOptions(resolution=8), progress=False)
    assert read_manifest(first)["splits"]["val"]["count"] == 200


def test_process_killed_mid_write_leaves_nothing_readable_and_is_rebuilt(tmp_path):
    # A child process writes the cache and SIGKILLs itself right after the 3rd shard is complete.
    script = textwrap.dedent(
        f"""
        import os, signal
        import lightning_mim.data.shards as shards
        original = shards._SplitWriter._close_shard
        def close_then_die(self):
            original(self)
            if len(self.shards) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        shards._SplitWriter._close_shard = close_then_die
        from lightning_mim.data.digits import DigitsShardOptions, ensure_digits_shards
        ensure_digits_shards({str(tmp_path)!r}, DigitsShardOptions(resolution=8), progress=False)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    final = tmp_path / DigitsShardOptions(resolution=8).dir_name
    assert not final.exists()  # never visible half-written
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and len(list(leftovers[0].glob("train-*.tar"))) >= 3
    assert not (leftovers[0] / "manifest.json").exists()

    assert ensure_digits_shards(tmp_path, DigitsShardOptions(resolution=8), progress=False) == final
    assert is_complete(final) and read_manifest(final)["splits"]["train"]["count"] == 1597
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # the dead writer's temp dir is gone
