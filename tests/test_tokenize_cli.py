"""`python -m lightning_mim.tokenize`: token shards round-trip, augmented copies, tokenizer checksum guard."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_mim.checkpoints.vqgan import build_vqgan
from lightning_mim.data.pipeline import iter_image_samples
from lightning_mim.data.shards import read_manifest, shard_urls, write_image_shards
from lightning_mim.orchestration.tokenize import TokenizerMismatchError, check_token_manifest, main, sha256_file, tokenize_shards

ARCH = dict(base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1, codebook_size=32, code_dim=4, norm_groups=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def image_shards(tmp_path) -> Path:
    """Two splits of random 16x16 RGB images in 3 classes, small shards."""
    rng = np.random.default_rng(0)
    out = tmp_path / "images"
    for split, n in (("train", 10), ("val", 6)):
        samples = [(f"{split}_{i:03d}", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), i % 3) for i in range(n)]
        write_image_shards(out, split, samples, shard_size=4, class_names=["a", "b", "c"], resolution=16)
    return out


def _save_tokenizer(path: Path, seed: int) -> Path:
    """A TokenizerModule-style checkpoint (what Lightning writes: hyper_parameters + vqgan.* state)."""
    torch.manual_seed(seed)
    vq = build_vqgan(ARCH)
    torch.save({"hyper_parameters": {"vqgan": ARCH}, "state_dict": {f"vqgan.{k}": v for k, v in vq.state_dict().items()}}, path)
    return path


def _read_tokens(directory: Path, split: str) -> dict[str, tuple[np.ndarray, int]]:
    manifest = read_manifest(directory)
    h, w = manifest["grid_size"]
    out = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(directory / shard["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext == "tokens":
                tokens = np.frombuffer(data, dtype=np.dtype(manifest["token_dtype"])).reshape(h, w)
                out[key] = (tokens, int(members[f"{key}.cls"]))
    return out


def test_token_shards_round_trip_to_the_tokenizers_encoding(tmp_path, image_shards):
    ckpt = _save_tokenizer(tmp_path / "tok.ckpt", seed=0)
    out = tmp_path / "tokens"
    assert main(["--shards", str(image_shards), "--tokenizer", str(ckpt), "--out", str(out), "--batch-size", "4",
                 "--shard-size", "3", "--device", "cpu", "--no-progress"]) == 0

    manifest = check_token_manifest(out, ckpt)
    assert manifest["tokenizer"]["sha256"] == sha256_file(ckpt)
    assert manifest["grid_size"] == [8, 8] and manifest["codebook_size"] == 32 and manifest["image_size"] == 16
    assert manifest["num_classes"] == 3 and manifest["class_names"] == ["a", "b", "c"]
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 10, "val": 6}

    from lightning_mim.checkpoints.vqgan import load_vqgan

    model = load_vqgan(ckpt)
    for split in ("train", "val"):
        stored = _read_tokens(out, split)
        keys, images, labels = zip(*iter_image_samples(shard_urls(image_shards, split)))
        expected = model.encode_to_indices(torch.stack(images)).numpy()
        assert sorted(stored) == sorted(keys)
        for key, grid, label in zip(keys, expected, labels):
            assert np.array_equal(stored[key][0], grid) and stored[key][1] == label

    from lightning_mim.data import TokenDataModule

    dm = TokenDataModule(data_dir=out, batch_size=4, val_batch_size=6)
    dm.setup("fit")
    tokens, labels = next(iter(dm.val_dataloader()))
    assert tokens.shape == (6, 64) and tokens.dtype == torch.int64 and dm.codebook_size == 32 and dm.num_classes == 3


def test_augmented_copies_for_train_only(tmp_path, image_shards):
    ckpt = _save_tokenizer(tmp_path / "tok.ckpt", seed=0)
    out = tmp_path / "tokens"
    manifest = tokenize_shards(str(image_shards), ckpt, out, copies=3, batch_size=5, device="cpu", progress=False)
    assert manifest["splits"]["train"]["count"] == 30 and manifest["splits"]["val"]["count"] == 6
    assert manifest["copies"] == 3 and manifest["augmented_splits"] == ["train"]
    train = _read_tokens(out, "train")
    assert {k for k in train if "-aug" in k} == {f"train_{i:03d}-aug{j}" for i in range(10) for j in (1, 2)}
    # copy 0 is the plain image: identical to a copies=1 run
    ref = tokenize_shards(str(image_shards), ckpt, tmp_path / "ref", copies=1, device="cpu", progress=False, split="train")
    ref_tokens = _read_tokens(tmp_path / "ref", "train")
    assert ref["splits"]["train"]["count"] == 10
    for key, (grid, label) in ref_tokens.items():
        assert np.array_equal(train[key][0], grid) and train[key][1] == label
    # augmentations differ from the plain copy for most images, and are seeded
    differs = sum(not np.array_equal(train[f"{k}-aug1"][0], ref_tokens[k][0]) for k in ref_tokens)
    assert differs >= 5
    again = tokenize_shards(str(image_shards), ckpt, tmp_path / "again", copies=3, device="cpu", progress=False, split="train")
    assert again["splits"]["train"]["content_sha256"] == manifest["splits"]["train"]["content_sha256"]


def test_manifest_mismatch_is_a_clear_error(tmp_path, image_shards, capsys):
    ckpt = _save_tokenizer(tmp_path / "tok.ckpt", seed=0)
    other = _save_tokenizer(tmp_path / "other.ckpt", seed=1)
    out = tmp_path / "tokens"
    tokenize_shards(str(image_shards), ckpt, out, device="cpu", progress=False, split="val")
    with pytest.raises(TokenizerMismatchError, match=rf"sha256 {sha256_file(ckpt)} .* but .*other.ckpt has sha256 {sha256_file(other)}"):
        check_token_manifest(out, other)
    # writing another tokenizer's tokens into the same directory is refused (no mixing) ...
    code = main(["--shards", str(image_shards), "--tokenizer", str(other), "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert check_token_manifest(out, ckpt)["splits"]["val"]["count"] == 6  # untouched
    # ... unless asked to replace them
    tokenize_shards(str(image_shards), other, out, device="cpu", progress=False, split="val", overwrite=True)
    assert check_token_manifest(out, other)["splits"].keys() == {"val"}
    with pytest.raises(TokenizerMismatchError):
        check_token_manifest(out, ckpt)


def test_shard_pattern_input_and_bad_arguments(tmp_path, image_shards, capsys):
    ckpt = _save_tokenizer(tmp_path / "tok.ckpt", seed=0)
    out = tmp_path / "tokens"
    pattern = shard_urls(image_shards, "val")
    manifest = tokenize_shards(pattern, ckpt, out, split="holdout", device="cpu", progress=False)
    assert manifest["splits"]["holdout"]["count"] == 6
    mild = tokenize_shards(str(image_shards), ckpt, tmp_path / "mild", copies=2, scale=(0.8, 1.0), hflip=False,
                           device="cpu", progress=False, split="train")
    assert mild["augment"]["hflip"] is False and mild["augment"]["random_resized_crop"]["scale"] == [0.8, 1.0]
    with pytest.raises(ValueError, match="--scale must satisfy"):
        tokenize_shards(str(image_shards), ckpt, out, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="--copies must be >= 1"):
        tokenize_shards(str(image_shards), ckpt, out, copies=0)
    with pytest.raises(ValueError, match="not divisible by the downsample factor"):
        tokenize_shards(str(image_shards), ckpt, tmp_path / "t2", image_size=15, device="cpu", progress=False)
    assert main(["--shards", str(image_shards), "--tokenizer", str(ckpt), "--out", str(out), "--split", "test"]) == 2
    assert "no split ['test']" in capsys.readouterr().err
