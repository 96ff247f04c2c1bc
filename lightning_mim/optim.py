"""Optimiser and learning-rate schedule recipes of the papers, shared by every LightningModule.

MaskGIT: Adam β=(0.9, 0.96), lr 1e-4, weight decay 0.045, linear warm-up then constant. The official
         optimiser is flax.optim.Adam, whose weight decay is *decoupled* (param -= lr·wd·param after
         the Adam step), i.e. torch's AdamW — hence `name: adamw` in conf/model/maskgit.yaml.
MAGE:    AdamW β=(0.9, 0.95), lr = base_lr·batch/256, weight decay 0.05 without decay on biases and
         norms, warm-up then half-cosine.
MAGE fine-tuning: layer-wise lr decay, MAE/BEiT's `param_groups_lrd` (`layer_decay_param_groups`): with
         L = depth + 1, a parameter of layer i gets lr · decay^(L - i); the embeddings are layer 0,
         block j is layer j + 1, everything after the blocks (fc_norm, head) layer L (scale 1).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable

import torch
from torch import nn

from lightning_mim.settings import LR_SCHEDULES, OPTIMIZER_NAMES, OptimSettings, validated

OPTIMIZERS = dict(zip(OPTIMIZER_NAMES, (torch.optim.Adam, torch.optim.AdamW)))  # the names are settings'


def param_groups(model: nn.Module, weight_decay: float, decay_norms_and_biases: bool) -> list[dict[str, Any]]:
    """Split parameters so 1-D tensors (biases, norm scales) can skip weight decay (MAE/MAGE rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norms_and_biases:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def effective_lr(lr: float | None, base_lr: float | None, global_batch: int) -> float:
    """`lr` if given, else MAGE's linear scaling rule base_lr · global_batch / 256."""
    if lr is not None:
        return float(lr)
    if base_lr is None:
        raise ValueError("optim needs either lr or base_lr")
    return float(base_lr) * global_batch / 256


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str = "constant", min_ratio: float = 0.0):
    """Multiplier of the peak lr at a step: linear warm-up, then constant or half-cosine to min_ratio."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule '{schedule}'; valid: {', '.join(LR_SCHEDULES)}")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(
    model: nn.Module,
    *,
    name: str = "adamw",
    lr: float | None = 1e-4,
    base_lr: float | None = None,
    global_batch: int = 256,
    betas: Iterable[float] = (0.9, 0.96),
    weight_decay: float = 0.045,
    decay_norms_and_biases: bool = True,
    warmup_steps: int = 0,
    total_steps: int = 1,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
    groups: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Lightning's `configure_optimizers` return value for one of the papers' recipes.

    `groups`: ready parameter groups (e.g. `layer_decay_param_groups` of fine-tuning) instead of the
    decay / no-decay split of `model`; a group's `lr_scale` multiplies the peak lr, and the warm-up /
    cosine factor then applies to every group alike."""
    validated(OptimSettings, dict(name=name, lr=lr, base_lr=base_lr, weight_decay=weight_decay, betas=list(betas),
                                  warmup_steps=warmup_steps, schedule=schedule, min_lr_ratio=min_lr_ratio), "optim")
    if name == "adam" and weight_decay > 0:
        warnings.warn(
            f"optimizer 'adam' with weight_decay={weight_decay} adds an L2 term to the gradient (coupled), "
            "which Adam's normalisation turns into a pull to zero for every weight with small gradients; "
            "the papers' decay is decoupled: use name 'adamw'",
            stacklevel=2,
        )
    peak = effective_lr(lr, base_lr, global_batch)
    if groups is None:
        groups = param_groups(model, weight_decay, decay_norms_and_biases)
    else:
        groups = [{**g, "lr": peak * float(g.get("lr_scale", 1.0))} for g in groups]
    optimizer = OPTIMIZERS[name](groups, lr=peak, betas=tuple(betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, total_steps, schedule, min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# Encoder submodules that are layer 0 of the layer-wise decay (MAE's `get_layer_id_for_vit`: patch
# embedding / token embedding; our continuous-input projection is the embedding of that mode).
EMBEDDING_PREFIXES = ("token_emb.", "continuous_proj.")


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
