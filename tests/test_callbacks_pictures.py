"""Pictures: grid layouts (rows = classes / steps / original+reconstruction), PNG files, MLflow images."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_mim.callbacks import Pictures
from lightning_mim.callbacks.pictures import (
    class_grid,
    grid_to_pil,
    pick_classes,
    progression_grid,
    reconstruction_grid,
    supported_kinds,
)
from _fakes import FakeGenerator, SyntheticImageDataModule

S, PAD = 16, 2  # image size of the fakes, make_grid padding


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _size(rows: int, cols: int) -> tuple[int, int, int]:
    return (3, rows * (S + PAD) + PAD, cols * (S + PAD) + PAD)


def _cell(grid: torch.Tensor, row: int, col: int) -> torch.Tensor:
    top, left = PAD + row * (S + PAD), PAD + col * (S + PAD)
    return grid[:, top : top + S, left : left + S]


def test_class_grid_has_one_row_per_class():
    module = FakeGenerator(noise=0.0)
    grid = class_grid(module, [0, 1, 2, 3], per_class=3)
    assert grid.shape == _size(4, 3)
    for c in range(4):  # the fake draws class c as a block in cell c: the row's images are class c
        expected = module.generate(torch.tensor([c]))[0]
        for j in range(3):
            assert torch.allclose(_cell(grid, c, j), expected)


def test_progression_has_one_row_per_step_then_the_final_images():
    module = FakeGenerator(steps=5)
    grid = progression_grid(module, torch.tensor([0, 1, 2]), 3, generator=torch.Generator().manual_seed(0))
    assert grid.shape == _size(5 + 1, 3)
    grid3 = progression_grid(module, torch.tensor([0, 1, 2]), 3, steps=3)
    assert grid3.shape == _size(3 + 1, 3)  # decode overrides reach generate()
    # the first step is mostly grey (unrevealed), the last row is the final image
    assert (_cell(grid, 0, 0)[..., -4:] == 0.5).all()


def test_reconstruction_grid_puts_originals_above_reconstructions():
    module = FakeGenerator()
    images = torch.rand(4, 3, S, S)
    grid = reconstruction_grid(module.reconstruct, images)
    assert grid.shape == _size(2, 4)
    assert torch.allclose(_cell(grid, 0, 1), images[1])
    assert torch.allclose(_cell(grid, 1, 1), module.reconstruct(images)[1])


def test_pick_classes_and_supported_kinds():
    assert pick_classes(4, 10) == [0, 1, 2, 3]
    picked = pick_classes(1000, 10)
    assert len(picked) == 10 and picked[0] == 0 and picked[-1] == 999
    assert supported_kinds(FakeGenerator()) == ["class_grid", "progression", "reconstructions"]
    assert supported_kinds(FakeGenerator(num_classes=0)) == ["uncond_grid", "progression", "reconstructions"]
    with pytest.raises(ValueError, match="valid: "):
        Pictures(kinds=["movie"])


def test_grid_to_pil_rounds_like_the_metrics():
    grid = torch.full((3, 2, 2), 0.5)
    assert np.asarray(grid_to_pil(grid)).tolist() == [[[128] * 3] * 2] * 2


def _fit(quiet_trainer, logger, **kw) -> Pictures:
    kw.setdefault("at_train_end", False)
    callback = Pictures(per_class=2, progression_samples=3, num_reconstructions=4, **kw)
    trainer = quiet_trainer(
        accelerator="cpu", max_epochs=2, limit_train_batches=2, logger=logger, callbacks=[callback], num_sanity_val_steps=0
    )
    trainer.fit(FakeGenerator(steps=4), datamodule=SyntheticImageDataModule())
    return callback


LAYOUTS = (("class_grid", 4, 2), ("progression", 4 + 1, 3), ("reconstructions", 2, 4))


def test_fit_writes_pngs_with_the_grid_layouts(tmp_path, quiet_trainer):
    callback = _fit(quiet_trainer, False, at_train_end=True)
    assert len(callback.saved) == 2 * 3  # the end-of-training draw at step 4 is not repeated
    out = tmp_path / "pictures"  # default: default_root_dir/pictures
    for kind, rows, cols in LAYOUTS:
        files = sorted((out / kind).glob("*.png"))
        assert [f.name for f in files] == ["step_0000002.png", "step_0000004.png"], kind
        with Image.open(files[0]) as im:
            assert im.mode == "RGB" and im.size == (_size(rows, cols)[2], _size(rows, cols)[1]), kind


def test_mlflow_logger_gets_log_image_with_key_and_step(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger.__new__(MLFlowLogger)  # no tracking store needed: experiment/run_id are mocked
    callback = Pictures(per_class=2, progression_samples=3, num_reconstructions=4, out_dir=tmp_path / "pics")
    module = FakeGenerator()
    callback.setup(SimpleNamespace(default_root_dir=tmp_path), module, "fit")
    trainer = SimpleNamespace(global_rank=0, global_step=7, datamodule=SyntheticImageDataModule(), loggers=[logger])
    with (
        mock.patch.object(MLFlowLogger, "experiment", new_callable=mock.PropertyMock) as experiment,
        mock.patch.object(MLFlowLogger, "run_id", new_callable=mock.PropertyMock, return_value="run-1"),
    ):
        callback._emit(trainer, module)
    calls = experiment.return_value.log_image.call_args_list
    assert sorted((c.kwargs["key"], c.kwargs["step"]) for c in calls) == sorted((k, 7) for k, _, _ in LAYOUTS)
    assert all(c.args[0] == "run-1" and isinstance(c.args[1], Image.Image) for c in calls)
    # a non-zero rank draws nothing
    callback._emit(SimpleNamespace(**{**vars(trainer), "global_rank": 1, "global_step": 8}), module)
    assert not list((tmp_path / "pics").rglob("step_0000008.png"))


@pytest.mark.slow  # creating a fresh MLflow SQLite store runs its migrations: 10-40 s on a loaded machine
def test_real_mlflow_store_gets_a_stepped_image_series(tmp_path, quiet_trainer):
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(experiment_name="pictures", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"))
    _fit(quiet_trainer, logger)
    names = [a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(logger.run_id, "images")]
    for kind, _, _ in LAYOUTS:  # stored as images/<key>+step+<step>+timestamp+...png (MLflow 3.x)
        steps = sorted(
            {int(n.split("+step+")[1].split("+")[0]) for n in names if f"/{kind}+step+" in n and n.endswith(".png")}
        )
        assert steps == [2, 4], (kind, names)


def test_explicit_unsupported_kind_fails_at_setup(quiet_trainer):
    class NoReconstruct(FakeGenerator):
        reconstruct = None

    trainer = quiet_trainer(max_steps=1, callbacks=[Pictures(kinds=["reconstructions"])])
    with pytest.raises(ValueError, match="reconstructions"):
        trainer.fit(NoReconstruct(), datamodule=SyntheticImageDataModule())
