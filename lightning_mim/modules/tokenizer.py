"""Stage 1: train the VQ tokenizer (`TokenizerModule`, manual optimisation, generator + discriminator).

Generator loss (MaskGIT `vqgan_config.py` + taming):
    rec_weight * L1|L2(x, x̂) + perceptual_weight * LPIPS(x, x̂)          (= "nll")
  + quantiser loss (codebook + beta * commitment)
  + entropy_weight * entropy(-distances / entropy_temperature)          (MaskGIT's codebook entropy)
  + gan_weight * lambda * G(D(x̂))       once `disc_start` is reached; lambda is taming's adaptive weight
                                         ||grad nll|| / ||grad G|| at the decoder's last layer (or 1)
Discriminator loss: hinge or non-saturating on D(x), D(x̂.detach()) + r1_weight * R1(x).

Step counting: the discriminator update does not advance `trainer.global_step` (Lightning counts every
optimizer step in manual optimisation), so `trainer.max_steps` and `disc_start` count generator updates
= training batches. Under DDP use `strategy=ddp_find_unused_parameters_true` (the discriminator is idle
before `disc_start`).

Images are [0, 1] (B, 3, H, W) in and out, labels are ignored.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from lightning_mim.modules.hparams import plain_config
from lightning_mim.nn.discriminator import (
    GAN_LOSSES,
    PatchDiscriminator,
    adaptive_generator_weight,
    discriminator_loss,
    generator_loss,
    r1_penalty,
)
from lightning_mim.nn.quantizer import codebook_usage, entropy_loss, perplexity_from_counts
from lightning_mim.nn.vqgan import VQGAN

# Defaults = the paper's values (docs/FIDELITY.md "MaskGIT tokenizer"); configs override them.
LOSS_DEFAULTS: dict[str, Any] = dict(
    reconstruction="l2",  # l1 | l2 ([open]: MaskGIT's trainer is unreleased; taming uses L1)
    reconstruction_weight=1.0,
    perceptual_weight=0.1,
    perceptual_weights_path=None,  # torchvision vgg16 state dict; missing -> warning, loss disabled
    gan_weight=0.1,
    gan_loss="non_saturating",  # non_saturating | hinge
    adaptive_gan_weight=False,  # taming's ||grad nll|| / ||grad G|| ratio; MaskGIT uses the fixed weight
    disc_start=0,
    r1_weight=10.0,
    entropy_weight=0.1,
    entropy_temperature=0.01,
    discriminator=dict(base_channels=64, num_layers=3, norm="group"),
)
OPTIM_DEFAULTS: dict[str, Any] = dict(lr=1e-4, betas=(0.0, 0.99), weight_decay=0.0, disc_lr=None, grad_clip=None)
RECONSTRUCTION = ("l1", "l2")


def _merge(name: str, given: Mapping[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    given = dict(given or {})
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {name} option(s) {sorted(unknown)}; valid: {sorted(defaults)}")
    return {**defaults, **given}


class TokenizerModule(pl.LightningModule):
    """Trains a `VQGAN` (`self.vqgan`); plain-dict arguments make checkpoints self-describing.

    Args:
        vqgan: `VQGAN` keyword arguments (`conf/tokenizer/*.yaml: arch`).
        loss: see LOSS_DEFAULTS.
        optim: see OPTIM_DEFAULTS (Adam for both networks; `disc_lr` defaults to `lr`).
        num_logged_images: originals/reconstructions in the MLflow grid `val/reconstructions` (0 = no grid).
    """

    def __init__(
        self,
        vqgan: dict[str, Any],
        loss: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        num_logged_images: int = 16,
    ) -> None:
        super().__init__()
        vqgan, loss, optim = plain_config(vqgan), plain_config(loss or {}), plain_config(optim or {})
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.loss_cfg = _merge("loss", loss, LOSS_DEFAULTS)
        self.loss_cfg["discriminator"] = {**LOSS_DEFAULTS["discriminator"], **(loss.get("discriminator") or {})}
        self.optim_cfg = _merge("optim", optim, OPTIM_DEFAULTS)
        cfg = self.loss_cfg
        if cfg["reconstruction"] not in RECONSTRUCTION:
            raise ValueError(f"unknown reconstruction loss '{cfg['reconstruction']}'; valid: {', '.join(RECONSTRUCTION)}")
        if cfg["gan_loss"] not in GAN_LOSSES:
            raise ValueError(f"unknown gan_loss '{cfg['gan_loss']}'; valid: {', '.join(GAN_LOSSES)}")

        self.vqgan = VQGAN(**vqgan)
        self.discriminator = PatchDiscriminator(**cfg["discriminator"]) if cfg["gan_weight"] > 0 else None
        self.perceptual, self.perceptual_status = self._build_perceptual()

        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self._val_counts: Tensor | None = None
        self._val_images: Tensor | None = None

    # -- construction ---------------------------------------------------------------------------
    def _build_perceptual(self):
        """LPIPS if its weight > 0 and the VGG file exists; otherwise say so (once) and disable it."""
        weight, path = self.loss_cfg["perceptual_weight"], self.loss_cfg["perceptual_weights_path"]
        if weight <= 0:
            return None, "off"
        if not path:
            status = "disabled: loss.perceptual_weights_path is not set"
        else:
            from pathlib import Path

            if Path(path).expanduser().is_file():
                from lightning_mim.nn.perceptual import LPIPS

                return LPIPS(path), f"on ({path})"
            status = f"disabled: VGG16 weights not found at {path}"
        warnings.warn(f"perceptual loss (weight {weight}) {status}; training without it", stacklevel=3)
        return None, status

    def configure_optimizers(self):
        o = self.optim_cfg
        betas = tuple(o["betas"])
        gen_params = [p for p in self.vqgan.parameters() if p.requires_grad]
        opt_g = torch.optim.Adam(gen_params, lr=o["lr"], betas=betas, weight_decay=o["weight_decay"])
        if self.discriminator is None:
            return opt_g
        d_lr = o["disc_lr"] if o["disc_lr"] is not None else o["lr"]
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=d_lr, betas=betas, weight_decay=o["weight_decay"])
        return [opt_g, opt_d]

    def on_fit_start(self) -> None:
        if self.logger is not None:  # the run records whether the perceptual loss really ran
            self.logger.log_hyperparams({"tokenizer/perceptual_loss": self.perceptual_status})

    # -- public API -----------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """encode -> quantise -> decode, clamped to [0, 1] (no codebook updates: runs without grad)."""
        return self.vqgan.reconstruct(images)

    # -- training -------------------------------------------------------------------------------
    def _reconstruction_loss(self, recon: Tensor, images: Tensor) -> Tensor:
        if self.loss_cfg["reconstruction"] == "l1":
            return F.l1_loss(recon.float(), images.float())
        return F.mse_loss(recon.float(), images.float())

    def _optimizers(self):
        opts = self.optimizers()
        if isinstance(opts, (list, tuple)):
            return opts[0], opts[1]
        return opts, None

    def _step(self, opt, loss: Tensor, *, counted: bool = True) -> None:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.optim_cfg["grad_clip"]:
            self.clip_gradients(opt, gradient_clip_val=float(self.optim_cfg["grad_clip"]), gradient_clip_algorithm="norm")
        if counted or not hasattr(opt, "_on_after_step"):
            opt.step()
            return
        # Lightning counts every optimizer step as a global step in manual optimisation; the
        # discriminator's step is made invisible to that counter (see module docstring).
        before, after = opt._on_before_step, opt._on_after_step
        opt._on_before_step = opt._on_after_step = lambda: None
        try:
            opt.step()
        finally:
            opt._on_before_step, opt._on_after_step = before, after

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        cfg = self.loss_cfg
        opt_g, opt_d = self._optimizers()
        gan_on = self.discriminator is not None and self.global_step >= int(cfg["disc_start"])

        # generator ---------------------------------------------------------------------------
        q = self.vqgan.quantize(self.vqgan.encode(images))
        recon = self.vqgan.decode(q.z_q)
        rec = self._reconstruction_loss(recon, images)
        nll = cfg["reconstruction_weight"] * rec
        logs: dict[str, Tensor] = {"rec_loss": rec.detach(), "vq_loss": q.loss.detach()}
        if self.perceptual is not None:
            p = self.perceptual(recon.float(), images.float()).mean()
            nll = nll + cfg["perceptual_weight"] * p
            logs["perceptual_loss"] = p.detach()
        loss = nll + q.loss
        if cfg["entropy_weight"] > 0:
            ent = entropy_loss(-q.distances, cfg["entropy_temperature"])
            loss = loss + cfg["entropy_weight"] * ent
            logs["entropy_loss"] = ent.detach()
        if gan_on:
            with self.toggled_optimizer(opt_g):
                g = generator_loss(self.discriminator(recon), cfg["gan_loss"])
                if cfg["adaptive_gan_weight"]:
                    lam = adaptive_generator_weight(nll, g, self.vqgan.get_last_layer())
                else:
                    lam = torch.ones((), device=self.device)
                loss = loss + cfg["gan_weight"] * lam * g
                logs.update(g_loss=g.detach(), gan_weight=lam)
                self._step(opt_g, loss)
        else:
            self._step(opt_g, loss)
        logs["loss"] = loss.detach()

        # discriminator -------------------------------------------------------------------------
        if gan_on:
            with self.toggled_optimizer(opt_d):
                if cfg["r1_weight"] > 0:
                    r1, logits_real = r1_penalty(self.discriminator, images)
                else:
                    r1, logits_real = torch.zeros((), device=self.device), self.discriminator(images.detach())
                logits_fake = self.discriminator(recon.detach())
                d = discriminator_loss(logits_real, logits_fake, cfg["gan_loss"])
                self._step(opt_d, d + cfg["r1_weight"] * r1, counted=False)
            logs.update(d_loss=d.detach(), r1=r1.detach(), logits_real=logits_real.detach().mean(),
                        logits_fake=logits_fake.detach().mean())

        with torch.no_grad():
            logs["perplexity"] = q.perplexity
            logs["codebook_usage"] = codebook_usage(q.counts)
            logs["psnr"] = -10.0 * torch.log10(F.mse_loss(recon.detach().clamp(0, 1).float(), images.float()).clamp_min(1e-10))
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False, on_step=True, on_epoch=False)
        self.log("train/rec", rec.detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return loss.detach()

    # -- validation -----------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_counts = torch.zeros(self.vqgan.codebook_size, device=self.device)
        self._val_images = None

    def validation_step(self, batch, batch_idx: int) -> None:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        q = self.vqgan.quantize(self.vqgan.encode(images))
        recon = self.vqgan.decode(q.z_q).float().clamp(0.0, 1.0)
        images = images.float()
        self.val_psnr(recon, images)
        self.val_ssim(recon, images)
        self._val_counts += q.counts
        self.log("val/rec_loss", self._reconstruction_loss(recon, images), on_epoch=True, sync_dist=True)
        self.log("val/psnr", self.val_psnr, on_epoch=True, prog_bar=True)
        self.log("val/ssim", self.val_ssim, on_epoch=True)
        n = int(self.hparams.num_logged_images)
        if self._val_images is None and n > 0:
            self._val_images = torch.cat([images[:n], recon[:n]]).detach().cpu()

    def on_validation_epoch_end(self) -> None:
        counts = self.trainer.strategy.reduce(self._val_counts, reduce_op="sum") if self.trainer else self._val_counts
        self.log("val/codebook_usage", codebook_usage(counts), sync_dist=False)
        self.log("val/perplexity", perplexity_from_counts(counts), sync_dist=False)
        self._log_reconstruction_grid()

    def _log_reconstruction_grid(self) -> None:
        """Originals (top rows) above reconstructions, as a stepped MLflow image; other loggers: skip."""
        from lightning.pytorch.loggers import MLFlowLogger

        logger = self.logger
        if self._val_images is None or not isinstance(logger, MLFlowLogger) or self.trainer.sanity_checking:
            return
        if self.trainer.global_rank != 0:
            return
        from torchvision.utils import make_grid

        n = self._val_images.shape[0] // 2
        grid = make_grid(self._val_images, nrow=max(1, n), padding=1, pad_value=1.0)
        image = (grid.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
        logger.experiment.log_image(logger.run_id, image, key="val/reconstructions", step=self.global_step)
