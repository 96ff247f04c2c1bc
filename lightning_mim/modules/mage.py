"""MAGE and MAGE-C stage 2: masked token modelling with token drop, optional contrastive co-training.

Composes `nn.mage.MAGE` (encoder-decoder), the ratio distributions and masks of `masking.py`, the
losses of `losses.py` (`masked_token_loss`, `info_nce`) and `decoding.decode`; it implements none of
them. docs/FIDELITY.md "MAGE" / "MAGE-C" is the spec.

One training step (MAGE):
    tokens (B, N)                      frozen tokenizer on the fly, or token shards
    ratio  ~ ratio distribution        one per step (TruncGaussRatio, per_sample=False)
    ranks  = rank_noise(B, N)          ONE random ranking per sample ...
    mask   = ranks < ceil(ratio·N)     ... gives the masked tokens (replaced by the mask id)
    drop   = ranks < n_drop            ... and the dropped ones: dropped ⊆ masked by construction
    loss   = label-smoothed CE over the K codebook logits on masked positions (`token_mean`)

Drop count: n_drop = min(ceil(drop_ratio·N), smallest masked count in the batch). Official MAGE ties
the drop count to the lowest masking ratio it can draw (0.5), so it never exceeds the masked count;
our ratio group is free (e.g. `ratio=fixed ratio.value=0.3` with drop 0.5), and then we CLAMP: every
masked token is dropped and the encoder sees only visible tokens (MAE-style), instead of failing.
The count is shared by the batch because the encoder input must be rectangular.

MAGE-C (`contrastive=True`): the batch must hold images. Two views per image are made here with
torchvision v2 RandomResizedCrop + horizontal flip, per sample; both views go through the
tokenizer and the model as one 2B batch (independent masks, one ratio per step). The encoder output
of the kept image tokens (class slot excluded) is averaged, projected by `ProjectionHead`, and
InfoNCE (`losses.info_nce`) runs over the views of ALL ranks: loss = rec + λ·con.

Token layout: unconditional (`num_classes` 0 for the base class) but with `class_slots` slots so the
fake class id has a home: codes 0..K-1, class slots K..K+S-1, mask id K+S. Official: S = 1000,
fake id 1100 (vocab 2025, loads the official checkpoints); digits: S = 1, fake id K.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from lightning_mim.decoding import LogitsFn
from lightning_mim.losses import info_nce, masked_token_loss
from lightning_mim.masking import mask_from_ranks, num_masked, rank_noise
from lightning_mim.modules.stage2 import Stage2Module, masked_accuracy
from lightning_mim.nn.heads import ProjectionHead
from lightning_mim.nn.mage import MAGE
from lightning_mim.optim import build_optimizer
from lightning_mim.tokens import TokenLayout

# Keys of `arch` the module sets itself (from the tokenizer, the grid and its own arguments).
DERIVED_ARCH_KEYS = ("vocab_size", "n_positions", "codebook_size", "fake_class_id", "drop_ratio", "continuous_dim")
# MAGE-C view augmentation: torchvision RandomResizedCrop defaults + MAGE's scale range and a flip.
DEFAULT_VIEWS: dict[str, Any] = {"scale": (0.2, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": True}


def mage_masks(
    ratio: Tensor, n_tokens: int, drop_ratio: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(mask, drop), both (B, N) bool, from ONE noise ranking per sample, so drop ⊆ mask.

    ratio (B,): masking ratio per sample -> ceil(ratio·N) masked. Dropped: the
    min(ceil(drop_ratio·N), min_b masked_b) lowest ranks (clamped: see the module docstring).
    """
    n_mask = num_masked(ratio, n_tokens)  # (B,)
    n_drop = min(int(num_masked(drop_ratio, n_tokens)), int(n_mask.min()))
    ranks = rank_noise(ratio.shape[0], n_tokens, generator, ratio.device)
    return mask_from_ranks(ranks, n_mask), mask_from_ranks(ranks, n_drop)


