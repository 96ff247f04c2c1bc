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

from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

from lightning_mim.checkpoints.mage import torch_load_mage
from lightning_mim.modules.hparams import plain_config
from lightning_mim.modules.stage2 import Stage2Module
from lightning_mim.nn.mage import LN_EPS, MAGE
from lightning_mim.optim import build_optimizer

CHECKPOINT_FORMATS = ("auto", "lightning", "official")
INITS = ("pretrained", "random")
HEAD_NORMS = ("layernorm", "batchnorm")
# Encoder submodules that are layer 0 of the layer-wise decay (MAE's `get_layer_id_for_vit`: patch
# embedding / token embedding; our continuous-input projection is the embedding of that mode).
EMBEDDING_PREFIXES = ("token_emb.", "continuous_proj.")
# Architecture kwargs of `nn.mage.MAGE` that only the decoder or the masking use; the encoder ignores them.
ENCODER_KEYS = (
    "vocab_size", "n_positions", "codebook_size", "enc_width", "enc_depth", "enc_heads", "mlp_ratio",
    "fake_class_id", "input_mode", "continuous_dim", "attn_fp32",
)


# -- layer-wise lr decay (pure) ----------------------------------------------------------------------
def vit_layer_id(name: str, depth: int) -> int:
    """Layer of a parameter for layer-wise lr decay: embeddings 0, `blocks.j.*` j + 1, the rest depth + 1."""
    if name.startswith(EMBEDDING_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    *,
    depth: int,
    layer_decay: float,
    weight_decay: float,
) -> list[dict[str, Any]]:
    """Optimizer groups of MAE/MAGE `param_groups_lrd`: one per (layer, decay / no decay).

    Each group: `params`, `names`, `layer`, `lr_scale` = layer_decay^(depth + 1 - layer) (the
    optimizer's peak lr times it; `optim.build_optimizer` applies it), `weight_decay` (0 for 1-D
    tensors: biases and norm scales). Frozen parameters are skipped.
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    num_layers = depth + 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        layer = vit_layer_id(name, depth)
        decay = p.ndim > 1
        key = (layer, decay)
        if key not in groups:
            scale = float(layer_decay) ** (num_layers - layer)
            groups[key] = {
                "params": [], "names": [], "layer": layer, "lr_scale": scale,
                "weight_decay": float(weight_decay) if decay else 0.0,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


# -- mixup / cutmix ----------------------------------------------------------------------------------
def mixup_transform(
    num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0, switch_prob: float = 0.5
) -> nn.Module | None:
    """torchvision v2 MixUp / CutMix on an (images, int labels) batch -> (mixed images, soft labels (B, C)).

    timm's `Mixup` semantics: with both on, CutMix is chosen with `switch_prob`; the whole batch is
    mixed with probability `prob` (otherwise the labels are still returned one-hot, so the loss is
    the same soft-target cross-entropy every step). None when both alphas are 0.
    """
    if mixup < 0 or cutmix < 0:
        raise ValueError(f"mixup and cutmix alphas must be >= 0, got {mixup}, {cutmix}")
    if not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
        raise ValueError(f"mixup_prob and mixup_switch_prob must be in [0, 1], got {prob}, {switch_prob}")
    if mixup == 0 and cutmix == 0:
        return None
    if mixup > 0 and cutmix > 0:
        mix: nn.Module = v2.RandomChoice(
            [v2.MixUp(alpha=mixup, num_classes=num_classes), v2.CutMix(alpha=cutmix, num_classes=num_classes)],
            p=[1 - switch_prob, switch_prob],
        )
    elif mixup > 0:
        mix = v2.MixUp(alpha=mixup, num_classes=num_classes)
    else:
        mix = v2.CutMix(alpha=cutmix, num_classes=num_classes)
    return _MaybeMix(mix, num_classes, prob)


class _MaybeMix(nn.Module):
    """Apply `mix` with probability `prob`, else return one-hot labels (same output type either way)."""

    def __init__(self, mix: nn.Module, num_classes: int, prob: float) -> None:
        super().__init__()
        self.mix, self.num_classes, self.prob = mix, int(num_classes), float(prob)

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.prob >= 1 or torch.rand(()) < self.prob:
            return self.mix(images, labels)
        return images, F.one_hot(labels, self.num_classes).to(images.dtype)


# -- loading the pre-trained encoder ---------------------------------------------------------------
def load_pretrained(
    path: str | Path,
    *,
    checkpoint_format: str = "auto",
    official_size: str | None = None,
    tokenizer_ckpt: str | None = None,
    weights_only: bool = True,
) -> dict[str, Any]:
    """Read a pre-trained MAGE: {"encoder": MAGE kwargs (encoder_only), "encoder_state": its tensors,
    "tokenizer_arch": VQGAN kwargs, "tokenizer_state": tokenizer tensors or None (then `tokenizer_ckpt`)}.

    `checkpoint_format`: `lightning` (ours: `state_dict` + `hyper_parameters` of MAGEModule),
    `official` (`{'model': ...}` of LTH14/mage, through `load_mage`), or `auto` (by the keys).
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}; valid: {', '.join(CHECKPOINT_FORMATS)}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"model.pretrained={path}: no such checkpoint file (a last.ckpt of experiment=digits_mage, or an official MAGE .pth)"
        )
    ckpt = torch_load_mage(path, weights_only=weights_only)
    if checkpoint_format == "auto":
        checkpoint_format = "lightning" if "state_dict" in ckpt and "hyper_parameters" in ckpt else "official"
    if checkpoint_format == "lightning":
        return _from_lightning(ckpt, path)
    return _from_official(ckpt, official_size, tokenizer_ckpt)


