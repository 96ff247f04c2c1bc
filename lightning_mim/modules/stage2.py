"""What the LightningModules on token grids share, in two layers.

`FrozenTokenizerModule`: a frozen tokenizer inside the module (its weights are part of the checkpoint,
so a checkpoint alone rebuilds everything), token or image batches (images are tokenized on the fly;
token shards are the fast path), and the optimiser plumbing that needs the trainer (global batch of
the base_lr rule, warm-up in epochs). MAGE fine-tuning builds on it.

`Stage2Module`: the generative models (MaskGIT, MAGE). A subclass supplies `logits_fn(labels, n)`
(token ids -> codebook logits, conditioning inside the closure) and `masked_loss(batch, generator)`;
the base draws masking ratios, runs the seeded validation step and generates with
`decoding.decode(self.logits_fn(labels, n), start, **self.decode_settings.as_kwargs())`.
"""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from torch import Tensor

from lightning_mim.checkpoints.vqgan import load_vqgan
from lightning_mim.decoding import DecodeSettings, LogitsFn, decode
from lightning_mim.modules.hparams import plain_config
from lightning_mim.modules.token_memo import TokenMemo
from lightning_mim.nn.vqgan import VQGAN
from lightning_mim.optim import build_optimizer
from lightning_mim.tokens import TokenLayout

# `model.optim` keys: `optim.build_optimizer`'s arguments plus warm-up given in epochs.
OPTIM_KEYS = frozenset(inspect.signature(build_optimizer).parameters) - {"model", "groups"} | {"warmup_epochs"}
MASKED_CELL_GREY = 0.5  # how still-masked latent cells are painted in decoding-progression pictures
VAL_SEED = 1234  # validation masks come from a fixed generator: val/loss is comparable across steps


