"""Transformer building blocks and MaskGIT's bidirectional transformer (docs/FIDELITY.md "MaskGIT training").

One attention module, one MLP, one pre-LN block (used by the pre-LN transformer and by both halves
of MAGE) and one post-LN block (the official MaskGIT/BERT layout). Attention goes through
`F.scaled_dot_product_attention`; by default q, k, v are upcast to float32 with autocast disabled,
as MAGE's official attention computes its logits in fp32 for stability under mixed precision
(`attn_fp32=False` keeps the autocast dtype and lets SDPA pick a fused bf16/fp16 kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mim.nn.heads import GELU_APPROXIMATIONS, MLMHead

LAYOUTS = ("post_ln", "pre_ln")
DEFAULT_LN_EPS = {"post_ln": 1e-12, "pre_ln": 1e-6}  # BERT's 1e-12 (MaskGIT); timm ViT's 1e-6 (MAGE)

KVCache = list[dict[str, Tensor]]  # one {"k", "v"} dict per layer, filled as tokens are appended


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (MAGE's `attn.qkv` / `attn.proj` names).

    Dropout `attn_dropout` on the attention probabilities, `proj_dropout` on the output projection;
    both are active in training mode only.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        qkv_bias: bool = True,
        attn_fp32: bool = True,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by the number of heads {heads}")
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.attn_fp32 = attn_fp32
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(self, x: Tensor, *, causal: bool = False, cache: dict[str, Tensor] | None = None) -> Tensor:
        """x (B, L, D) -> (B, L, D). With `cache`, keys/values of earlier calls are prepended
        (incremental autoregressive decoding) and this call's are appended to it."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B,H,L,hd)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        mask, is_causal = None, False
        if causal:
            past = k.shape[2] - L
            if past == 0:
                is_causal = True
            else:  # query i (absolute position past + i) sees keys 0..past + i
                mask = torch.ones(L, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=past)
        dropout_p = self.attn_dropout if self.training else 0.0
        if self.attn_fp32:  # at least fp32 (fp64 stays fp64), autocast off
            up = torch.promote_types(q.dtype, torch.float32)
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = F.scaled_dot_product_attention(
                    q.to(up), k.to(up), v.to(up), attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
                ).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, D)))


class Mlp(nn.Module):
    """fc1 -> GELU [-> dropout] -> fc2 -> dropout.

    `hidden_dropout=True` is timm's `Mlp` (MAGE: the same dropout after GELU and after fc2);
    `False` is BERT/MaskGIT's (dropout only on the layer output).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        dropout: float = 0.0,
        hidden_dropout: bool = True,
        gelu_approximate: str = "none",
    ) -> None:
        super().__init__()
        if gelu_approximate not in GELU_APPROXIMATIONS:
            raise ValueError(f"unknown gelu_approximate {gelu_approximate!r}; valid: {', '.join(GELU_APPROXIMATIONS)}")
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)
        self.hidden_dropout = hidden_dropout
        self.gelu_approximate = gelu_approximate

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.fc1(x), approximate=self.gelu_approximate)
        if self.hidden_dropout:
            h = self.drop(h)
        return self.drop(self.fc2(h))


class _Block(nn.Module):
    """The constructor both layouts share: attention + MLP + two LayerNorms with the same options.

    Subclasses set the layout's defaults (`ln_eps`, `gelu_approximate`; None picks them) and whether
    the MLP drops out after GELU too (`hidden_dropout`, MAGE/timm) or only on its output (BERT).
    """

    pre_ln: bool
    default_ln_eps: float
    default_gelu_approximate: str

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        *,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        ln_eps: float | None = None,
        gelu_approximate: str | None = None,
        attn_fp32: bool = True,
    ) -> None:
        super().__init__()
        eps = self.default_ln_eps if ln_eps is None else ln_eps
        gelu = self.default_gelu_approximate if gelu_approximate is None else gelu_approximate
        attn = SelfAttention(dim, heads, attn_dropout=attn_dropout, proj_dropout=dropout, attn_fp32=attn_fp32)
        mlp = Mlp(dim, mlp_dim, dropout=dropout, hidden_dropout=self.pre_ln, gelu_approximate=gelu)
        # registration order = state-dict / parameter order each layout always had (optimizer states
        # of existing checkpoints are stored by parameter index)
        norm1, norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        if self.pre_ln:
            self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        else:
            self.attn, self.norm1, self.mlp, self.norm2 = attn, norm1, mlp, norm2


class PreLNBlock(_Block):
    """x + Attn(LN(x)), then x + MLP(LN(x)): the ViT block of MAGE's encoder and decoder.
    Defaults: LayerNorm eps 1e-6, exact GELU, dropout after GELU and after fc2 (timm's Mlp)."""

    pre_ln = True
    default_ln_eps = DEFAULT_LN_EPS["pre_ln"]
    default_gelu_approximate = "none"

    def forward(self, x: Tensor, *, causal: bool = False, cache: dict[str, Tensor] | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), causal=causal, cache=cache)
        return x + self.mlp(self.norm2(x))