def _from_lightning(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    hp, state = ckpt.get("hyper_parameters") or {}, ckpt.get("state_dict") or {}
    if "arch" not in hp or "mage.token_emb.word_embeddings.weight" not in state:
        raise KeyError(f"{path} is not a MAGEModule checkpoint (no hyper_parameters.arch / mage.* weights)")
    tok_arch = dict((hp.get("tokenizer") or {}).get("arch") or {})
    if not tok_arch:
        raise KeyError(f"{path}: hyper_parameters.tokenizer.arch is missing; cannot rebuild the tokenizer")
    words = state["mage.token_emb.word_embeddings.weight"]
    codebook = int(tok_arch.get("codebook_size", 1024))
    arch = dict(hp["arch"])
    encoder = {
        **{k: v for k, v in arch.items() if k in ENCODER_KEYS},
        "vocab_size": int(words.shape[0]),
        "n_positions": int(state["mage.token_emb.position_embeddings.weight"].shape[0]),
        "codebook_size": codebook,
        "fake_class_id": int(hp.get("fake_class_id") if hp.get("fake_class_id") is not None else codebook),
    }
    if arch.get("input_mode", "tokens") == "continuous":
        encoder["continuous_dim"] = int(state["mage.continuous_proj.weight"].shape[1])
    enc_state = {k[len("mage.") :]: v for k, v in state.items() if k.startswith("mage.")}
    tok_state = {k[len("tokenizer.") :]: v for k, v in state.items() if k.startswith("tokenizer.")}
    return {"encoder": encoder, "encoder_state": enc_state, "tokenizer_arch": tok_arch, "tokenizer_state": tok_state or None}


def _from_official(ckpt: dict[str, Any], size: str | None, tokenizer_ckpt: str | None) -> dict[str, Any]:
    from lightning_mim.checkpoints.mage import load_mage, mage_config
    from lightning_mim.nn.vqgan import official_maskgit_f16_config

    model, vqgan = load_mage(ckpt, size)
    size = size or next(n for n in ("base", "large") if mage_config(n)["enc_depth"] == len(model.blocks))
    encoder = {k: v for k, v in mage_config(size).items() if k in ENCODER_KEYS}
    if vqgan is None and not tokenizer_ckpt:
        raise ValueError(
            "the official MAGE checkpoint holds no tokenizer (vqgan.*): set model.tokenizer_ckpt="
            "/path/to/vqgan_jax_strongaug.ckpt"
        )
    return {
        "encoder": encoder, "encoder_state": model.state_dict(),
        "tokenizer_arch": official_maskgit_f16_config(), "tokenizer_state": vqgan,
    }


class MAGEFinetuneModule(Stage2Module):
    """Fine-tune a pre-trained MAGE encoder end to end for classification; logs `val/top1`.

    pretrained: checkpoint path (required; see `load_pretrained`). checkpoint_format / official_size /
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
            loaded = load_pretrained(
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

    @property
    def cannot_generate(self) -> str | None:
        return "a fine-tuned MAGE classifier has no decoder"

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