def masked_accuracy(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """Top-1 accuracy of (B, N, K) `logits` against (B, N) `tokens` on the (B, N) bool `mask` positions."""
    return (logits.argmax(-1) == tokens)[mask].float().mean()


class FrozenTokenizerModule(pl.LightningModule):
    """Base class of modules that read token grids of a frozen tokenizer (see the module docstring)."""

    def __init__(self, *, tokenizer: dict[str, Any], num_classes: int, image_size: int) -> None:
        super().__init__()
        ckpt = tokenizer.get("ckpt")
        if ckpt and Path(ckpt).is_file():
            self.tokenizer = load_vqgan(ckpt)
        else:
            # Rebuilt from the architecture: when a stage-2 checkpoint is loaded, its state dict holds
            # the tokenizer weights (train.py refuses to *train* with a missing tokenizer file).
            if ckpt:
                warnings.warn(f"tokenizer checkpoint {ckpt} not found; expecting its weights from the stage-2 checkpoint")
            self.tokenizer = VQGAN(**tokenizer["arch"])
        self.tokenizer.requires_grad_(False).eval()
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        factor = self.tokenizer.downsample_factor
        if self.image_size % factor:
            raise ValueError(f"image_size {image_size} is not a multiple of the tokenizer's downsampling {factor}")
        self.grid = (self.image_size // factor, self.image_size // factor)
        self.n_tokens = self.grid[0] * self.grid[1]
        # Unconditional models still get one class slot: position 0 needs an id.
        self.layout = TokenLayout(self.tokenizer.codebook_size, max(1, self.num_classes))
        self.token_memo: TokenMemo | None = None  # set at fit start when the training images repeat exactly

    def on_fit_start(self) -> None:
        """Remember token grids by image content (`TokenMemo`) when the DataModule says its training
        images are deterministic (no random crop or flip) and the model runs on CPU: from the second
        epoch on, the frozen tokenizer is not run again. Results are unchanged (the tokenizer is frozen)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.device.type == "cpu" and getattr(datamodule, "deterministic_train_images", False):
            self.token_memo = TokenMemo()

    # -- tokenizer -------------------------------------------------------------------------------
    def train(self, mode: bool = True):  # the tokenizer stays in eval mode (no BN/dropout updates)
        super().train(mode)
        self.tokenizer.eval()
        return self

    @torch.no_grad()
    def to_tokens(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """(images or tokens, labels) -> ((B, N) int64 tokens, labels)."""
        data, labels = batch
        if data.is_floating_point():  # images in [0, 1]: tokenize with the frozen tokenizer
            if self.token_memo is not None and data.device.type == "cpu":
                data = self.token_memo(data, self.tokenizer.encode_to_indices)
            else:
                data = self.tokenizer.encode_to_indices(data)
        return data.reshape(data.shape[0], -1).long(), labels.long()

    def model_inputs(self, data: Tensor, continuous: bool) -> tuple[Tensor, Tensor | None]:
        """Images or token ids -> (token ids (B, N), unquantized features (B, N, D) when `continuous`
        else None). Continuous input (MAGE's Table 6 ablation) needs images: token shards hold no features."""
        if not continuous:
            return self.to_tokens((data, data.new_zeros(len(data))))[0], None
        if not data.is_floating_point():
            raise ValueError(
                "arch.input_mode='continuous' needs image batches: token shards hold no continuous features "
                "(use an image DataModule, e.g. data=digits, or input_mode=tokens)"
            )
        return self.tokens_and_latents(data)

    @torch.no_grad()
    def tokens_and_latents(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) images -> ((B, N) int64 codes, (B, N, D) unquantized encoder features), from ONE
        tokenizer pass: the continuous-input ablation (MAGE Table 6) feeds the features and keeps the
        codes as its target."""
        z = self.tokenizer.encode(images)  # (B, D, h, w), before quantisation
        tokens = self.tokenizer.quantize_latents(z).indices.reshape(z.shape[0], -1).long()
        return tokens, z.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def tokens_to_images(self, tokens: Tensor) -> Tensor:
        """(B, N) codes -> (B, 3, H, W) images in [0, 1]; mask ids are painted grey."""
        masked = tokens >= self.layout.codebook_size
        codes = tokens.masked_fill(masked, 0).view(-1, *self.grid)
        images = self.tokenizer.decode_indices(codes).clamp(0, 1)
        if masked.any():
            cell = masked.view(-1, 1, *self.grid).float()
            cell = torch.nn.functional.interpolate(cell, size=images.shape[-2:], mode="nearest")
            images = images * (1 - cell) + MASKED_CELL_GREY * cell
        return images

    # -- optimisation -----------------------------------------------------------------------------
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks (per-device batch × world size × accumulation):
        the batch of MAGE's lr rule lr = base_lr · global_batch / 256."""
        per_device = getattr(self.trainer.datamodule, "batch_size", None)
        if per_device is None:
            self._train_loader_ready()
            per_device = getattr(self.trainer.train_dataloader, "batch_size", None)
        if not per_device:
            raise ValueError("cannot infer the per-device batch size for base_lr scaling: set model.optim.global_batch")
        return int(per_device) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def _train_loader_ready(self) -> None:
        # With max_steps set, `estimated_stepping_batches` never loads the data; we need its length.
        if self.trainer.train_dataloader is None:
            self.trainer.fit_loop.setup_data()

    def steps_per_epoch(self) -> int:
        """Optimizer steps per training epoch (for warm-ups given in epochs, as the papers do)."""
        self._train_loader_ready()
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("optim.warmup_epochs needs a finite epoch (set data.batches_per_epoch) or use warmup_steps")
        return max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))

    def resolved_optim(self) -> dict[str, Any]:
        """`hparams.optim` with what needs the trainer filled in, ready for `optim.build_optimizer`:
        total_steps (default: the run's), warmup_epochs -> warmup_steps, and the global batch of the
        base_lr rule when no absolute lr is given."""
        optim = dict(self.hparams.optim)
        unknown = sorted(set(optim) - OPTIM_KEYS)
        if unknown:
            raise ValueError(f"unknown optim key(s) {unknown}; valid: {', '.join(sorted(OPTIM_KEYS))}")
        if optim.get("total_steps") is None:
            optim["total_steps"] = max(1, int(self.trainer.estimated_stepping_batches))
        warmup_epochs = optim.pop("warmup_epochs", None)
        if warmup_epochs is not None:
            if optim.get("warmup_steps"):
                raise ValueError("optim: give warmup_epochs or warmup_steps, not both")
            optim["warmup_steps"] = round(float(warmup_epochs) * self.steps_per_epoch())
        if optim.get("lr") is None:
            optim.setdefault("global_batch", self.global_batch())
        return optim

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the tokenizer's real architecture, so the checkpoint rebuilds it even when the
        config named another (e.g. `tokenizer.ckpt` pointing at the official f=16 weights)."""
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict) and isinstance(hparams.get("tokenizer"), dict):
            hparams["tokenizer"] = {**hparams["tokenizer"], "arch": plain_config(self.tokenizer.config)}


class Stage2Module(FrozenTokenizerModule):
    """Generative stage 2: subclasses implement `logits_fn(labels, num_samples)` and
    `masked_loss(batch, generator) -> (loss, masked accuracy)`.

    ratio: a `_target_` spec of a masking-ratio distribution (`masking.py`); `n_tokens: null` is
        filled with the grid's token count. decode: every `DecodeSettings` field (the config's
        `decode` group), the settings `generate()` uses unless overridden per call.
    """

    def __init__(
        self, *, tokenizer: dict[str, Any], num_classes: int, image_size: int, ratio: dict[str, Any], decode: dict[str, Any]
    ) -> None:
        super().__init__(tokenizer=tokenizer, num_classes=num_classes, image_size=image_size)
        self.decode_settings = DecodeSettings.from_mapping(decode)
        # Ratio distributions that depend on N (log, exp schedules) get the grid's token count.
        needs_n = "n_tokens" in ratio and ratio["n_tokens"] is None
        self.ratio_sampler = instantiate(ratio, **({"n_tokens": self.n_tokens} if needs_n else {}))

    # -- what subclasses supply -------------------------------------------------------------------
    def logits_fn(self, labels: Tensor | None, num_samples: int) -> LogitsFn:
        """(B, N) token ids -> (B, N, K) codebook logits, conditioned on `labels` (None: unconditional)."""
        raise NotImplementedError

    def masked_loss(self, batch, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(loss, masked-token accuracy) of a batch under masks drawn from `generator`."""
        raise NotImplementedError

    # -- validation --------------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        """The masked loss under masks seeded by VAL_SEED + batch index (same masks at every evaluation)."""
        generator = torch.Generator(device=self.device).manual_seed(VAL_SEED + batch_idx)
        loss, accuracy = self.masked_loss(batch, generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/masked_acc", accuracy, sync_dist=True)

    # -- generation --------------------------------------------------------------------------------
    def default_labels(self, num_samples: int) -> Tensor | None:
        """Class-balanced labels (0, 1, ..., C-1, 0, ...) or None when unconditional."""
        if self.num_classes == 0:
            return None
        return torch.arange(num_samples, device=self.device) % self.num_classes

    @property
    def cannot_generate(self) -> str | None:
        """None when `generate()` works; else why not (generation callbacks then skip with a warning)."""
        return None

    def generate_tokens(
        self,
        labels: Tensor | None,
        num_samples: int,
        generator: torch.Generator | None = None,
        return_steps: bool = False,
        **overrides: Any,
    ):
        """(num_samples, N) decoded token ids (and each step's grid with `return_steps`), from an all-mask
        start, with `decode_settings` changed by `overrides` (DecodeSettings field names)."""
        if self.cannot_generate:
            raise NotImplementedError(self.cannot_generate)
        settings = self.decode_settings.replace(**overrides)
        if settings.guidance_scale > 0 and self.num_classes == 0:
            raise ValueError(
                f"{type(self).__name__} is unconditional: classifier-free guidance (decode.guidance_scale > 0) does not apply"
            )
        mask_id = self.layout.mask_id
        start = torch.full((num_samples, self.n_tokens), mask_id, dtype=torch.long, device=self.device)
        uncond = self.logits_fn(None, num_samples) if settings.guidance_scale > 0 else None
        return decode(
            self.logits_fn(labels, num_samples),
            start,
            mask_id=mask_id,
            generator=generator,
            return_steps=return_steps,
            uncond_logits_fn=uncond,
            **settings.as_kwargs(),
        )

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor | None = None,
        num_samples: int | None = None,
        *,
        generator: torch.Generator | None = None,
        return_steps: bool = False,
        **decode_overrides: Any,
    ):
        """Sample images (B, 3, H, W) in [0, 1]; with `return_steps`, also one image per decoding step."""
        if labels is None and num_samples is None:
            raise ValueError("give labels or num_samples")
        if labels is not None:
            num_samples = len(labels)
            labels = labels.to(self.device)
        elif self.num_classes:
            labels = self.default_labels(num_samples)
        was_training = self.training
        self.eval()
        try:
            out = self.generate_tokens(labels, num_samples, generator, return_steps, **decode_overrides)
        finally:
            self.train(was_training)
        if not return_steps:
            return self.tokens_to_images(out)
        tokens, steps = out
        return self.tokens_to_images(tokens), [self.tokens_to_images(s) for s in steps]