class PostLNBlock(_Block):
    """LN(x + dropout(Attn(x))), then LN(x + dropout(MLP(x))): the BERT layer of official MaskGIT.
    Defaults: LayerNorm eps 1e-12, tanh GELU, dropout only on the MLP output."""

    pre_ln = False
    default_ln_eps = DEFAULT_LN_EPS["post_ln"]
    default_gelu_approximate = "tanh"

    def forward(self, x: Tensor, *, causal: bool = False, cache: dict[str, Tensor] | None = None) -> Tensor:
        x = self.norm1(x + self.attn(x, causal=causal, cache=cache))
        return self.norm2(x + self.mlp(x))


class TokenEmbedding(nn.Module):
    """word + learned position embedding -> LayerNorm -> dropout (BERT's embedding; MAGE's `token_emb`)."""

    def __init__(self, vocab_size: int, n_positions: int, dim: int, *, dropout: float = 0.1, ln_eps: float = 1e-6):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(n_positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=ln_eps)  # name kept from BERT / MAGE's checkpoint
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: Tensor, *, words: Tensor | None = None, offset: int = 0) -> Tensor:
        """ids (B, L) -> (B, L, D), positions offset..offset+L-1. `words` replaces the word lookup
        (MAGE's continuous-input ablation builds its own)."""
        L = ids.shape[1]
        if offset + L > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence of {offset + L} positions exceeds n_positions={self.position_embeddings.num_embeddings}"
            )
        if words is None:
            words = self.word_embeddings(ids)
        pos = self.position_embeddings.weight[offset : offset + L]
        return self.dropout(self.LayerNorm(words + pos))


@torch.no_grad()
def trunc_normal_(t: Tensor, std: float, bound: float = 2.0) -> Tensor:
    """N(0, std^2) truncated to +-bound*std, in place, by rejection sampling.

    Same distribution as `nn.init.trunc_normal_(std=std, a=-2 std, b=2 std)` and as
    `jax.random.truncated_normal(-2, 2) * std` (neither rescales the variance), but ~20x faster
    on CPU: `nn.init.trunc_normal_` goes through `erfinv`, which takes ~20 s for MaskGIT's 172 M
    parameters; here only the 4.6 % of draws outside +-2 are redrawn.
    """
    if t.is_meta:
        return t
    flat = t.view(-1).normal_()
    idx = (flat.abs() > bound).nonzero().squeeze(1)
    while idx.numel():  # redraw only the rejected entries
        draw = torch.randn(idx.numel(), dtype=t.dtype, device=t.device)
        ok = draw.abs() <= bound
        flat[idx[ok]] = draw[ok]
        idx = idx[~ok]
    return t.mul_(std)


