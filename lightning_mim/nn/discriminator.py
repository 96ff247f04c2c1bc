"""PatchGAN discriminator (pix2pix / taming's NLayerDiscriminator) and the GAN loss functions.

MaskGIT's own tokenizer was trained with a StyleGAN discriminator that was never released with weights;
a PatchGAN is the common PyTorch choice (taming, MAGE's tokenizer lineage) and works at any image size,
including 32x32 digits. Taming uses BatchNorm; the default here is GroupNorm because the R1 penalty
needs per-sample independence (MaskGIT's note: "discriminator should not have BN").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("group", "batch", "none")
GAN_LOSSES = ("non_saturating", "hinge")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """Conv4x4/2 stack -> one logit per overlapping patch, shape (B, 1, h', w').

    Args:
        base_channels: width of the first layer (taming 64), doubled per layer up to 8x.
        num_layers: stride-2 layers (taming 3 for 256 px; 2 suits 32 px).
        norm: one of NORMS.
    Images in [0, 1] are mapped to [-1, 1] inside.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, norm: str = "group") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown discriminator norm '{norm}'; valid: {', '.join(NORMS)}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = base_channels
        for n in range(1, num_layers + 1):
            out = base_channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=bias), _norm(norm, out), nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # taming's init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(2.0 * x - 1.0)


def _check_loss(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss '{kind}'; valid: {', '.join(GAN_LOSSES)}")


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: str = "non_saturating") -> Tensor:
    """hinge: mean(relu(1 - real) + relu(1 + fake)); non-saturating: mean(softplus(-real) + softplus(fake))."""
    _check_loss(kind)
    if kind == "hinge":
        return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def generator_loss(logits_fake: Tensor, kind: str = "non_saturating") -> Tensor:
    """hinge: -mean(fake); non-saturating: mean(softplus(-fake)) (= BCE with label 1)."""
    _check_loss(kind)
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


def r1_penalty(discriminator: nn.Module, real: Tensor) -> Tensor:
    """MaskGIT's R1: mean over the batch of ||d sum(D(x)) / dx||^2 on real images (times its cost outside).

    Returns (penalty, logits_real) so the logits can be reused for the discriminator loss.
    """
    real = real.detach().requires_grad_(True)
    logits = discriminator(real)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean(), logits


def adaptive_generator_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """Taming's lambda = ||grad_last nll|| / (||grad_last g|| + 1e-4), clamped to [0, max_weight], detached."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
