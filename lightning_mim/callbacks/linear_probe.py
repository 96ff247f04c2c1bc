"""Callback: how linearly separable the model's frozen features are (`val/probe_top1`, k-NN, few-shot).

Features come from `pl_module.encode_features(images) -> (B, D)` (MAGE: the unmasked encoder's
mean-pooled, normalised token outputs) on the train and val splits; the math is in
`lightning_mim.eval.probe`. Under DDP each rank encodes its share, the features are gathered
(torchmetrics `cat` states) and every rank trains the same probe from the same seed.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_mim.callbacks._cadence import EvalCadence, log_metrics, training_rng_untouched
from lightning_mim.data.pipeline import dist_info
from lightning_mim.eval.distributed import FeatureGather, all_gather_object
from lightning_mim.eval.loaders import shard_eval_loader, split_loader
from lightning_mim.eval.probe import OPTIMIZERS, fewshot_top1, knn_top1, train_linear_probe


@torch.no_grad()
def encode_split(module: Any, loader: Iterable, *, max_samples: int | None = None) -> tuple[Tensor, Tensor]:
    """(features (N, D), labels (N,)) of `module.encode_features` over `loader`, gathered over ranks."""
    _, world = dist_info(from_env=False)
    cap = None if max_samples is None else -(-int(max_samples) // world)
    device = module.device
    gather = FeatureGather().to(device)
    seen, dim = 0, None
    for images, labels in loader:
        if cap is not None:
            if seen >= cap:
                break
            images, labels = images[: cap - seen], labels[: cap - seen]
        feats = module.encode_features(images.to(device)).float()
        dim = feats.shape[1]
        gather.update(feats, feats.new_zeros(len(feats), 0), torch.as_tensor(labels).to(device))
        seen += len(feats)
    dims = [d for d in all_gather_object(dim) if d is not None]
    if not dims:
        raise ValueError("the loader yielded no batches")
    if seen == 0:  # a rank with no data still takes part in the sync, with the right shapes
        gather.update(
            torch.zeros(0, dims[0], device=device),
            torch.zeros(0, 0, device=device),
            torch.zeros(0, dtype=torch.long, device=device),
        )
    feats, _, labels = gather.compute()
    if max_samples is not None:
        feats, labels = feats[: int(max_samples)], labels[: int(max_samples)]
    return feats.cpu(), labels.cpu()


class LinearProbe(pl.Callback):
    """Linear probe (BatchNorm1d(affine=False) + Linear), weighted k-NN and few-shot top-1 on frozen features.

    Logs `{val,test}/probe_top1`, `/knn_top1`, `/fewshot{k}_top1` for k in `fewshot_shots`.
    """

    def __init__(
        self,
        *,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        on_test: bool = True,
        max_train_samples: int | None = 50_000,
        max_val_samples: int | None = None,
        epochs: int = 30,
        batch_size: int | None = 256,
        lr: float = 0.1,
        optimizer: str = "lbfgs",
        weight_decay: float = 5e-4,
        knn_k: int = 20,
        knn_temperature: float = 0.07,
        fewshot_shots: Sequence[int] = (5,),
        seed: int = 0,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; valid: {list(OPTIMIZERS)}")
        self.cadence = EvalCadence(every_n_epochs, every_n_steps)
        self.on_test = bool(on_test)
        self.max_train_samples = max_train_samples
        self.max_val_samples = max_val_samples
        self.probe_kwargs = dict(
            epochs=int(epochs),
            batch_size=batch_size,
            lr=float(lr),
            optimizer=optimizer,
            weight_decay=float(weight_decay),
        )
        self.knn_k = int(knn_k)
        self.knn_temperature = float(knn_temperature)
        self.fewshot_shots = [int(k) for k in fewshot_shots]
        self.seed = int(seed)
        self.last_metrics: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "encode_features", None)):
            raise TypeError(
                f"LinearProbe needs a module with encode_features(images); {type(pl_module).__name__} has none"
            )
        if trainer.datamodule is None:
            raise ValueError("LinearProbe needs a DataModule (train and val/test loaders)")

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> dict[str, float]:
        with training_rng_untouched(pl_module.device):
            return self._probe(trainer, pl_module, split)

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> dict[str, float]:
        dm = trainer.datamodule
        was_training = pl_module.training
        pl_module.eval()
        try:
            # exact, unaugmented passes over whole splits (not the run's resampled training stream)
            train_loader = shard_eval_loader(split_loader(dm, "train"))
            tx, ty = encode_split(pl_module, train_loader, max_samples=self.max_train_samples)
            vx, vy = encode_split(pl_module, shard_eval_loader(split_loader(dm, split)), max_samples=self.max_val_samples)
        finally:
            pl_module.train(was_training)
        num_classes = int(getattr(dm, "num_classes", 0) or int(max(ty.max(), vy.max()) + 1))
        metrics = {
            "probe_top1": train_linear_probe(
                tx, ty, vx, vy, num_classes=num_classes, seed=self.seed, **self.probe_kwargs
            ).top1,
            "knn_top1": knn_top1(
                tx, ty, vx, vy, num_classes=num_classes, k=self.knn_k, temperature=self.knn_temperature
            ),
        }
        for shots in self.fewshot_shots:
            metrics[f"fewshot{shots}_top1"] = fewshot_top1(
                tx, ty, vx, vy, shots=shots, num_classes=num_classes, seed=self.seed
            )
        self.last_metrics = metrics
        return metrics

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cadence.at_validation_end(trainer):
            log_metrics(pl_module, "val", self.evaluate(trainer, pl_module, "val"))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.cadence.at_train_batch_end(trainer):
            log_metrics(pl_module, "val", self.evaluate(trainer, pl_module, "val"))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_test:
            log_metrics(pl_module, "test", self.evaluate(trainer, pl_module, "test"))