def gathered_info_nce(
    z1: Tensor, z2: Tensor, temperature: float, gather: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """InfoNCE over the views of every rank: `info_nce(gather(z1), gather(z2))`.

    `gather` maps this rank's (B, D) to all ranks' (W·B, D) in rank order, keeping gradients
    (Lightning's `all_gather(..., sync_grads=True)`); the two views stay aligned (row i of both is
    the same image). Every rank computes the same global loss, so each rank's anchors meet all
    ranks' samples. Gradients are exact: the gather's backward SUMS the W ranks' gradients into each
    rank's own rows (W·dL/dz_r), and DDP then AVERAGES parameter gradients over the W ranks, giving
    dL/dθ. The cost is a (2WB)² similarity matrix per rank (8192² at MAGE's 4096 batch: ~0.3 GB fp32).
    """
    if gather is not None:
        z1, z2 = gather(z1), gather(z2)
    return info_nce(z1, z2, temperature=temperature)


def view_transform(image_size: int, views: dict[str, Any]) -> v2.Compose:
    """Per-image MAGE-C view augmentation on (3, H, W) float tensors in [0, 1]."""
    unknown = set(views) - set(DEFAULT_VIEWS)
    if unknown:
        raise ValueError(f"unknown views option(s) {sorted(unknown)}; valid: {', '.join(DEFAULT_VIEWS)}")
    opts = {**DEFAULT_VIEWS, **views}
    scale, ratio = tuple(float(s) for s in opts["scale"]), tuple(float(r) for r in opts["ratio"])
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"views.scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(scale)}")
    if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
        raise ValueError(f"views.ratio must be [lo, hi] with 0 < lo <= hi, got {list(ratio)}")
    # Bilinear (with antialias) as MAGE's main_pretrain: stays inside [0, 1], unlike bicubic.
    steps: list[nn.Module] = [
        v2.RandomResizedCrop(image_size, scale=scale, ratio=ratio, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    ]
    if opts["hflip"]:
        steps.append(v2.RandomHorizontalFlip(0.5))
    return v2.Compose(steps)


class MAGEModule(Stage2Module):
    """MAGE (and MAGE-C with `contrastive=True`) pre-training, generation and features.

    arch: `nn.mage.MAGE` size keys (enc_width, enc_depth, enc_heads, dec_width, dec_depth,
        dec_heads, mlp_ratio, dropout, pad_with, attn_fp32) and `input_mode`: `tokens` (official) or
        `continuous` (the encoder reads the tokenizer's unquantized features, projected; the target
        stays the token ids; needs image batches, no generation). The vocabulary, positions, fake
        class, drop ratio and continuous_dim (= the tokenizer's code_dim) are derived here.
    class_slots / fake_class_id: vocabulary layout (see module docstring); fake id default = K.
    drop_ratio: fraction of the N tokens dropped from the encoder input (MAGE 0.5).
    loss_reduction: `token_mean` (MAGE) or `per_sample_mean` (MaskGIT), see `losses.masked_token_loss`.
    feature_norm: `plain` (official linear probe) | `encoder`, see `MAGE.encode_features`.
    contrastive, contrastive_weight (λ), contrastive_temperature (τ), projection {hidden, out}, views
        {scale, ratio, hflip}: MAGE-C. The projection head exists only when contrastive.
    optim: `build_optimizer` keys; `base_lr` is scaled by the global batch (per-device batch ×
        devices × nodes × accumulation, from the trainer unless `global_batch` is given; MAGE-C counts
        images, not views); `warmup_epochs` is converted to steps with the trainer's epoch length.
    """

    def __init__(
        self,
        *,
        arch: dict[str, Any],
        tokenizer: dict[str, Any],
        ratio: dict[str, Any],
        decode: dict[str, Any],
        optim: dict[str, Any],
        image_size: int,
        class_slots: int = 1,
        fake_class_id: int | None = None,
        drop_ratio: float = 0.5,
        label_smoothing: float = 0.1,
        loss_reduction: str = "token_mean",
        feature_norm: str = "plain",
        contrastive: bool = False,
        contrastive_weight: float = 0.1,
        contrastive_temperature: float = 0.2,
        projection: dict[str, int] | None = None,
        views: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(tokenizer=tokenizer, num_classes=0, image_size=image_size, ratio=ratio, decode=decode)
        self.save_hyperparameters(logger=False)
        if int(class_slots) < 1:
            raise ValueError(f"class_slots must be >= 1 (position 0 needs the fake class id), got {class_slots}")
        # Unconditional generation (num_classes 0), but the vocabulary may keep the official 1000 slots.
        self.layout = TokenLayout(self.tokenizer.codebook_size, int(class_slots))
        clash = sorted(set(arch) & set(DERIVED_ARCH_KEYS))
        if clash:
            raise ValueError(f"arch must not set {clash}: they follow from the tokenizer, the grid and the module's arguments")
        # input_mode=continuous (the paper's Table 6 ablation): the encoder reads the tokenizer's
        # unquantized features (projected), the target stays the token ids; needs image batches.
        continuous = {"continuous_dim": self.tokenizer.code_dim} if arch.get("input_mode", "tokens") == "continuous" else {}
        fake = self.layout.codebook_size if fake_class_id is None else int(fake_class_id)
        self.mage = MAGE(
            vocab_size=self.layout.vocab_size,
            n_positions=self.n_tokens + 1,
            codebook_size=self.layout.codebook_size,
            fake_class_id=fake,
            drop_ratio=float(drop_ratio),
            **continuous,
            **arch,
        )
        if contrastive:
            if contrastive_weight < 0:
                raise ValueError(f"contrastive_weight must be >= 0, got {contrastive_weight}")
            if contrastive_temperature <= 0:
                raise ValueError(f"contrastive_temperature must be > 0, got {contrastive_temperature}")
            proj = {"hidden": 2048, "out": 256, **(projection or {})}
            unknown = set(proj) - {"hidden", "out"}
            if unknown:
                raise ValueError(f"unknown projection option(s) {sorted(unknown)}; valid: hidden, out")
            self.projection = ProjectionHead(self.mage.norm.normalized_shape[0], int(proj["hidden"]), int(proj["out"]))
            self.views = view_transform(self.image_size, dict(views or {}))
        else:  # no head at all: DDP needs no find_unused_parameters
            self.projection = None
            self.views = None

    # -- masking and the reconstruction loss ----------------------------------------------------------
    def sample_masks(self, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(mask, drop) (B, N) bool for one step: one ratio from the distribution, drop ⊆ mask."""
        ratio = self.ratio_sampler(batch, generator, self.device)
        return mage_masks(ratio, self.n_tokens, self.hparams.drop_ratio, generator)

    @property
    def continuous_input(self) -> bool:
        return self.mage.input_mode == "continuous"

    @property
    def cannot_generate(self) -> str | None:
        if self.continuous_input:
            return (
                "MAGE with arch.input_mode='continuous' cannot generate: decoding feeds sampled token ids "
                "back, and a continuous-input encoder has no features for them (needs input_mode='tokens')"
            )
        return None

    def reconstruction(
        self, tokens: Tensor, generator: torch.Generator | None = None, continuous: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Mask, drop, predict: {"loss", "accuracy" (on masked tokens), "mask", "drop", "encoder_output"}.
        `continuous` (B, N, D): the encoder input of `input_mode=continuous` (tokens stay the target)."""
        mask, drop = self.sample_masks(tokens.shape[0], generator)
        logits, inter = self.mage(tokens, mask, drop, continuous, return_intermediates=True)
        loss = masked_token_loss(
            logits, tokens, mask, label_smoothing=self.hparams.label_smoothing, reduction=self.hparams.loss_reduction
        )
        accuracy = masked_accuracy(logits, tokens, mask)
        return {"loss": loss, "accuracy": accuracy, "mask": mask, "drop": drop, "encoder_output": inter["encoder_output"]}

    # -- MAGE-C ------------------------------------------------------------------------------------------
    def make_views(self, images: Tensor) -> Tensor:
        """One random augmented view per image (B, 3, S, S), drawn independently per sample."""
        if self.views is None:
            raise RuntimeError("make_views needs contrastive=True")
        return torch.stack([self.views(image) for image in images])

    def project(self, encoder_output: Tensor) -> Tensor:
        """(B, 1 + kept, D) encoder output -> (B, out): mean over the kept image tokens, then the head."""
        return self.projection(encoder_output[:, 1:].mean(dim=1))

    def _gather(self, z: Tensor) -> Tensor:
        """This rank's (B, D) -> all ranks' (W·B, D), differentiable; identity without a trainer."""
        if self._trainer is None:
            return z
        gathered = self.all_gather(z, sync_grads=True)
        return gathered.flatten(0, 1) if gathered.dim() == z.dim() + 1 else gathered

    def contrastive_loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        return gathered_info_nce(z1, z2, self.hparams.contrastive_temperature, self._gather)

    def contrastive_step(self, images: Tensor) -> dict[str, Tensor]:
        """MAGE-C losses of an image batch: {"loss", "loss_rec", "loss_con", "accuracy"}."""
        if not images.is_floating_point():
            raise ValueError("MAGE-C needs image batches (two augmented views per image), got token ids")
        views = torch.cat([self.make_views(images), self.make_views(images)])  # (2B, 3, S, S)
        tokens, continuous = self.model_inputs(views, self.continuous_input)
        rec = self.reconstruction(tokens, continuous=continuous)
        z1, z2 = self.project(rec["encoder_output"]).chunk(2)
        con = self.contrastive_loss(z1, z2)
        loss = rec["loss"] + self.hparams.contrastive_weight * con
        return {"loss": loss, "loss_rec": rec["loss"], "loss_con": con, "accuracy": rec["accuracy"]}

    # -- Lightning hooks ---------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.views is not None:  # MAGE-C tokenizes random views: no image repeats, nothing to remember
            self.token_memo = None

    def training_step(self, batch, batch_idx: int) -> Tensor:
        if self.hparams.contrastive:
            out = self.contrastive_step(batch[0])
            self.log("train/loss_rec", out["loss_rec"])
            self.log("train/loss_con", out["loss_con"])
        else:
            tokens, continuous = self.model_inputs(batch[0], self.continuous_input)
            out = self.reconstruction(tokens, continuous=continuous)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log("train/masked_acc", out["accuracy"])
        return out["loss"]

    def masked_loss(self, batch, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Reconstruction loss of the un-augmented batch (MAGE-C too: validation makes no views)."""
        tokens, continuous = self.model_inputs(batch[0], self.continuous_input)
        out = self.reconstruction(tokens, generator, continuous)
        return out["loss"], out["accuracy"]

    def configure_optimizers(self):
        return build_optimizer(self, **self.resolved_optim())  # only trainable parameters: the tokenizer is frozen

    # -- generation and features ------------------------------------------------------------------------
    def logits_fn(self, labels: Tensor | None, num_samples: int) -> LogitsFn:
        """Unconditional decoding with the full encoder (no drop; the mask = the mask-id positions)."""
        if labels is not None:
            raise ValueError("MAGE generates unconditionally: pass labels=None and num_samples")
        mask_id = self.layout.mask_id
        return lambda tokens: self.mage(tokens, tokens == mask_id)

    @torch.no_grad()
    def encode_features(self, images: Tensor, layer: int | None = None) -> Tensor:
        """(B, 3, H, W) images (or (B, N) tokens) -> (B, enc_width): the unmasked encoder's mean
        image-token output, LayerNorm-ed (the linear-probe features). Runs in eval mode (no dropout)."""
        tokens, continuous = self.model_inputs(images, self.continuous_input)
        was_training = self.training
        self.eval()
        try:
            return self.mage.encode_features(tokens, continuous=continuous, layer=layer, norm=self.hparams.feature_norm)
        finally:
            self.train(was_training)
