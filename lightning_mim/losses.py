"""Stage-2 losses as pure functions: masked-token cross-entropy and SimCLR's InfoNCE (MAGE-C).

docs/FIDELITY.md "Shared vocabulary": label smoothing 0.1 on masked positions only, over the K codebook
logits. MaskGIT averages per sample then over the batch; MAGE averages over all masked tokens of the
batch. The two agree when every sample masks the same number of tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("per_sample_mean", "token_mean")


def masked_token_loss(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    label_smoothing: float = 0.1,
    reduction: str = "per_sample_mean",
) -> Tensor:
    """Label-smoothed cross-entropy on masked positions.

    logits (B, N, K) (already sliced to the codebook), targets (B, N) int64 in [0, K),
    mask (B, N) bool (True = masked, predicted). Computed in float32 whatever the logits' dtype.

    `per_sample_mean` (MaskGIT): mean over each sample's masked tokens, then mean over the samples
    (every sample must mask at least one token). `token_mean` (MAGE): sum over all masked tokens of
    the batch / their count. Smoothing follows `F.cross_entropy(label_smoothing=eps)`:
    (1 - eps) * nll + eps * mean_k(-log p_k), which is exactly MAGE's `LabelSmoothingCrossEntropy`.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    if logits.dim() != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
        raise ValueError(
            f"expected logits (B, N, K), targets (B, N), mask (B, N); got {tuple(logits.shape)}, "
            f"{tuple(targets.shape)}, {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    per_token = F.cross_entropy(
        logits.float().flatten(0, 1),
        targets.flatten(),
        label_smoothing=label_smoothing,
        reduction="none",
    ).view_as(targets)
    weights = mask.to(per_token.dtype)
    counts = weights.sum(dim=1)
    if reduction == "token_mean":
        total = counts.sum()
        if total.item() == 0:
            raise ValueError("no masked token in the batch: the loss is undefined")
        return (per_token * weights).sum() / total
    if (counts == 0).any():
        raise ValueError("per_sample_mean needs at least one masked token in every sample")
    return ((per_token * weights).sum(dim=1) / counts).mean()


def info_nce(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> Tensor:
    """SimCLR's NT-Xent loss over the 2B projected views (MAGE-C's contrastive term).

    z1, z2: (B, D) projections of two views of the same B images. Each row is L2-normalised; the
    2B x 2B cosine similarities are divided by `temperature`; each of the 2B anchors has exactly one
    positive (the other view of its image) and 2B - 2 negatives (its own similarity is excluded).
    Returned: the cross-entropy averaged over all 2B anchors (so swapping z1 and z2 changes nothing).
    Needs B >= 2 for any negative to exist.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"expected two (B, D) tensors of equal shape, got {tuple(z1.shape)}, {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch = z1.shape[0]
    if batch < 2:
        raise ValueError("info_nce needs at least 2 samples (no negatives otherwise)")
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * batch, dtype=torch.bool, device=z.device), float("-inf"))
    idx = torch.arange(batch, device=z.device)
    positives = torch.cat([idx + batch, idx])  # anchor i <-> i + B
    return F.cross_entropy(sim, positives)