def trunc_normal_init_(module: nn.Module, std: float) -> None:
    """Truncated normal (cut at +-2 std, like `jax.random.truncated_normal(-2, 2) * std`) for Linear
    and Embedding weights, zero biases, LayerNorm (1, 0): the official MaskGIT initialisers."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            trunc_normal_(m.weight, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BidirectionalTransformer(nn.Module):
    """MaskGIT's transformer: ids (B, L) -> codebook logits (B, L, K).

    `layout="post_ln"` is the official BERT layout (`maskgit/nets/maskgit_transformer.py`):
    embeddings -> LN(1e-12) -> dropout; per layer LN(x + drop(attn)), LN(x + drop(mlp)); head
    Dense -> GELU -> LN -> h @ E^T + bias tied to the word embedding E. GELU is the tanh
    approximation there (`jax.nn.gelu` defaults to it). `layout="pre_ln"` uses MAGE's pre-LN ViT
    blocks and adds a final LayerNorm before the head.
    The logits are sliced to the `codebook_size` codes, so class and mask ids are never predicted.
    `causal=True` turns it into an autoregressive transformer (same weights layout), with an
    optional KV cache for incremental decoding (`new_cache()`, `forward(ids, cache=...)`).
    """

    def __init__(
        self,
        vocab_size: int,
        n_positions: int,
        codebook_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        layout: str = "post_ln",
        ln_eps: float | None = None,
        init_std: float = 0.02,
        causal: bool = False,
        gelu_approximate: str = "tanh",
        attn_fp32: bool = True,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
        if not 0 < codebook_size < vocab_size:
            raise ValueError(f"codebook_size {codebook_size} must be in (0, vocab_size={vocab_size})")
        eps = DEFAULT_LN_EPS[layout] if ln_eps is None else ln_eps
        self.layout = layout
        self.codebook_size = codebook_size
        self.causal = causal
        self.token_emb = TokenEmbedding(vocab_size, n_positions, width, dropout=dropout, ln_eps=eps)
        block = PostLNBlock if layout == "post_ln" else PreLNBlock
        self.blocks = nn.ModuleList(
            block(
                width,
                heads,
                mlp_dim,
                dropout=dropout,
                attn_dropout=attn_dropout,
                ln_eps=eps,
                gelu_approximate=gelu_approximate,
                attn_fp32=attn_fp32,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=eps) if layout == "pre_ln" else nn.Identity()
        self.mlm_layer = MLMHead(width, width, vocab_size, ln_eps=eps, gelu_approximate=gelu_approximate)
        trunc_normal_init_(self, init_std)

    def new_cache(self) -> KVCache:
        """An empty KV cache for `forward(ids, cache=...)` (causal models only)."""
        return [{} for _ in self.blocks]

    def forward(self, ids: Tensor, *, return_hidden: bool = False, cache: KVCache | None = None) -> Tensor:
        """ids (B, L) int64 -> logits (B, L, K), or final hidden states (B, L, width) with `return_hidden`.

        With `cache` (causal only), `ids` are the next tokens after those already in the cache;
        positions continue from there and the cache is extended in place.
        """
        if ids.dim() != 2:
            raise ValueError(f"expected ids of shape (B, L), got {tuple(ids.shape)}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids must be int64 token ids, got {ids.dtype}")
        offset = 0
        if cache is not None:
            if not self.causal:
                raise ValueError("a KV cache only makes sense for a causal transformer (causal=True)")
            if len(cache) != len(self.blocks):
                raise ValueError(f"cache has {len(cache)} layers, the model {len(self.blocks)}; use new_cache()")
            offset = cache[0]["k"].shape[2] if "k" in cache[0] else 0
        x = self.token_emb(ids, offset=offset)
        for i, blk in enumerate(self.blocks):
            x = blk(x, causal=self.causal, cache=None if cache is None else cache[i])
        x = self.norm(x)
        if return_hidden:
            return x
        return self.mlm_layer(x, self.token_emb.word_embeddings.weight, n_out=self.codebook_size)

    def hidden(self, ids: Tensor) -> Tensor:
        """Final hidden states (B, L, width), e.g. for mean-pooled linear probing."""
        return self.forward(ids, return_hidden=True)
