"""MAGE's encoder-decoder over token grids (docs/FIDELITY.md "MAGE"; `LTH14/mage` `models_mage.py`).

The caller (masking helpers) chooses which image tokens are masked and which of those are dropped
from the encoder input, from one noise ranking, so dropped is a subset of masked. This module:

    ids      = [fake class] + tokens with masked ones replaced by the mask id       (B, 1+N)
    x        = LN(word_emb(ids) + pos_emb) -> dropout                               positions BEFORE dropping
    encoder  = pre-LN blocks on the kept tokens only (1 + N - n_drop) -> LN
    decoder  = Linear(enc -> dec); every masked position (dropped or kept) := projected [C] output
               (or a learned mask token); + learned decoder positions; blocks; LN
    logits   = MLM head (Linear dec->enc, GELU, LN) @ word_emb^T (detached) + bias, sliced to K codes

Parameter names follow the official checkpoint (see `lightning_mim.checkpoints.mage`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mim.nn.heads import MLMHead
from lightning_mim.nn.transformer import PreLNBlock, TokenEmbedding

PAD_WITH = ("cls", "mask_token")
INPUT_MODES = ("tokens", "continuous")
FEATURE_NORMS = ("plain", "encoder")
LN_EPS = 1e-6  # timm ViT / MAGE blocks, encoder and decoder norms, token_emb.LayerNorm
MLM_LN_EPS = 1e-5  # MAGE's MlmLayer uses nn.LayerNorm's default


class MAGE(nn.Module):
    """MAGE: forward(tokens (B,N), mask (B,N) bool, drop (B,N) bool) -> codebook logits (B, N, K)."""

    def __init__(
        self,
        vocab_size: int,
        n_positions: int,
        codebook_size: int,
        enc_width: int,
        enc_depth: int,
        enc_heads: int,
        dec_width: int,
        dec_depth: int,
        dec_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        fake_class_id: int = 1100,
        drop_ratio: float = 0.5,
        pad_with: str = "cls",
        input_mode: str = "tokens",
        continuous_dim: int | None = None,
        attn_fp32: bool = True,
        encoder_only: bool = False,
    ) -> None:
        super().__init__()
        if pad_with not in PAD_WITH:
            raise ValueError(f"unknown pad_with {pad_with!r}; valid: {', '.join(PAD_WITH)}")
        if input_mode not in INPUT_MODES:
            raise ValueError(f"unknown input_mode {input_mode!r}; valid: {', '.join(INPUT_MODES)}")
        if not 0 < codebook_size < vocab_size - 1:
            raise ValueError(f"codebook_size {codebook_size} must leave room for the mask id below vocab_size {vocab_size}")
        if not codebook_size <= fake_class_id < vocab_size - 1:
            raise ValueError(
                f"fake_class_id {fake_class_id} must be in [codebook_size={codebook_size}, mask id={vocab_size - 1})"
            )
        if input_mode == "continuous" and not continuous_dim:
            raise ValueError("input_mode='continuous' needs continuous_dim (the feature size per token)")
        if not 0.0 <= drop_ratio < 1.0:
            raise ValueError(f"drop_ratio must be in [0, 1), got {drop_ratio}")
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.codebook_size = codebook_size
        self.mask_id = vocab_size - 1
        self.fake_class_id = fake_class_id
        # The drop ratio is chosen by the caller's masking; kept here so configs and checkpoints say it.
        self.drop_ratio = drop_ratio
        self.pad_with = pad_with
        self.input_mode = input_mode
        # Fine-tuning and probing need the encoder alone: no decoder parameters that would sit unused
        # (DDP would then need find_unused_parameters); the parameter names stay those of the full model.
        self.encoder_only = bool(encoder_only)

        self.token_emb = TokenEmbedding(vocab_size, n_positions, enc_width, dropout=dropout, ln_eps=LN_EPS)
        self.continuous_proj = nn.Linear(continuous_dim, enc_width) if input_mode == "continuous" else None

        def blocks(width: int, depth: int, heads: int) -> nn.ModuleList:
            return nn.ModuleList(
                PreLNBlock(
                    width, heads, int(width * mlp_ratio), dropout=dropout, attn_dropout=dropout, ln_eps=LN_EPS,
                    attn_fp32=attn_fp32,
                )
                for _ in range(depth)
            )

        self.blocks = blocks(enc_width, enc_depth, enc_heads)
        self.norm = nn.LayerNorm(enc_width, eps=LN_EPS)
        self.mask_token = None
        if not self.encoder_only:
            self.decoder_embed = nn.Linear(enc_width, dec_width)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_width)) if pad_with == "mask_token" else None
            self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n_positions, dec_width))
            self.decoder_blocks = blocks(dec_width, dec_depth, dec_heads)
            self.decoder_norm = nn.LayerNorm(dec_width, eps=LN_EPS)
            self.mlm_layer = MLMHead(dec_width, enc_width, vocab_size, ln_eps=MLM_LN_EPS, detach_embedding=True)
        self._init_weights()

    def _init_weights(self) -> None:
        """The official initialisation: xavier-uniform Linear weights, zero biases, LayerNorm (1, 0),
        N(0, 0.02) embeddings, learned decoder positions and mask token; zero MLM bias."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        if self.encoder_only:
            return
        nn.init.normal_(self.decoder_pos_embed_learned, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        nn.init.zeros_(self.mlm_layer.bias)

    # -- input checks -----------------------------------------------------------------------------
    def _check(self, tokens: Tensor | None, mask: Tensor | None, drop: Tensor | None, continuous: Tensor | None):
        """Validate shapes and the drop pattern; returns (B, N, device, mask, drop, n_drop)."""
        if self.input_mode == "continuous":
            if continuous is None or continuous.dim() != 3:
                raise ValueError("input_mode='continuous' needs continuous features of shape (B, N, continuous_dim)")
            B, N = continuous.shape[:2]
            if continuous.shape[2] != self.continuous_proj.in_features:
                raise ValueError(
                    f"continuous features have dim {continuous.shape[2]}, model expects {self.continuous_proj.in_features}"
                )
            device = continuous.device
            if tokens is not None and tokens.shape != (B, N):
                raise ValueError(f"tokens {tuple(tokens.shape)} and continuous {tuple(continuous.shape)} disagree")
        else:
            if continuous is not None:
                raise ValueError("continuous features given but input_mode='tokens'")
            if tokens is None or tokens.dim() != 2:
                raise ValueError(f"expected tokens of shape (B, N), got {None if tokens is None else tuple(tokens.shape)}")
            if tokens.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"tokens must be integer ids, got {tokens.dtype}")
            (B, N), device = tokens.shape, tokens.device
        if N + 1 > self.n_positions:
            raise ValueError(f"{N} tokens + class slot exceed n_positions={self.n_positions}")
        if mask is None:
            mask = torch.zeros(B, N, dtype=torch.bool, device=device)
        if drop is None:
            drop = torch.zeros(B, N, dtype=torch.bool, device=device)
        for name, t in (("mask", mask), ("drop", drop)):
            if t.shape != (B, N):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(B, N)}")
            if t.dtype != torch.bool:
                raise TypeError(f"{name} must be bool, got {t.dtype}")
        if (drop & ~mask).any():
            raise ValueError("drop must be a subset of mask (a dropped token is always a masked token)")
        counts = drop.sum(dim=1)
        n_drop = int(counts[0]) if B else 0
        if (counts != n_drop).any():
            raise ValueError(f"every sample must drop the same number of tokens, got {counts.tolist()}")
        return B, N, device, mask, drop, n_drop

    # -- encoder ------------------------------------------------------------------------------------
    def _embed(self, tokens: Tensor | None, mask: Tensor, continuous: Tensor | None, B: int, N: int, device) -> Tensor:
        """(B, 1+N, enc) embeddings: [fake class] + image tokens, masked ones as the mask id."""
        cls = torch.full((B, 1), self.fake_class_id, dtype=torch.long, device=device)
        if tokens is None:  # continuous mode: only the class slot and masked slots need ids
            image_ids = torch.full((B, N), self.mask_id, dtype=torch.long, device=device)
        else:
            image_ids = tokens.long().masked_fill(mask, self.mask_id)
        ids = torch.cat([cls, image_ids], dim=1)
        words = None
        if self.input_mode == "continuous":
            words = self.token_emb.word_embeddings(ids)
            projected = self.continuous_proj(continuous).to(words.dtype)
            image = torch.where(mask[..., None], words[:, 1:], projected)
            words = torch.cat([words[:, :1], image], dim=1)
        return self.token_emb(ids, words=words)

    def _encode(
        self, tokens, mask, drop, continuous, *, final_norm: bool = True, layer: int | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        B, N, device, mask, drop, n_drop = self._check(tokens, mask, drop, continuous)
        x = self._embed(tokens, mask, continuous, B, N, device)
        keep = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=device), ~drop], dim=1)  # (B, 1+N)
        x = x[keep].view(B, 1 + N - n_drop, x.shape[-1])
        encoder_input = x
        depth = len(self.blocks) if layer is None else layer
        if not 0 <= depth <= len(self.blocks):
            raise ValueError(f"layer must be in [0, {len(self.blocks)}], got {layer}")
        for blk in self.blocks[:depth]:
            x = blk(x)
        if final_norm:
            x = self.norm(x)
        return x, {"mask": mask, "drop": drop, "keep": keep, "encoder_input": encoder_input}

    def encode(
        self,
        tokens: Tensor | None,
        mask: Tensor | None = None,
        drop: Tensor | None = None,
        *,
        continuous: Tensor | None = None,
        final_norm: bool = True,
    ) -> Tensor:
        """Encoder outputs (B, 1 + N - n_drop, enc_width) of the class slot and the kept tokens
        (in sequence order), after the final LayerNorm unless `final_norm=False`."""
        return self._encode(tokens, mask, drop, continuous, final_norm=final_norm)[0]

    def encode_features(
        self,
        tokens: Tensor | None,
        *,
        continuous: Tensor | None = None,
        layer: int | None = None,
        norm: str = "plain",
    ) -> Tensor:
        """Representation (B, enc_width): encoder without masking, mean of the N image-token
        outputs (class slot excluded), then a LayerNorm.

        `norm="plain"` is what the official linear probe computes (`models_vit_mage.py` with
        `--global_pool`): the encoder's final `norm` is deleted and a fresh `fc_norm` LayerNorm
        (eps 1e-6, weight 1, bias 0, never loaded and frozen) normalises the pooled output of the
        last block, i.e. a parameter-free LayerNorm. `norm="encoder"` instead applies the
        pretrained final `norm` to every token before pooling (then the same plain LayerNorm).
        `layer` (0..depth) pools the output of that many blocks (per-layer probing ablation).
        """
        if norm not in FEATURE_NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(FEATURE_NORMS)}")
        pooled = self.pool(tokens, continuous=continuous, layer=layer, final_norm=norm == "encoder")
        return F.layer_norm(pooled, pooled.shape[-1:], eps=LN_EPS)

    def pool(
        self,
        tokens: Tensor | None,
        *,
        continuous: Tensor | None = None,
        layer: int | None = None,
        final_norm: bool = False,
    ) -> Tensor:
        """(B, enc_width) mean of the N image-token outputs of the unmasked encoder (class slot
        excluded), no normalisation after pooling. Differentiable: the fine-tuning path
        (`models_vit_mage.py --global_pool`: blocks -> mean over image tokens -> fc_norm -> head; the
        encoder's final `norm` is not used, hence `final_norm=False`)."""
        x, _ = self._encode(tokens, None, None, continuous, final_norm=final_norm, layer=layer)
        return x[:, 1:].mean(dim=1)

    # -- full model ---------------------------------------------------------------------------------
    def forward(
        self,
        tokens: Tensor | None,
        mask: Tensor | None,
        drop: Tensor | None = None,
        continuous: Tensor | None = None,
        *,
        return_intermediates: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """tokens (B, N) int64 codes, mask (B, N) bool, drop (B, N) bool (subset of mask, equal count
        per sample) -> logits (B, N, K) over the codebook. `drop=None`: no drop (generation).

        With `return_intermediates`, also a dict: `encoder_input` (B, 1+kept, enc) after the
        embedding, `encoder_output` (after the final norm), `pad` (B, 1, dec) the vector put at masked
        positions, `decoder_input` (B, 1+N, dec) before the decoder position embedding, `keep`.
        """
        if self.encoder_only:
            raise RuntimeError("this MAGE was built with encoder_only=True: it has no decoder (use encode/pool/encode_features)")
        x, inter = self._encode(tokens, mask, drop, continuous)
        inter["encoder_output"] = x
        B, kept, _ = x.shape
        mask, keep = inter["mask"], inter["keep"]
        y = self.decoder_embed(x)  # (B, kept, dec)
        pad = y[:, :1] if self.pad_with == "cls" else self.mask_token.to(y.dtype).expand(B, 1, -1)
        L = keep.shape[1]
        full = pad.expand(B, L, y.shape[-1]).clone()
        full[keep] = y.reshape(B * kept, -1)
        masked = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=mask.device), mask], dim=1)
        full = torch.where(masked[..., None], pad, full)  # masked-but-kept positions get the pad too
        inter["pad"], inter["decoder_input"] = pad, full
        h = full + self.decoder_pos_embed_learned[:, :L]
        for blk in self.decoder_blocks:
            h = blk(h)
        h = self.decoder_norm(h)
        logits = self.mlm_layer(h[:, 1:], self.token_emb.word_embeddings.weight, n_out=self.codebook_size)
        return (logits, inter) if return_intermediates else logits
