"""`python -m lightning_mim.data.prepare`: image folders -> shards, corrupt files, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_mim.data import ImageFolderDataModule, read_manifest, shard_urls
from lightning_mim.data.folder import load_image, scan_image_folder, stratified_split
from lightning_mim.data.pipeline import iter_image_samples
from lightning_mim.orchestration.prepare import main


def _save(path: Path, size: tuple[int, int], seed: int, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path) -> Path:
    """3 classes x 4 readable images (PNG and JPEG, several sizes) + 2 corrupt files + a stray .txt."""
    root = tmp_path / "images"
    for c, name in enumerate(["cat", "dog", "emu"]):
        for i in range(4):
            fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
            _save(root / name / f"img{i}.{ext}", (20 + 4 * i, 16 + 2 * c), seed=10 * c + i, fmt=fmt)
    good = (root / "cat" / "img0.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "emu" / "notes.jpg").write_text("this is not a jpeg")
    (root / "emu" / "readme.txt").write_text("ignored: not an image extension")
    return root


def test_prepare_writes_shards_and_lists_corrupt_files(folder, tmp_path, capsys):
    out = tmp_path / "shards"
    code = main(["imagefolder", str(folder), "--out", str(out), "--resolution", "12", "--val-per-class", "1",
                 "--shard-size", "4", "--no-progress"])
    assert code == 0
    manifest = read_manifest(out)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert manifest["class_names"] == ["cat", "dog", "emu"] and manifest["num_classes"] == 3
    # the split is drawn from the file list (1 file per class to val), before decoding: an unreadable
    # file is dropped from whichever split it fell into
    index = scan_image_folder(folder, val_per_class=1)
    val_files = {rel for rel, _ in index.splits["val"]}
    skipped = {item["path"]: split for split, entry in (("train", train), ("val", val)) for item in entry["skipped"]}
    assert set(skipped) == {"dog/truncated.png", "emu/notes.jpg"}
    assert all((split == "val") == (path in val_files) for path, split in skipped.items())
    assert train["num_skipped"] == len(train["skipped"]) and val["num_skipped"] == len(val["skipped"])
    assert val["count"] == 3 - val["num_skipped"] and train["count"] == 11 - train["num_skipped"]
    assert [a + b for a, b in zip(train["class_counts"], val["class_counts"])] == [4, 4, 4]
    assert manifest["resolution"] == 12 and manifest["crop"] is True
    text = capsys.readouterr().out
    assert f"train: {train['count']} images in" in text and "unreadable skipped" in text

    samples = list(iter_image_samples(shard_urls(out, "train")))
    assert len(samples) == train["count"] and all(x.shape == (3, 12, 12) for _, x, _ in samples)
    assert np.bincount([y for _, _, y in samples], minlength=3).tolist() == train["class_counts"]
    assert main(["verify", str(out)]) == 0


def test_stored_pixels_are_the_resized_centre_crop(folder, tmp_path):
    out = tmp_path / "shards"
    assert main(["imagefolder", str(folder), "--out", str(out), "--resolution", "10", "--no-progress"]) == 0
    dm = ImageFolderDataModule(folder, tmp_path / "unused", image_size=10)
    paths = {}
    import tarfile
    import json

    for shard in sorted(out.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            for name in names:
                if name.endswith(".json"):
                    paths[name[:-5]] = json.loads(tar.extractfile(name).read())["path"]
    read = {key: x for key, x, _ in iter_image_samples(shard_urls(out, "train"))}
    for key, rel in paths.items():
        expected = torch.from_numpy(load_image(folder / rel, 10).copy())  # PNG stores what load_image made
        assert torch.equal((read[key] * 255).round().to(torch.uint8), expected.permute(2, 0, 1))
    assert dm.image_size == 10


def test_load_image_resize_and_crop(tmp_path):
    _save(tmp_path / "wide.png", (40, 20), seed=0)
    assert load_image(tmp_path / "wide.png").shape == (20, 40, 3)
    assert load_image(tmp_path / "wide.png", 10).shape == (10, 10, 3)
    assert load_image(tmp_path / "wide.png", 10, crop=False).shape == (10, 20, 3)
    full = load_image(tmp_path / "wide.png", 20)  # shorter side already 20: pure centre crop
    assert np.array_equal(full, load_image(tmp_path / "wide.png")[:, 10:30])


def test_workers_give_identical_shards(folder, tmp_path):
    for name, workers in (("serial", "0"), ("pool", "2")):
        assert main(["imagefolder", str(folder), "--out", str(tmp_path / name), "--resolution", "8",
                     "--workers", workers, "--no-progress"]) == 0
    a, b = read_manifest(tmp_path / "serial"), read_manifest(tmp_path / "pool")
    for split in ("train", "val"):
        assert a["splits"][split]["shards"] == b["splits"][split]["shards"]  # names, counts, sha256


def test_split_layout_and_jpg_encoding(tmp_path):
    root = tmp_path / "ds"
    for split, n in (("train", 3), ("val", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _save(root / split / c / f"{i}.png", (16, 16), seed=i)
    index = scan_image_folder(root)
    assert index.layout == "split" and index.class_names == ["a", "b"]
    assert len(index.splits["train"]) == 6 and len(index.splits["val"]) == 4
    out = tmp_path / "out"
    assert main(["imagefolder", str(root), "--out", str(out), "--resolution", "16", "--encoding", "jpg",
                 "--quality", "90", "--no-progress"]) == 0
    manifest = read_manifest(out)
    assert manifest["encoding"] == "jpg" and manifest["quality"] == 90
    assert manifest["splits"]["val"]["count"] == 4 and manifest["source"]["layout"] == "split"
    (root / "val" / "zebra").mkdir()
    with pytest.raises(ValueError, match="classes not in the train tree: zebra"):
        scan_image_folder(root)


def test_stratified_split_is_deterministic_and_balanced():
    labels = np.repeat(np.arange(4), 10)
    train, val = stratified_split(labels, val_fraction=0.2, seed=3)
    assert len(val) == 8 and np.bincount(labels[val]).tolist() == [2, 2, 2, 2]
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(40))
    again = stratified_split(labels, val_fraction=0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, stratified_split(labels, val_fraction=0.2, seed=4)[1])
    with pytest.raises(ValueError, match="cannot put 10 into val"):
        stratified_split(labels, val_per_class=10)


def test_clear_errors_for_bad_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["imagefolder", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert f"{tmp_path / 'empty'} is empty: no class sub-folders" in capsys.readouterr().err

    assert main(["imagefolder", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert f"image folder not found: {tmp_path / 'missing'}" in capsys.readouterr().err

    (tmp_path / "texts" / "a").mkdir(parents=True)
    (tmp_path / "texts" / "a" / "x.txt").write_text("no images here")
    assert main(["imagefolder", str(tmp_path / "texts"), "--out", str(tmp_path / "o")]) == 2
    assert "no image files" in capsys.readouterr().err

    (tmp_path / "broken" / "a").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "broken" / "a" / f"{i}.png").write_bytes(b"garbage")
    assert main(["imagefolder", str(tmp_path / "broken"), "--out", str(tmp_path / "o"), "--val-fraction", "0",
                 "--no-progress"]) == 2
    assert "none of the 3 train images" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".tmp-*"))

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("user data")
    assert main(["digits", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_digits_subcommand_and_verify_detects_damage(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["digits", "--out", str(out), "--resolution", "8", "--no-progress"]) == 0
    assert read_manifest(out)["splits"]["val"]["count"] == 200
    shard = out / "val-000002.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 2
    assert "val-000002.tar: sha256 mismatch" in capsys.readouterr().err


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_mim.data.prepare", "imagefolder", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "image folder not found" in result.stderr and "Traceback" not in result.stderr


def test_imagefolder_datamodule_builds_cache_once(folder, tmp_path):
    dm = ImageFolderDataModule(folder, tmp_path / "cache", image_size=8, val_per_class=1, batch_size=4, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 3
    (built,) = list((tmp_path / "cache").iterdir())
    counts = {s: e["count"] + e["num_skipped"] for s, e in dm.manifest["splits"].items()}
    assert counts == {"train": 11, "val": 3}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and y.dtype == torch.int64
    again = ImageFolderDataModule(folder, tmp_path / "cache", image_size=8, val_per_class=1, progress=False)
    again.prepare_data()
    assert list((tmp_path / "cache").iterdir()) == [built] and again.fingerprint == dm.fingerprint
    _save(folder / "cat" / "new.png", (20, 20), seed=99)  # a new file: a new cache entry
    ImageFolderDataModule(folder, tmp_path / "cache", image_size=8, val_per_class=1, progress=False).prepare_data()
    assert len(list((tmp_path / "cache").iterdir())) == 2
