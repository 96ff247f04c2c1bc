"""`conf/data/*.yaml` compose and instantiate (as train.py does) into working DataModules."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from lightning_mim.data import DigitsDataModule, ImageDataModule, ImageFolderDataModule, TokenDataModule
from lightning_mim.data import write_image_shards, write_token_shards

CONF = Path(__file__).resolve().parents[1] / "conf"


def _data_cfg(tmp_path: Path, option: str, overrides: list[str] = ()):
    """Compose only the data group under a minimal root that defines what it interpolates."""
    conf = tmp_path / "conf"
    if not conf.exists():
        shutil.copytree(CONF / "data", conf / "data")
        (conf / "root.yaml").write_text(
            f"defaults:\n  - data: digits\n  - _self_\nseed: 3\npaths:\n  cache_dir: {tmp_path / 'cache'}\n"
        )
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
            return compose("root", overrides=[f"data={option}", *overrides]).data
    finally:
        GlobalHydra.instance().clear()


def test_every_data_option_has_a_config():
    assert sorted(p.stem for p in (CONF / "data").glob("*.yaml")) == ["digits", "imagefolder", "imagenet_wds", "tokens"]


def test_digits_config(tmp_path):
    cfg = _data_cfg(tmp_path, "digits")
    assert cfg.cache_dir == f"{tmp_path / 'cache'}/digits" and cfg.image_size == 32 and cfg.num_classes == 10
    dm = instantiate(cfg, _convert_="all")
    assert isinstance(dm, DigitsDataModule) and dm.seed == 3
    assert dm.train_augment["random_resized_crop"] is False and dm.train_augment["hflip"] is False
    dm.prepare_data()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and y.dtype == torch.int64
    small = instantiate(_data_cfg(tmp_path, "digits", ["data.resolution=16"]), _convert_="all")
    assert small.image_size == 16


def test_imagefolder_config(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        for i in range(5):
            (tmp_path / "imgs" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((12, 14, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    cfg = _data_cfg(tmp_path, "imagefolder", [f"data.root={tmp_path / 'imgs'}", "data.num_classes=2", "data.image_size=8",
                                              "data.num_workers=0", "data.batch_size=4"])
    dm = instantiate(cfg, _convert_="all")
    assert isinstance(dm, ImageFolderDataModule) and dm.train_augment["scale"] == (0.2, 1.0)
    dm.prepare_data()
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and dm.num_classes == 2


def test_imagenet_wds_config_is_the_papers_setting(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 300, 280, 3), dtype=np.uint8)
    write_image_shards(tmp_path / "wds", "val", [(f"v{i}", images[i], i) for i in range(4)], encoding="jpg")
    defaults = _data_cfg(tmp_path, "imagenet_wds")
    assert defaults.num_workers == 8 and defaults.pin_memory and defaults.persistent_workers
    cfg = _data_cfg(tmp_path, "imagenet_wds", [f"data.data_dir={tmp_path / 'wds'}", "data.val_batch_size=2",
                                               "data.num_workers=0", "data.persistent_workers=false"])
    dm = instantiate(cfg, _convert_="all")
    assert isinstance(dm, ImageDataModule) and dm.image_size == 256 and dm.num_classes == 1000
    assert dm.train_augment == {"random_resized_crop": True, "scale": (0.2, 1.0), "ratio": (0.75, 4 / 3), "hflip": True}
    assert dm.interpolation == "bicubic"
    batches = list(dm.val_dataloader())
    assert [b[0].shape for b in batches] == [(2, 3, 256, 256)] * 2


def test_tokens_config(tmp_path):
    grids = np.random.default_rng(0).integers(0, 64, (6, 8, 8))
    for split in ("train", "val"):
        write_token_shards(tmp_path / "tok", split, [(f"k{i}", grids[i], i % 3) for i in range(6)], 4,
                           {"codebook_size": 64, "num_classes": 3, "image_size": 32})
    cfg = _data_cfg(tmp_path, "tokens", [f"data.data_dir={tmp_path / 'tok'}", "data.num_classes=3",
                                         "data.image_size=32", "data.batch_size=2"])
    dm = instantiate(cfg, _convert_="all")
    assert isinstance(dm, TokenDataModule)
    assert dm.grid_size == (8, 8) and dm.num_classes == 3 and dm.image_size == 32
    tokens, labels = next(iter(dm.train_dataloader()))
    assert tokens.shape == (2, 64) and tokens.dtype == torch.int64 and labels.dtype == torch.int64
    wrong = instantiate(_data_cfg(tmp_path, "tokens", [f"data.data_dir={tmp_path / 'tok'}", "data.num_classes=3",
                                                       "data.image_size=64"]), _convert_="all")
    with pytest.raises(ValueError, match="image_size=64 but the token shards encode 32px images"):
        wrong.image_size
