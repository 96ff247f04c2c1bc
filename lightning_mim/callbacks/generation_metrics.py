"""Callback: FID / IS / KID / precision-recall / CAS of the model's samples during fit and at test.

All the work is `lightning_mim.eval.generation.evaluate_generation` (shared with
`python -m lightning_mim.evaluate`); this class decides when, builds the feature extractors once
(failing at start-up if the Inception weights file is missing) and logs `val/...` or `test/...`.
The extractors live here, not on the LightningModule, so checkpoints stay small (docs/DEPENDENCIES.md).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_mim.callbacks._cadence import EvalCadence, log_metrics, training_rng_untouched, why_no_generation
from lightning_mim.eval.extractors import FeatureExtractor, build_extractor, check_inception_weights
from lightning_mim.eval.generation import evaluate_generation, second_draw_seed
from lightning_mim.settings import SECOND_DRAW_SUFFIX, EvaluationSettings, validated

log = logging.getLogger(__name__)


class GenerationMetrics(pl.Callback):
    """Generate `num_samples` images (class-balanced if conditional) and score them against the real split.

    Args:
        extractors: subset of ("domain", "inception"); metric names carry it (`fid_domain`, ...).
        num_samples: generated images per evaluation (split over DDP ranks).
        every_n_epochs / every_n_steps: when to run during fit (see `EvalCadence`); None disables.
        on_test: also run at the end of `trainer.test` against the test split.
        cache_dir: where the domain classifier and real statistics are cached.
        inception_weights: local path of torch-fidelity's InceptionV3 weights (needed for "inception").
        domain_classifier: training options of the domain classifier (`DEFAULT_TRAINING` keys).
        decode_overrides: decoding settings for evaluation (default: the model's `decode_settings`).
        num_real: cap on real images for the statistics (None = the whole split).
    """

    def __init__(
        self,
        *,
        extractors: Sequence[str] = ("domain",),
        num_samples: int = 1000,
        batch_size: int = 100,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        on_test: bool = True,
        cache_dir: str | os.PathLike = "cache",
        inception_weights: str | os.PathLike | None = None,
        domain_classifier: dict[str, Any] | None = None,
        decode_overrides: dict[str, Any] | None = None,
        num_real: int | None = None,
        seed: int = 0,
        second_draw: bool = False,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        prc_neighborhood: int = 3,
        is_splits: int = 10,
        progress: bool = True,
    ) -> None:
        super().__init__()
        names = [extractors] if isinstance(extractors, str) else list(extractors)
        validated(EvaluationSettings, {"num_samples": num_samples, "batch_size": batch_size, "extractor": names}, "evaluation")
        self.extractor_names = names
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.cadence = EvalCadence(every_n_epochs, every_n_steps)
        self.on_test = bool(on_test)
        self.cache_dir = cache_dir
        self.inception_weights = inception_weights
        self.domain_classifier = dict(domain_classifier or {})
        self.decode_overrides = dict(decode_overrides or {})
        self.num_real = num_real
        self.seed = int(seed)
        self.second_draw = bool(second_draw)
        self.metric_kwargs = dict(
            kid_subsets=int(kid_subsets),
            kid_subset_size=int(kid_subset_size),
            prc_neighborhood=int(prc_neighborhood),
            is_splits=int(is_splits),
        )
        self.progress = bool(progress)
        self.extractors: list[FeatureExtractor] = []
        self.info: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}
        self.active = True

    # -- start-up: fail early, build once -----------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if "inception" in self.extractor_names:
            check_inception_weights(self.inception_weights)  # FileNotFoundError naming file, URL and key
        reason = why_no_generation(pl_module)
        self.active = reason is None
        if not self.active:  # e.g. a tokenizer run with the default callback set: say so, don't fail
            hint = "callbacks.generation_metrics=null" if callable(getattr(pl_module, "generate", None)) else "callbacks=tokenizer"
            rank_zero_warn(f"GenerationMetrics is inactive: {reason} (set `{hint}` to silence this)")
            return
        if self.extractors:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "fingerprint"):
            raise ValueError("GenerationMetrics needs a DataModule with `fingerprint`, `image_size`, `num_classes`")
        device = trainer.strategy.root_device
        with training_rng_untouched(device):
            self._build_extractors(datamodule, device)
        if "domain_classifier_acc" in self.info:
            log.info("domain classifier val accuracy: %.4f", self.info["domain_classifier_acc"])

    def _build_extractors(self, datamodule: Any, device: Any) -> None:
        for name in self.extractor_names:
            ext, info = build_extractor(
                name,
                datamodule=datamodule,
                cache_dir=self.cache_dir,
                inception_weights=self.inception_weights,
                domain_classifier=self.domain_classifier,
                device=device,
            )
            self.extractors.append(ext)
            self.info.update(info)

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> dict[str, float]:
        with training_rng_untouched(pl_module.device):
            metrics = self._generate_and_score(trainer, pl_module, split, self.seed)
            if self.second_draw:  # the same model, another draw of samples: the evaluation's own spread
                second = self._generate_and_score(trainer, pl_module, split, second_draw_seed(self.seed))
                metrics.update({f"{k}{SECOND_DRAW_SUFFIX}": v for k, v in second.items()})
        metrics = {**self.info, **metrics}
        self.last_metrics = metrics
        return metrics

    def _generate_and_score(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str, seed: int) -> dict[str, float]:
        return evaluate_generation(
            pl_module,
            trainer.datamodule,
            num_samples=self.num_samples,
            extractor=[e.to(pl_module.device) for e in self.extractors],
            cache_dir=self.cache_dir,
            device=pl_module.device,
            decode_overrides=self.decode_overrides,
            batch_size=self.batch_size,
            split=split,
            seed=seed,
            num_real=self.num_real,
            progress=self.progress,
            **self.metric_kwargs,
        )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active and self.cadence.at_validation_end(trainer):
            log_metrics(pl_module, "val", self.evaluate(trainer, pl_module, "val"))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.active and self.cadence.at_train_batch_end(trainer):
            log_metrics(pl_module, "val", self.evaluate(trainer, pl_module, "val"))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active and self.on_test:
            log_metrics(pl_module, "test", self.evaluate(trainer, pl_module, "test"))
