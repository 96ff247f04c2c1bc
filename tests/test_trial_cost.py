"""What makes a sweep trial cheaper without changing its numbers: the token memo (a frozen tokenizer's
codes remembered by image content) and a grid sweep's final-evaluation-only trials."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_mim.callbacks import GenerationMetrics, Pictures
from lightning_mim.data import ImageDataModule
from lightning_mim.modules.maskgit import MaskGITModule
from lightning_mim.modules.token_memo import TokenMemo
from lightning_mim.orchestration.config import compose
from lightning_mim.orchestration.sweep import final_evaluation_only
from lightning_mim.orchestration.sweep_spec import parse
from test_maskgit_module import TINY_TRANSFORMER, make
from _fakes import SyntheticImageDataModule

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py



def _module() -> MaskGITModule:
    """test_maskgit_module's tiny MaskGIT, on 16 px images of 4 classes, with dropout (a random draw per step)."""
    return make(transformer={**TINY_TRANSFORMER, "dropout": 0.1, "attn_dropout": 0.1}, num_classes=4, image_size=16)


class CountingEncoder:
    def __init__(self, encode):
        self.encode, self.images = encode, 0

    def __call__(self, images):
        self.images += len(images)
        return self.encode(images)


def test_memo_returns_the_encoders_codes_and_encodes_each_image_once():
    torch.manual_seed(0)
    tokenizer = _module().tokenizer
    images = torch.rand(10, 3, 16, 16)
    encoder, memo = CountingEncoder(tokenizer.encode_to_indices), TokenMemo()
    expected = tokenizer.encode_to_indices(images)
    assert torch.equal(memo(images[:6], encoder), expected[:6])
    # a batch of 2 seen and 4 new images, in shuffled order: only the new ones are encoded
    order = torch.tensor([7, 1, 9, 3, 6, 8])
    assert torch.equal(memo(images[order], encoder), expected[order])
    assert encoder.images == 10 and (memo.hits, memo.misses) == (2, 10) and len(memo) == 10
    assert torch.equal(memo(images.flip(0), encoder), expected.flip(0))  # all hits
    assert encoder.images == 10 and memo.hits == 12
    # a changed pixel is another image
    other = images[:1].clone()
    other[0, 0, 0, 0] += 1e-3
    memo(other, encoder)
    assert encoder.images == 11


def test_memo_is_bounded_and_cpu_only():
    encode = CountingEncoder(lambda x: x.flatten(1)[:, :3].round().long())
    memo = TokenMemo(max_entries=3)
    images = torch.rand(5, 3, 2, 2) * 4
    assert torch.equal(memo(images, encode), images.flatten(1)[:, :3].round().long())
    assert len(memo) == 3  # the rest were encoded but not remembered
    memo(images, encode)
    assert encode.images == 5 + 2
    with pytest.raises(ValueError, match="max_entries must be >= 1"):
        TokenMemo(max_entries=0)
    with pytest.raises(ValueError, match="CPU tensors"):
        memo(torch.empty(1, 3, 2, 2, device="meta"), encode)


def test_image_datamodules_say_when_training_images_repeat():
    assert ImageDataModule("x.tar", train_augment=False).deterministic_train_images
    assert not ImageDataModule("x.tar").deterministic_train_images  # the papers' crop + flip
    assert not ImageDataModule("x.tar", train_augment={"random_resized_crop": False, "hflip": True}).deterministic_train_images


def _fit(quiet_trainer, *, deterministic: bool, callbacks=(), steps: int = 8) -> MaskGITModule:
    pl.seed_everything(0, verbose=False)
    module = _module()
    datamodule = SyntheticImageDataModule(num_classes=4, image_size=16, train_per_class=8, val_per_class=4, batch_size=8)
    datamodule.deterministic_train_images = deterministic  # the synthetic set never augments
    trainer = quiet_trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=1, callbacks=list(callbacks))
    trainer.fit(module, datamodule=datamodule)
    return module


def test_training_with_the_memo_gives_the_same_weights(quiet_trainer):
    remembered = _fit(quiet_trainer, deterministic=True)
    plain = _fit(quiet_trainer, deterministic=False)
    assert plain.token_memo is None
    # 2 epochs of 4 batches of 8, one val batch of 8 in the sanity check and after each epoch: only the
    # first epoch and the sanity check run the tokenizer
    assert len(remembered.token_memo) == 32 + 8 and remembered.token_memo.hits == 32 + 2 * 8
    for (name, a), b in zip(remembered.transformer.state_dict().items(), plain.transformer.state_dict().values()):
        assert torch.equal(a, b), name


def test_sweep_trials_skip_only_the_intermediate_evaluations():
    cfg = compose([])
    overrides = final_evaluation_only(cfg)
    assert "callbacks.generation_metrics.every_n_steps=null" in overrides
    assert "callbacks.pictures.every_n_steps=null" in overrides
    after = compose(overrides)
    assert after.callbacks.pictures.at_train_end and after.callbacks.generation_metrics.every_n_steps is None
    assert parse(["schedule=cosine,linear"]).keeps_intermediate_evals() is False  # a grid: no pruner reads them
    assert parse(["model.optim.lr=interval(1e-4,1e-2)", "sweep.n_trials=4"]).keeps_intermediate_evals()  # median pruner
    assert parse(["schedule=cosine,linear", "sweep.intermediate_evals=true"]).keeps_intermediate_evals()


def test_skipping_intermediate_evaluations_changes_no_weight(quiet_trainer, tmp_path):
    """Evaluations and pictures draw from their own generators: a run that evaluates every 2 steps ends
    with the same weights as one that evaluates only at its end (what a grid sweep's trials do)."""

    def evaluations(every):
        return [
            GenerationMetrics(extractors=["domain"], num_samples=8, batch_size=8, every_n_epochs=None, every_n_steps=every,
                              cache_dir=tmp_path / "cache", domain_classifier={"epochs": 2}, progress=False),
            Pictures(every_n_epochs=None, every_n_steps=every, out_dir=tmp_path / f"pictures-{every}", per_class=1,
                     num_uncond=2, progression_samples=1, num_reconstructions=2),
        ]

    often = _fit(quiet_trainer, deterministic=True, callbacks=evaluations(2), steps=6)
    once = _fit(quiet_trainer, deterministic=True, callbacks=evaluations(None), steps=6)
    for (name, a), b in zip(often.transformer.state_dict().items(), once.transformer.state_dict().values()):
        assert torch.equal(a, b), name
