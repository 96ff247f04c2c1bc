"""Callback: sample grids, decoding progressions and tokenizer reconstructions as PNGs (+ MLflow images).

Kinds of picture:
- `class_grid`: one row per class (up to `max_classes`, evenly spaced over the classes), `per_class` samples each.
- `uncond_grid`: `num_uncond` unconditional samples.
- `progression`: one row per decoding step (still-masked tokens drawn by the module, grey), then a
  last row with the final images (MaskGIT's output is the last step's samples, see docs/FIDELITY.md).
- `reconstructions`: the first val images (top row) above the tokenizer's reconstructions (row below).
Files go to `out_dir/<kind>/step_<global step>.png` (default `default_root_dir/pictures`), so they
exist without MLflow; with an `MLFlowLogger` each kind is also a stepped image series (`key=kind`).
Only rank 0 draws; the same seed every time, so successive pictures show the model, not the noise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from lightning_mim.callbacks._cadence import EvalCadence, training_rng_untouched, why_no_generation
from lightning_mim.eval.distributed import device_of
from lightning_mim.eval.images import to_uint8

KINDS = ("class_grid", "uncond_grid", "progression", "reconstructions")


# -- pure picture builders ------------------------------------------------------------------------


def grid_to_pil(grid: Tensor) -> Image.Image:
    """A (3, H, W) float grid in [0, 1] -> RGB PIL image (rounded to uint8 like the metrics)."""
    return Image.fromarray(to_uint8(grid).permute(1, 2, 0).cpu().numpy())


def pick_classes(num_classes: int, max_classes: int) -> list[int]:
    """All classes, or `max_classes` of them evenly spaced (ImageNet: 0, 100, 200, ...)."""
    if num_classes <= max_classes:
        return list(range(num_classes))
    return np.linspace(0, num_classes - 1, max_classes).round().astype(int).tolist()


@torch.no_grad()
def class_grid(module: Any, classes: Sequence[int], per_class: int, *, generator=None, **overrides) -> Tensor:
    labels = torch.tensor(list(classes), device=device_of(module)).repeat_interleave(per_class)
    images = module.generate(labels, generator=generator, **overrides)
    return make_grid(images.float().cpu(), nrow=per_class, padding=2, pad_value=1.0)


@torch.no_grad()
def uncond_grid(module: Any, num: int, *, generator=None, **overrides) -> Tensor:
    images = module.generate(None, num, generator=generator, **overrides)
    return make_grid(images.float().cpu(), nrow=int(np.ceil(np.sqrt(num))), padding=2, pad_value=1.0)


@torch.no_grad()
def progression_grid(module: Any, labels: Tensor | None, num: int, *, generator=None, **overrides) -> Tensor:
    """Rows: decoding steps 1..T, then the final images; columns: samples."""
    images, steps = module.generate(labels, num, generator=generator, return_steps=True, **overrides)
    rows = [s.float().cpu() for s in steps] + [images.float().cpu()]
    return make_grid(torch.cat(rows), nrow=images.shape[0], padding=2, pad_value=1.0)


@torch.no_grad()
def reconstruction_grid(reconstruct: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """Originals in the top row, their reconstructions in the row below."""
    recon = reconstruct(images)
    return make_grid(
        torch.cat([images.float().cpu(), recon.float().cpu()]), nrow=images.shape[0], padding=2, pad_value=1.0
    )


def find_reconstruct(module: Any) -> Callable[[Tensor], Tensor] | None:
    """`module.reconstruct` (tokenizer module) or `module.tokenizer.reconstruct` (stage 2), else None."""
    for owner in (module, getattr(module, "tokenizer", None)):
        fn = getattr(owner, "reconstruct", None)
        if callable(fn):
            return fn
    return None


def supported_kinds(module: Any) -> list[str]:
    kinds = []
    if why_no_generation(module) is None:
        kinds.append("class_grid" if int(getattr(module, "num_classes", 0) or 0) > 0 else "uncond_grid")
        kinds.append("progression")
    if find_reconstruct(module) is not None:
        kinds.append("reconstructions")
    return kinds


# -- callback ---------------------------------------------------------------------------------


class Pictures(pl.Callback):
    """Draw the picture `kinds` ("auto" = whatever the module supports) on the given schedule."""

    def __init__(
        self,
        *,
        kinds: str | Sequence[str] = "auto",
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        at_train_end: bool = True,
        on_test: bool = False,
        out_dir: str | os.PathLike | None = None,
        per_class: int = 8,
        max_classes: int = 10,
        num_uncond: int = 64,
        progression_samples: int = 8,
        num_reconstructions: int = 8,
        seed: int = 0,
        decode_overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if kinds != "auto":
            kinds = [kinds] if isinstance(kinds, str) else list(kinds)
            unknown = [k for k in kinds if k not in KINDS]
            if unknown:
                raise ValueError(f"unknown picture kinds {unknown}; valid: {list(KINDS)} or 'auto'")
        self.kinds = kinds
        self.cadence = EvalCadence(every_n_epochs, every_n_steps, at_end=False)  # at_train_end covers the end
        self.at_train_end = bool(at_train_end)
        self.on_test = bool(on_test)
        self.out_dir = out_dir
        self.per_class = int(per_class)
        self.max_classes = int(max_classes)
        self.num_uncond = int(num_uncond)
        self.progression_samples = int(progression_samples)
        self.num_reconstructions = int(num_reconstructions)
        self.seed = int(seed)
        self.decode_overrides = dict(decode_overrides or {})
        self.saved: list[Path] = []
        self._last_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        supported = supported_kinds(pl_module)
        if self.kinds == "auto":
            self.active = supported
            reason = why_no_generation(pl_module)
            if reason and callable(getattr(pl_module, "generate", None)):
                rank_zero_warn(f"Pictures draws no samples: {reason}; drawing {supported or 'nothing'}")
        else:
            missing = [k for k in self.kinds if k not in supported]
            if missing:
                raise ValueError(
                    f"picture kinds {missing} need a module with generate()/reconstruct(); "
                    f"this module supports {supported}"
                )
            self.active = list(self.kinds)
        if self.out_dir is None:
            self.out_dir = Path(trainer.default_root_dir) / "pictures"

    def _generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)

    def draw(self, pl_module: Any, datamodule: Any = None) -> dict[str, Tensor]:
        """{kind: (3, H, W) grid} for the active kinds (pure: no files, no logging; the training's
        random streams are left as they were)."""
        with training_rng_untouched(device_of(pl_module)):
            return self._draw(pl_module, datamodule)

    def _draw(self, pl_module: Any, datamodule: Any) -> dict[str, Tensor]:
        device = device_of(pl_module)
        grids: dict[str, Tensor] = {}
        was_training = pl_module.training
        pl_module.eval()
        try:
            num_classes = int(getattr(pl_module, "num_classes", 0) or 0)
            for kind in self.active:
                gen = self._generator(device)
                if kind == "class_grid":
                    classes = pick_classes(num_classes, self.max_classes)
                    grids[kind] = class_grid(pl_module, classes, self.per_class, generator=gen, **self.decode_overrides)
                elif kind == "uncond_grid":
                    grids[kind] = uncond_grid(pl_module, self.num_uncond, generator=gen, **self.decode_overrides)
                elif kind == "progression":
                    n = self.progression_samples
                    labels = None
                    if num_classes > 0:
                        labels = torch.tensor(pick_classes(num_classes, n), device=device)
                        n = len(labels)
                    grids[kind] = progression_grid(pl_module, labels, n, generator=gen, **self.decode_overrides)
                elif kind == "reconstructions" and datamodule is not None:
                    images = next(iter(datamodule.val_dataloader()))[0][: self.num_reconstructions].to(device)
                    grids[kind] = reconstruction_grid(find_reconstruct(pl_module), images)
        finally:
            pl_module.train(was_training)
        return grids

    def _emit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = int(trainer.global_step)
        if trainer.global_rank != 0 or step == self._last_step:  # e.g. a scheduled draw at the last step
            return
        self._last_step = step
        for kind, grid in self.draw(pl_module, trainer.datamodule).items():
            image = grid_to_pil(grid)
            path = Path(self.out_dir) / kind / f"step_{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            self.saved.append(path)
            for logger in trainer.loggers:
                if isinstance(logger, pl.loggers.MLFlowLogger):
                    logger.experiment.log_image(logger.run_id, image, key=kind, step=step)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cadence.at_validation_end(trainer):
            self._emit(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.cadence.at_train_batch_end(trainer):
            self._emit(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end:
            self._emit(trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_test:
            self._emit(trainer, pl_module)
