"""Vector quantiser of the MaskGIT/VQGAN tokenizer, with the usual training options.

Default behaviour is the official one (docs/FIDELITY.md "MaskGIT tokenizer"): nearest codebook entry
by squared L2, loss = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2 with beta = 0.25 (beta on the
*commitment* term, as in MaskGIT's JAX code; MAGE's PyTorch port keeps a legacy swap), and a
straight-through gradient from z_q to z. With the default options the only tensor in the state
dict is `embedding.weight`, so the official checkpoint loads strictly.

Options (each adds buffers only when enabled):
- `ema=True`: codebook updated by exponential moving averages of assignments (VQ-VAE-2 /
  Sonnet's VectorQuantizerEMA) with Laplace smoothing of the counts; the codebook term leaves the
  loss and the embedding gets no gradient.
- `restart_after=k`: a code unused for k consecutive training steps is re-initialised from an
  encoder output of the current batch (the most recent ones), so dead codes come back.
- `l2_normalize=True`: lookup and loss on unit vectors (ViT-VQGAN's cosine-similarity codebook).

All statistics (`counts`, `perplexity`) are returned so a caller can log codebook usage.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class QuantizerOutput(NamedTuple):
    """Everything one quantiser call produces; `distances` feeds the entropy term."""

    z_q: Tensor  # (B, D, h, w), straight-through: forward = codes, backward = identity to z
    loss: Tensor  # scalar: codebook (unless EMA) + beta * commitment
    indices: Tensor  # (B, h, w) int64
    distances: Tensor  # (B, h, w, K) float32 squared L2 distances
    counts: Tensor  # (K,) float32, how often each code was picked in this call
    perplexity: Tensor  # scalar, exp(entropy of the batch code histogram)


def squared_distances(z: Tensor, codebook: Tensor) -> Tensor:
    """Pairwise squared L2 distances ||z_i - e_k||^2 for z (N, D) and codebook (K, D) -> (N, K)."""
    return (
        z.pow(2).sum(1, keepdim=True)
        - 2.0 * z @ codebook.t()
        + codebook.pow(2).sum(1)[None, :]
    )


def perplexity_from_counts(counts: Tensor) -> Tensor:
    """exp(H(p)) of the code histogram: K when all codes are used equally, 1 when one code is used."""
    p = counts.float() / counts.sum().clamp_min(1e-12)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def codebook_usage(counts: Tensor) -> Tensor:
    """Fraction of codes used at least once according to the histogram `counts` (K,)."""
    return (counts > 0).float().mean()


def entropy_loss(affinity: Tensor, temperature: float = 0.01) -> Tensor:
    """MaskGIT's codebook entropy term (`libml/losses.py`, softmax type), to be *minimised*.

    affinity: (..., K) logits, MaskGIT uses -distances; temperature 0.01 in its VQGAN config.
    Returns mean per-token entropy - entropy of the batch-averaged assignment: low per-token
    entropy (confident assignments) and high average entropy (all codes used).
    """
    flat = affinity.reshape(-1, affinity.shape[-1]).float() / temperature
    probs = flat.softmax(-1)
    log_probs = flat.log_softmax(-1)
    avg_probs = probs.mean(0)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    return sample_entropy - avg_entropy


def _all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over DDP ranks when running distributed (EMA statistics must agree on every rank)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _broadcast(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t, src=0)
    return t


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser; `embedding.weight` (K, D) is the official parameter name."""

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        beta: float = 0.25,
        *,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        restart_after: int | None = None,
        l2_normalize: bool = False,
    ) -> None:
        super().__init__()
        if codebook_size < 1 or code_dim < 1:
            raise ValueError(f"codebook_size and code_dim must be >= 1, got {codebook_size}, {code_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if restart_after is not None and restart_after < 1:
            raise ValueError(f"restart_after must be >= 1 or None, got {restart_after}")
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.beta = beta
        self.ema = ema
        self.decay = decay
        self.eps = eps
        self.restart_after = restart_after
        self.l2_normalize = l2_normalize

        self.embedding = nn.Embedding(codebook_size, code_dim)
        # Taming's init: small uniform codes; every encoder output starts near all of them.
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if ema:
            self.embedding.weight.requires_grad_(False)
            # cluster_size starts at 1 and embed_avg at the codes, so embed_avg / cluster_size = codes:
            # an unused code then shrinks smoothly under Laplace smoothing instead of exploding.
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_avg", self.embedding.weight.detach().clone())
        if restart_after is not None:
            self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, beta={self.beta}, "
            f"ema={self.ema}, restart_after={self.restart_after}, l2_normalize={self.l2_normalize}"
        )

    def codebook(self) -> Tensor:
        """The lookup table as used for the nearest-code search (unit rows if l2_normalize)."""
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.l2_normalize else w

    def embed_indices(self, indices: Tensor) -> Tensor:
        """Codes for int indices (B, h, w) -> (B, D, h, w)."""
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"indices must lie in [0, {self.codebook_size}), got [{int(indices.min())}, {int(indices.max())}]"
            )
        return F.embedding(indices.long(), self.codebook()).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantise z (B, D, h, w). Distances and losses are computed in float32 (safe under autocast)."""
        if z.ndim != 4 or z.shape[1] != self.code_dim:
            raise ValueError(f"expected z of shape (B, {self.code_dim}, h, w), got {tuple(z.shape)}")
        b, d, h, w = z.shape
        update = self.training and torch.is_grad_enabled()
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_bhwd = z.float().permute(0, 2, 3, 1)
            if self.l2_normalize:
                z_bhwd = F.normalize(z_bhwd, dim=-1)
            flat = z_bhwd.reshape(-1, d)
            if update and self.restart_after is not None:
                # Before the lookup: codes changed later in this call would corrupt saved tensors.
                self._restart_dead_codes(flat.detach())
            codebook = self.codebook().float()
            if update and self.ema:
                codebook = codebook.clone()  # the EMA update below rewrites the weight in place
            dist_ = squared_distances(flat, codebook)  # (N, K)
            indices = dist_.argmin(1)
            z_q = F.embedding(indices, codebook).view_as(z_bhwd)
            counts = torch.bincount(indices, minlength=self.codebook_size).float()

            commitment = F.mse_loss(z_bhwd, z_q.detach())
            if self.ema:
                loss = self.beta * commitment
            else:
                loss = F.mse_loss(z_q, z_bhwd.detach()) + self.beta * commitment

            if update:
                if self.ema:
                    self._ema_update(flat.detach(), indices, counts)
                if self.restart_after is not None:
                    used = _all_reduce_sum(counts.clone()) > 0
                    self.steps_unused.add_(1).masked_fill_(used, 0)

            z_q = z_bhwd + (z_q - z_bhwd).detach()  # straight-through
            z_q = z_q.permute(0, 3, 1, 2).contiguous().to(z.dtype)
        return QuantizerOutput(
            z_q=z_q,
            loss=loss,
            indices=indices.view(b, h, w),
            distances=dist_.view(b, h, w, self.codebook_size),
            counts=counts,
            perplexity=perplexity_from_counts(counts),
        )

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, indices: Tensor, counts: Tensor) -> None:
        """cluster_size <- d*cs + (1-d)*n_k; embed_avg <- d*ea + (1-d)*sum z; e_k = ea_k / smoothed cs_k."""
        embed_sum = torch.zeros_like(self.embed_avg).index_add_(0, indices, flat)
        counts = _all_reduce_sum(counts.clone())
        embed_sum = _all_reduce_sum(embed_sum)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_avg.mul_(self.decay).add_(embed_sum, alpha=1.0 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n  # Laplace
        self.embedding.weight.copy_(self.embed_avg / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead_codes(self, flat: Tensor) -> None:
        """Codes unused for `restart_after` steps take the value of random current encoder outputs."""
        dead = (self.steps_unused >= self.restart_after).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        # Random rows of the batch (with replacement if the batch is smaller than the dead set);
        # rank 0's choice is broadcast so every DDP rank keeps the same codebook.
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        new = _broadcast(flat[pick].clone())
        self.embedding.weight[dead] = new.to(self.embedding.weight.dtype)
        if self.ema:
            self.embed_avg[dead] = new
            self.cluster_size[dead] = 1.0
        self.steps_unused[dead] = 0
