"""BidirectionalTransformer and the shared blocks, pinned to docs/FIDELITY.md "MaskGIT training"."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_mim.nn import transformer as tf
from lightning_mim.nn.transformer import BidirectionalTransformer, PreLNBlock, trunc_normal_

K, C = 16, 3
VOCAB, MASK_ID = K + C + 1, K + C
L = 9  # class slot + 8 image tokens


def tiny(**kw) -> BidirectionalTransformer:
    args = dict(vocab_size=VOCAB, n_positions=L, codebook_size=K, width=32, depth=2, heads=4, mlp_dim=64)
    args.update(kw)
    return BidirectionalTransformer(**args)


def ids(batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, K, (batch, L), generator=g)
    x[:, 0] = K + 1  # class token
    x[:, 3] = MASK_ID
    return x


def official_param_count() -> int:
    """MaskGIT class-cond config counted by hand: 24 x (attention + MLP + 2 LN) + embeddings + head."""
    w, m, depth, vocab, pos = 768, 3072, 24, 2025, 257
    layer = (4 * w * w + 4 * w) + (2 * w * m + m + w) + 2 * 2 * w
    embed = vocab * w + pos * w + 2 * w
    head = (w * w + w) + 2 * w + vocab
    return depth * layer + embed + head


def test_official_param_count_is_172_5m():
    with torch.device("meta"):
        model = BidirectionalTransformer(2025, 257, 1024, 768, 24, 16, 3072)
    n = sum(p.numel() for p in model.parameters())
    assert n == official_param_count() == 172_457_193
    assert abs(n - 172.5e6) < 0.5e6
    with torch.device("meta"):
        pre = BidirectionalTransformer(2025, 257, 1024, 768, 24, 16, 3072, layout="pre_ln")
    assert sum(p.numel() for p in pre.parameters()) == n + 2 * 768  # + the final LayerNorm


def test_logits_are_sliced_to_codebook_and_hidden_has_width():
    model = tiny().eval()
    x = ids()
    assert model(x).shape == (2, L, K)
    assert model(x, return_hidden=True).shape == (2, L, 32)
    assert torch.equal(model.hidden(x), model(x, return_hidden=True))


def _ln(x, mod):
    return F.layer_norm(x, x.shape[-1:], mod.weight, mod.bias, mod.eps)


def _attention(x, attn, heads, causal=False):
    B, T, D = x.shape
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(D, dim=-1)
    q, k, v = (t.view(B, T, heads, D // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // heads)
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
    return out @ attn.proj.weight.T + attn.proj.bias


def test_post_ln_one_layer_equals_hand_computation():
    torch.manual_seed(0)
    model = tiny(depth=1, dropout=0.0, attn_dropout=0.0).double().eval()
    for p in model.parameters():  # non-trivial LayerNorm / bias values so their placement matters
        p.data.add_(0.1 * torch.randn_like(p))
    x = ids()
    emb, blk, head = model.token_emb, model.blocks[0], model.mlm_layer
    assert emb.LayerNorm.eps == blk.norm1.eps == blk.norm2.eps == head.ln.eps == 1e-12
    h = _ln(emb.word_embeddings.weight[x] + emb.position_embeddings.weight[:L], emb.LayerNorm)
    h = _ln(h + _attention(h, blk.attn, 4), blk.norm1)  # LN(x + attn)
    mlp = F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias, approximate="tanh")
    h = _ln(h + mlp @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias, blk.norm2)  # LN(x + mlp)
    z = _ln(F.gelu(h @ head.fc.weight.T + head.fc.bias, approximate="tanh"), head.ln)
    expected = z @ emb.word_embeddings.weight[:K].T + head.bias[:K]  # tied to E
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_pre_ln_block_equals_hand_computation():
    torch.manual_seed(1)
    blk = PreLNBlock(32, 4, 64, dropout=0.0, attn_dropout=0.0).double().eval()
    for p in blk.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    assert blk.norm1.eps == blk.norm2.eps == 1e-6
    h = x + _attention(_ln(x, blk.norm1), blk.attn, 4)
    m = F.gelu(_ln(h, blk.norm2) @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)  # exact GELU (timm)
    expected = h + m @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    torch.testing.assert_close(blk(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "block, order, eps, gelu, hidden_dropout",
    [
        (tf.PreLNBlock, ["norm1", "attn", "norm2", "mlp"], 1e-6, "none", True),  # timm ViT / MAGE
        (tf.PostLNBlock, ["attn", "norm1", "mlp", "norm2"], 1e-12, "tanh", False),  # BERT / MaskGIT
    ],
)
def test_block_defaults_and_parameter_order(block, order, eps, gelu, hidden_dropout):
    """Each layout keeps its defaults and its parameter order (optimizer states in checkpoints are
    stored by parameter index); explicit options override the defaults."""
    blk = block(32, 4, 64)
    assert [name for name, _ in blk.named_children()] == order
    assert blk.norm1.eps == blk.norm2.eps == eps
    assert blk.mlp.gelu_approximate == gelu and blk.mlp.hidden_dropout is hidden_dropout
    assert blk.attn.attn_dropout == 0.1 and blk.mlp.drop.p == 0.1 and blk.attn.attn_fp32
    other = block(32, 4, 64, ln_eps=1e-5, gelu_approximate="tanh" if gelu == "none" else "none", attn_fp32=False)
    assert other.norm1.eps == other.norm2.eps == 1e-5 and other.mlp.gelu_approximate != gelu
    assert not other.attn.attn_fp32


def test_pre_ln_layout_has_final_norm_and_runs():
    model = tiny(layout="pre_ln").eval()
    assert isinstance(model.norm, torch.nn.LayerNorm) and model.norm.eps == 1e-6
    assert isinstance(model.blocks[0], PreLNBlock)
    assert model(ids()).shape == (2, L, K)


def test_dropout_only_in_training():
    model = tiny(dropout=0.3, attn_dropout=0.3)
    x = ids()
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_head_gradient_reaches_tied_embedding():
    model = tiny().eval()
    x = ids()
    unused = sorted(set(range(K)) - set(x.flatten().tolist()))[0]  # a code absent from the input
    model(x)[..., unused].sum().backward()
    grad = model.token_emb.word_embeddings.weight.grad
    assert grad[unused].abs().sum() > 0  # only reachable through the tied output embedding
    assert grad[K + C - 1].abs().sum() == 0  # a class id neither input nor predicted


def test_init_truncated_normal():
    torch.manual_seed(0)
    model = tiny(width=64, mlp_dim=256, init_std=0.02)
    w = model.blocks[0].mlp.fc1.weight
    assert w.abs().max() <= 0.04 + 1e-7
    # std of N(0, 1) truncated at +-2 is 0.8796 (no variance correction, like JAX and torch)
    assert abs(w.std().item() - 0.02 * 0.8796) < 0.02 * 0.03
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert torch.equal(model.blocks[0].norm1.weight, torch.ones(64))
    e = model.token_emb.word_embeddings.weight
    assert e.abs().max() <= 0.04 + 1e-7 and e.std() > 0.015


def test_trunc_normal_distribution():
    torch.manual_seed(0)
    x = trunc_normal_(torch.empty(200_000), std=1.0)
    assert x.abs().max() <= 2.0
    assert abs(x.std().item() - 0.8796) < 0.01  # sd of the standard normal truncated to [-2, 2]
    assert abs(x.mean().item()) < 0.01


def test_attention_is_fp32_under_bf16_autocast(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(tf.F, "scaled_dot_product_attention", spy)
    model = tiny().eval()
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert seen and all(dtype == torch.float32 and not enabled for dtype, enabled in seen)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), model(x), atol=0.1, rtol=0.1)
    seen.clear()
    fast = tiny(attn_fp32=False).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast(x)
    assert all(dtype == torch.bfloat16 for dtype, _ in seen)


def test_bidirectional_vs_causal():
    x = ids(1)
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % K  # change the last token
    bi = tiny().eval()
    assert not torch.allclose(bi(x)[:, 0], bi(y)[:, 0])  # position 0 sees the future
    causal = tiny(causal=True).eval()
    torch.testing.assert_close(causal(x)[:, :-1], causal(y)[:, :-1], rtol=0, atol=0)


def test_kv_cache_matches_full_causal_forward():
    model = tiny(causal=True, layout="pre_ln").eval()
    x = ids(2)
    full = model(x)
    cache = model.new_cache()
    steps = [model(x[:, :3], cache=cache)]  # a prefix first (rectangular mask path) ...
    steps += [model(x[:, t : t + 1], cache=cache) for t in range(3, L)]  # ... then one token at a time
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache[0]["k"].shape == (2, 4, L, 8)
    with pytest.raises(ValueError, match="n_positions"):
        model(x[:, :1], cache=cache)
    with pytest.raises(ValueError, match="causal"):
        tiny()(x, cache=tiny().new_cache())


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="post_ln, pre_ln"):
        tiny(layout="sandwich")
    with pytest.raises(ValueError, match="divisible"):
        tiny(width=30)
    with pytest.raises(ValueError, match="gelu"):
        tiny(gelu_approximate="sigmoid")
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        tiny()(torch.zeros(L, dtype=torch.long))
    with pytest.raises(ValueError, match="n_positions"):
        tiny()(torch.zeros(1, L + 1, dtype=torch.long))
