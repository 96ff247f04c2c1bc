"""MaskGIT stage 2: masked visual token modelling (MVTM) and iterative decoding.

Composes `nn.transformer.BidirectionalTransformer`, the ratio distributions of `masking.py`, the loss
of `losses.py` and `decoding.decode`; it implements none of them.

Sequence layout (official): position 0 holds the class token `K + label`, positions 1..N the image
tokens. Unconditional generation and classifier-free guidance use the mask id at position 0 as the
"no class" token (the official model has no such token; this is our choice, documented in docs/FIDELITY.md
"Choices of ours where the papers are silent").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_mim.decoding import LogitsFn
from lightning_mim.losses import masked_token_loss
from lightning_mim.masking import mask_tokens
from lightning_mim.modules.stage2 import Stage2Module, masked_accuracy
from lightning_mim.nn.transformer import BidirectionalTransformer
from lightning_mim.optim import build_optimizer
from lightning_mim.settings import TransformerSettings, validated


class MaskGITModule(Stage2Module):
    def __init__(
        self,
        *,
        transformer: dict[str, Any],
        tokenizer: dict[str, Any],
        ratio: dict[str, Any],
        decode: dict[str, Any],
        optim: dict[str, Any],
        num_classes: int,
        image_size: int,
        conditional: bool = True,
        masking: str = "exact",
        label_smoothing: float = 0.1,
        loss_reduction: str = "per_sample_mean",
        class_dropout: float = 0.0,
    ) -> None:
        super().__init__(
            tokenizer=tokenizer, num_classes=num_classes if conditional else 0, image_size=image_size, ratio=ratio, decode=decode
        )
        self.save_hyperparameters(logger=False)
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {class_dropout}")
        validated(TransformerSettings, transformer, "transformer")
        self.transformer = BidirectionalTransformer(
            vocab_size=self.layout.vocab_size,
            n_positions=self.n_tokens + 1,
            codebook_size=self.layout.codebook_size,
            **transformer,
        )

    # -- sequence building ------------------------------------------------------------------------
    def class_tokens(self, labels: Tensor | None, batch: int) -> Tensor:
        """Position-0 ids: `K + label`, or the mask id for "no class" (unconditional / dropped)."""
        null = torch.full((batch,), self.layout.mask_id, dtype=torch.long, device=self.device)
        if labels is None or self.num_classes == 0:
            return null
        return labels.long() + self.layout.codebook_size

    def logits(self, tokens: Tensor, class_ids: Tensor) -> Tensor:
        """(B, N) image token ids + (B,) class ids -> (B, N, K) codebook logits."""
        ids = torch.cat([class_ids[:, None], tokens], dim=1)
        return self.transformer(ids)[:, 1:]

    # -- training ---------------------------------------------------------------------------------
    def _loss(self, batch, generator: torch.Generator | None = None, drop_classes: bool = False) -> tuple[Tensor, Tensor]:
        tokens, labels = self.to_tokens(batch)
        ratio = self.ratio_sampler(tokens.shape[0], generator, self.device)
        masked, mask = mask_tokens(tokens, ratio, self.layout.mask_id, generator=generator, mode=self.hparams.masking)
        class_ids = self.class_tokens(labels, tokens.shape[0])
        if drop_classes and self.hparams.class_dropout > 0:
            drop = torch.rand(class_ids.shape, device=self.device) < self.hparams.class_dropout
            class_ids = class_ids.masked_fill(drop, self.layout.mask_id)
        logits = self.logits(masked, class_ids)
        loss = masked_token_loss(
            logits, tokens, mask, label_smoothing=self.hparams.label_smoothing, reduction=self.hparams.loss_reduction
        )
        return loss, masked_accuracy(logits, tokens, mask)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, accuracy = self._loss(batch, drop_classes=True)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/masked_acc", accuracy)
        return loss

    def masked_loss(self, batch, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return self._loss(batch, generator=generator)

    def configure_optimizers(self):
        return build_optimizer(self.transformer, **self.resolved_optim())

    # -- generation and features -----------------------------------------------------------------
    def logits_fn(self, labels: Tensor | None, num_samples: int) -> LogitsFn:
        """Token ids -> codebook logits with `labels`' class ids (None: the "no class" id) at position 0."""
        class_ids = self.class_tokens(labels, num_samples)
        return lambda tokens: self.logits(tokens, class_ids)

    @torch.no_grad()
    def encode_features(self, images: Tensor) -> Tensor:
        """Mean-pooled final hidden states of the image tokens at mask ratio 0 (linear probing)."""
        tokens, _ = self.to_tokens((images, torch.zeros(len(images), device=images.device)))
        ids = torch.cat([self.class_tokens(None, len(tokens))[:, None], tokens], dim=1)
        hidden = self.transformer(ids, return_hidden=True)
        return hidden[:, 1:].mean(dim=1)
