"""MAGE fine-tuning for classification (`model=mage_finetune`): the pre-trained encoder, end to end.

The official recipe (`LTH14/mage` README "Fine-tuning", `main_finetune.py`, `models_vit_mage.py`):

    images --frozen tokenizer--> token ids (B, N) --[fake class] + tokens--> encoder (no mask, no drop)
           --> mean of the N image-token outputs --> fc_norm (LayerNorm) --> Linear head
    loss   = cross-entropy with label smoothing 0.1 (soft targets when mixup/cutmix is on)
    optim  = AdamW (0.9, 0.999), lr = base_lr · global_batch / 256 (ViT-B: 2.5e-4 · 1024 / 256),
             weight decay 0.05 (none on 1-D tensors), layer-wise lr decay 0.65 (ViT-L 0.75),
             warm-up (5 epochs) then half-cosine; 100 epochs (ViT-L 50); mixup 0.8 / cutmix 1.0.

Layer-wise lr decay is MAE/BEiT's `param_groups_lrd`: with L = depth + 1, parameter group `i` gets
lr · decay^(L - i), where the embeddings (`token_emb`, and `continuous_proj` for continuous input)
are layer 0, block j is layer j + 1, and everything after the blocks (fc_norm, head) is layer L
(scale 1). The encoder's final `norm` is not used (the official `--global_pool` model deletes it).

Mixup/CutMix (torchvision.transforms.v2) act on the *images*, before tokenization, as the official
code does (timm Mixup on the pixel batch); targets become soft and the loss is the soft-target
cross-entropy with the same label smoothing (= timm's smoothed mixup targets).

Pre-trained weights: our own `last.ckpt` of `python -m lightning_mim.train experiment=digits_mage`
(`torch.load(weights_only=True)`: the MAGE encoder `mage.*` and the very tokenizer it was trained
with, `tokenizer.*`) or an official MAGE checkpoint (`lightning_mim.checkpoints.mage.load_mage`; its
tokenizer from the checkpoint's `vqgan.*` or from `tokenizer_ckpt`). Only the encoder is kept.
`init=random` keeps the architecture and tokenizer of the checkpoint but not its encoder weights:
the "from scratch" baseline of the same model.

Not reproduced: stochastic depth (drop_path 0.1; our blocks have none), RandAugment and random erasing
(data augmentation belongs to the DataModule).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mim.checkpoints.mage import load_mage_encoder
from lightning_mim.data.mixing import mixup_transform
from lightning_mim.modules.hparams import plain_config
from lightning_mim.modules.stage2 import FrozenTokenizerModule
from lightning_mim.nn.mage import LN_EPS, MAGE
from lightning_mim.optim import build_optimizer, layer_decay_param_groups

INITS = ("pretrained", "random")
HEAD_NORMS = ("layernorm", "batchnorm")



class MAGEFinetuneModule(FrozenTokenizerModule):
    """Fine-tune a pre-trained MAGE encoder end to end for classification; logs `val/top1`.

    pretrained: checkpoint path (required; see `checkpoints.mage.load_mage_encoder`). checkpoint_format / official_size /
        tokenizer_ckpt: how to read it. init: `pretrained` | `random` (same architecture, from scratch).
    head_norm: `layernorm` (official fc_norm, trained) | `batchnorm` (BatchNorm1d without affine, the
        linear-probe head). head_init_std: the head's truncated-normal init (official 2e-5).
    dropout: encoder blocks (timm ViT fine-tuning: 0); embed_dropout: after the token embedding (0.1).
    label_smoothing, mixup / cutmix alphas, mixup_prob, mixup_switch_prob: see `mixup_transform`.
    layer_decay: see `layer_decay_param_groups`. optim: name (adamw), lr or base_lr (· global_batch / 256),
        betas, weight_decay, warmup_epochs or warmup_steps, schedule, min_lr_ratio.
    resolved: filled in at save time (encoder / tokenizer architecture), so the fine-tuned checkpoint
        rebuilds itself with `load_from_checkpoint` without the pre-trained file.
    """

    def __init__(
        self,
        *,
        pretrained: str | None,
        num_classes: int,
        image_size: int,
        optim: dict[str, Any],
        checkpoint_format: str = "auto",
        official_size: str | None = None,
        tokenizer_ckpt: str | None = None,
        init: str = "pretrained",
        head_norm: str = "layernorm",
        head_init_std: float = 2e-5,
        dropout: float = 0.0,
        embed_dropout: float = 0.1,
        label_smoothing: float = 0.1,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        layer_decay: float = 0.65,
        resolved: dict[str, Any] | None = None,
    ) -> None:
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
        if head_norm not in HEAD_NORMS:
            raise ValueError(f"unknown head_norm {head_norm!r}; valid: {', '.join(HEAD_NORMS)}")
        if not 0 < float(layer_decay) <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        if not 0 <= float(label_smoothing) < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        loaded = None
        if resolved is None:
            if not pretrained or str(pretrained) == "???":
                raise ValueError(
                    "model.pretrained is not set: pass model.pretrained=/path/to/last.ckpt (a MAGE pre-training "
                    "checkpoint; init=random still reads it for the architecture and the tokenizer)"
                )
            loaded = load_mage_encoder(
                pretrained, checkpoint_format=checkpoint_format, official_size=official_size, tokenizer_ckpt=tokenizer_ckpt
            )
            resolved = {"encoder": loaded["encoder"], "tokenizer_arch": loaded["tokenizer_arch"]}
        tok_ckpt = tokenizer_ckpt if loaded is not None and loaded["tokenizer_state"] is None else None
        super().__init__(
            tokenizer={"ckpt": tok_ckpt, "arch": dict(resolved["tokenizer_arch"])}, num_classes=int(num_classes),
            image_size=image_size,
        )
        self.save_hyperparameters(logger=False)
        self.hparams["resolved"] = resolved
        enc_kwargs = {**resolved["encoder"], "dropout": float(dropout), "encoder_only": True}
        # MAGE asks for decoder sizes; an encoder-only model never builds them.
        enc_kwargs.update(dec_width=1, dec_depth=0, dec_heads=1)
        self.encoder = MAGE(**enc_kwargs)
        self.encoder.token_emb.dropout.p = float(embed_dropout)
        self.encoder.norm = nn.Identity()  # official --global_pool: the final norm is deleted, fc_norm used
        if self.continuous_input and self.encoder.continuous_proj.in_features != self.tokenizer.code_dim:
            raise ValueError("continuous_dim of the pre-trained encoder differs from the tokenizer's code_dim")
        if loaded is not None:
            if loaded["tokenizer_state"] is not None:
                self.tokenizer.load_state_dict(loaded["tokenizer_state"])
            if init == "pretrained":
                self.load_encoder_state(loaded["encoder_state"])
        width = self.encoder.token_emb.word_embeddings.embedding_dim
        self.fc_norm = nn.LayerNorm(width, eps=LN_EPS) if head_norm == "layernorm" else nn.BatchNorm1d(width, affine=False)
        self.head = nn.Linear(width, int(num_classes))
        nn.init.trunc_normal_(self.head.weight, std=float(head_init_std), a=-2 * float(head_init_std), b=2 * float(head_init_std))
        nn.init.zeros_(self.head.bias)
        self.mix = mixup_transform(int(num_classes), float(mixup), float(cutmix), float(mixup_prob), float(mixup_switch_prob))

    def load_encoder_state(self, state: dict[str, Tensor]) -> None:
        """Copy the encoder's tensors (embeddings, blocks) from a full MAGE state dict; decoder keys
        and the final `norm` are ignored, a missing encoder tensor is an error."""
        wanted = self.encoder.state_dict()
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise KeyError(f"pre-trained checkpoint lacks encoder tensors: {missing}")
        self.encoder.load_state_dict({k: state[k] for k in wanted})

    # -- forward -----------------------------------------------------------------------------------------
    @property
    def continuous_input(self) -> bool:
        return self.encoder.input_mode == "continuous"

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images (or (B, N) token ids) -> class logits (B, num_classes)."""
        tokens, continuous = self.model_inputs(images, self.continuous_input)
        pooled = self.encoder.pool(tokens, continuous=continuous)
        return self.head(self.fc_norm(pooled))

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy with label smoothing; `target` int labels (B,) or soft targets (B, C)."""
        return F.cross_entropy(logits.float(), target, label_smoothing=float(self.hparams.label_smoothing))

    # -- Lightning hooks ---------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, labels = batch
        labels = labels.long()
        target: Tensor = labels
        if self.mix is not None:
            if not images.is_floating_point():
                raise ValueError("mixup/cutmix mix images: they need image batches, not token ids")
            images, target = self.mix(images, labels)
        logits = self(images)
        loss = self.loss(logits, target)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/top1", (logits.argmax(1) == labels).float().mean())
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        labels = labels.long()
        self.log("val/loss", F.cross_entropy(logits.float(), labels), sync_dist=True)
        self.log("val/top1", (logits.argmax(1) == labels).float().mean(), prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("test/top1", (logits.argmax(1) == labels.long()).float().mean(), sync_dist=True)

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Names relative to the encoder (`token_emb.*`, `blocks.j.*`) plus `fc_norm.*`, `head.*`."""
        named = list(self.encoder.named_parameters())
        named += [(f"fc_norm.{n}", p) for n, p in self.fc_norm.named_parameters()]
        named += [(f"head.{n}", p) for n, p in self.head.named_parameters()]
        return [(n, p) for n, p in named if p.requires_grad]

    def param_groups(self) -> list[dict[str, Any]]:
        """Layer-wise lr decay groups of the encoder, fc_norm and head (see `layer_decay_param_groups`)."""
        return layer_decay_param_groups(
            self.trainable_named_parameters(),
            depth=len(self.encoder.blocks),
            layer_decay=float(self.hparams.layer_decay),
            weight_decay=float(self.hparams.optim.get("weight_decay", 0.05)),
        )

    def configure_optimizers(self):
        groups = [{k: v for k, v in g.items() if k != "names"} for g in self.param_groups()]
        return build_optimizer(self, **self.resolved_optim(), groups=groups)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict):
            hparams["resolved"] = {
                "encoder": dict(self.hparams.resolved["encoder"]),
                "tokenizer_arch": plain_config(self.tokenizer.config),
            }

    @torch.no_grad()
    def encode_features(self, images: Tensor, layer: int | None = None) -> Tensor:
        """Probe features of the (fine-tuned) encoder: pooled image tokens, plain LayerNorm."""
        was_training = self.training
        self.eval()
        try:
            tokens, continuous = self.model_inputs(images, self.continuous_input)
            return self.encoder.encode_features(tokens, continuous=continuous, layer=layer)
        finally:
            self.train(was_training)

