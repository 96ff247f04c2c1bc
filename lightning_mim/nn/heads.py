"""Output heads: the tied MLM head of MaskGIT/MAGE and MAGE-C's contrastive projection head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mim.losses import info_nce  # noqa: F401  (re-exported: the head's loss lives beside it)

GELU_APPROXIMATIONS = ("none", "tanh")


class MLMHead(nn.Module):
    """Dense -> GELU -> LayerNorm -> logits = h @ E^T + bias, with E the (tied) word embedding.

    Shared by MaskGIT's BERT head (E tied and trained through the head) and MAGE's `MlmLayer`
    (`detach_embedding=True`: the official code multiplies with `word_embeddings.weight.data.detach()`,
    so the head never pushes gradient into E; E learns only as the input embedding).
    Parameter names (`fc`, `ln`, `bias`) follow MAGE's checkpoint (`mlm_layer.*`); the official
    bias is stored as (1, 1, vocab), ours as (vocab,) (the loader reshapes).
    """

    def __init__(
        self,
        in_dim: int,
        emb_dim: int,
        vocab_size: int,
        *,
        ln_eps: float = 1e-5,
        gelu_approximate: str = "none",
        detach_embedding: bool = False,
    ) -> None:
        super().__init__()
        if gelu_approximate not in GELU_APPROXIMATIONS:
            raise ValueError(f"unknown gelu_approximate {gelu_approximate!r}; valid: {', '.join(GELU_APPROXIMATIONS)}")
        self.fc = nn.Linear(in_dim, emb_dim)
        self.ln = nn.LayerNorm(emb_dim, eps=ln_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.gelu_approximate = gelu_approximate
        self.detach_embedding = detach_embedding

    def forward(self, x: Tensor, embedding: Tensor, n_out: int | None = None) -> Tensor:
        """x (..., in_dim), embedding (vocab, emb_dim) -> logits (..., n_out or vocab).

        `n_out` keeps only the first entries (the K codebook codes): class and mask ids then can
        never be predicted, and the product with the unused rows of E is never computed.
        """
        h = self.ln(F.gelu(self.fc(x), approximate=self.gelu_approximate))
        weight = embedding.detach() if self.detach_embedding else embedding
        bias = self.bias
        if n_out is not None:
            weight, bias = weight[:n_out], bias[:n_out]
        return F.linear(h, weight, bias)


class ProjectionHead(nn.Module):
    """MAGE-C's 2-layer MLP projection head: Linear -> ReLU -> Linear (SimCLR v1's head).

    The paper gives no widths or layout (docs/FIDELITY.md "MAGE-C": [open]); 2048 -> 256 is our default.
    """

    def __init__(self, in_dim: int, hidden: int = 2048, out: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_dim) -> (B, out)."""
        return self.fc2(F.relu(self.fc1(x)))
