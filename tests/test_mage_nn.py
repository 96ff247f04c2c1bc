"""MAGE encoder-decoder, heads and losses, pinned to docs/FIDELITY.md "MAGE" / "MAGE-C" / "Shared vocabulary"."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_mim.losses import info_nce, masked_token_loss
from lightning_mim.nn.heads import MLMHead, ProjectionHead
from lightning_mim.nn.mage import MAGE
from lightning_mim.nn.transformer import PreLNBlock

K, C = 16, 4
VOCAB, MASK_ID, FAKE = K + C + 1, K + C, K + 2


def tiny(**kw) -> MAGE:
    args = dict(
        vocab_size=VOCAB, n_positions=17, codebook_size=K, enc_width=32, enc_depth=2, enc_heads=4,
        dec_width=24, dec_depth=1, dec_heads=2, fake_class_id=FAKE,
    )
    args.update(kw)
    return MAGE(**args)


def masks(B: int, N: int, ratio: float, drop_ratio: float = 0.5, seed: int = 0):
    """Like the official code: one noise ranking; the ceil(drop*N) lowest are dropped, the ceil(ratio*N) masked."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.rand(B, N, generator=g).argsort(1).argsort(1)
    return rank < math.ceil(ratio * N), rank < math.ceil(drop_ratio * N)


def tokens(B: int, N: int, seed: int = 0):
    return torch.randint(0, K, (B, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("N", [16, 15])
def test_encoder_sees_class_plus_undropped_tokens(N):
    model = tiny().eval()
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    mask, drop = masks(3, N, 0.7)
    logits, inter = model(tokens(3, N), mask, drop, return_intermediates=True)
    kept = 1 + N - math.ceil(0.5 * N)  # 9 for N = 16, 8 for N = 15
    assert seen == [(3, kept, 32)]
    assert inter["encoder_output"].shape == (3, kept, 32)
    assert logits.shape == (3, N, K)  # codebook only: class and mask ids are never predicted
    seen.clear()
    model.encode(tokens(3, N))  # no mask, no drop: everything
    assert seen == [(3, 1 + N, 32)]


def test_encoder_input_positions_added_before_dropping():
    model = tiny().eval()
    N = 16
    tok = tokens(2, N)
    mask, drop = masks(2, N, 0.75)
    _, inter = model(tok, mask, drop, return_intermediates=True)
    ids = torch.cat([torch.full((2, 1), FAKE), tok.masked_fill(mask, MASK_ID)], dim=1)
    emb = model.token_emb
    full = F.layer_norm(
        emb.word_embeddings.weight[ids] + emb.position_embeddings.weight[: N + 1], (32,),
        emb.LayerNorm.weight, emb.LayerNorm.bias, 1e-6,
    )
    keep = torch.cat([torch.ones(2, 1, dtype=torch.bool), ~drop], dim=1)
    torch.testing.assert_close(inter["encoder_input"], full[keep].view(2, -1, 32))


def test_decoder_input_is_class_feature_at_every_masked_position():
    model = tiny().eval()
    N = 16
    mask, drop = masks(2, N, 0.8)
    assert (mask & ~drop).any()  # some masked tokens are kept (and must be overwritten too)
    _, inter = model(tokens(2, N), mask, drop, return_intermediates=True)
    enc, dec_in = inter["encoder_output"], inter["decoder_input"]
    projected = model.decoder_embed(enc)  # (B, kept, dec)
    cls = projected[:, 0]
    torch.testing.assert_close(inter["pad"][:, 0], cls)
    image = dec_in[:, 1:]
    for b in range(2):
        torch.testing.assert_close(image[b][mask[b]], cls[b].expand(int(mask[b].sum()), -1))
        kept_visible = projected[b, 1:][~mask[b][~drop[b]]]  # kept tokens in order; visible ones
        torch.testing.assert_close(image[b][~mask[b]], kept_visible)
    torch.testing.assert_close(dec_in[:, 0], cls)


def test_pad_with_learned_mask_token():
    model = tiny(pad_with="mask_token").eval()
    mask, drop = masks(2, 16, 0.6)
    _, inter = model(tokens(2, 16), mask, drop, return_intermediates=True)
    image = inter["decoder_input"][:, 1:]
    torch.testing.assert_close(image[mask], model.mask_token[0, 0].expand(int(mask.sum()), -1))
    assert model.mask_token.shape == (1, 1, 24)
    assert "mask_token" not in dict(tiny().named_parameters())


def test_no_gradient_into_word_embedding_through_head():
    N = 16
    tok = tokens(2, N)
    mask, drop = masks(2, N, 0.6)
    unused = sorted(set(range(K)) - set(tok[~mask].tolist()))[0]  # never an input id
    model = tiny().eval()
    model(tok, mask, drop)[..., unused].sum().backward()
    grad = model.token_emb.word_embeddings.weight.grad
    assert grad[unused].abs().sum() == 0  # the head uses E detached
    assert grad[MASK_ID].abs().sum() > 0 and grad[FAKE].abs().sum() > 0  # input path still trains E
    assert model.mlm_layer.fc.weight.grad.abs().sum() > 0
    # Control: the same computation without the detach does reach E (so the test can fail).
    model.zero_grad()
    model.mlm_layer.detach_embedding = False
    model(tok, mask, drop)[..., unused].sum().backward()
    assert model.token_emb.word_embeddings.weight.grad[unused].abs().sum() > 0


def test_generation_call_without_drop_and_masked_ids_in_input():
    model = tiny().eval()
    tok = torch.full((2, 16), MASK_ID)  # a decoding start: everything masked, ids already the mask id
    mask = torch.ones(2, 16, dtype=torch.bool)
    out = model(tok, mask, None)
    assert out.shape == (2, 16, K)
    # Every position sees the same inputs except its decoder position: outputs differ by position only.
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_masked_token_values_do_not_matter():
    model = tiny().eval()
    tok = tokens(2, 16)
    mask, drop = masks(2, 16, 0.7)
    other = torch.where(mask, (tok + 3) % K, tok)
    torch.testing.assert_close(model(tok, mask, drop), model(other, mask, drop), rtol=0, atol=0)


def test_encode_features_matches_official_linear_probe_pooling():
    model = tiny().eval()
    tok = tokens(3, 16)
    feats = model.encode_features(tok)
    hidden = model.encode(tok, final_norm=False)  # output of the last block, before `norm`
    pooled = hidden[:, 1:].mean(1)  # class slot excluded
    expected = (pooled - pooled.mean(-1, keepdim=True)) / torch.sqrt(pooled.var(-1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(feats, expected)
    assert feats.shape == (3, 32)
    with_norm = model.encode_features(tok, norm="encoder")
    assert not torch.allclose(with_norm, feats)
    _, inter = model(tok, None, None, return_intermediates=True)
    after_one = model.blocks[0](inter["encoder_input"])[:, 1:].mean(1)
    torch.testing.assert_close(model.encode_features(tok, layer=1), F.layer_norm(after_one, (32,), eps=1e-6))
    assert not torch.allclose(model.encode_features(tok, layer=1), feats)
    with pytest.raises(ValueError, match="plain, encoder"):
        model.encode_features(tok, norm="batch")


def test_continuous_input_mode():
    model = tiny(input_mode="continuous", continuous_dim=5).eval()
    feats = torch.randn(2, 16, 5, generator=torch.Generator().manual_seed(0))
    mask, drop = masks(2, 16, 0.6)
    out = model(None, mask, drop, continuous=feats)
    assert out.shape == (2, 16, K)
    changed_masked = feats.clone()
    changed_masked[mask] += 1.0  # masked positions use the mask embedding, not the features
    torch.testing.assert_close(model(None, mask, drop, continuous=changed_masked), out, rtol=0, atol=0)
    changed_visible = feats.clone()
    changed_visible[~mask] += 1.0
    assert not torch.allclose(model(None, mask, drop, continuous=changed_visible), out)
    with pytest.raises(ValueError, match="continuous_dim"):
        tiny(input_mode="continuous")
    with pytest.raises(ValueError, match="continuous"):
        model(None, mask, drop)
    with pytest.raises(ValueError, match="input_mode='tokens'"):
        tiny()(tokens(2, 16), mask, drop, continuous=feats)


def test_validation_of_mask_and_drop():
    model = tiny()
    tok = tokens(2, 16)
    mask, drop = masks(2, 16, 0.6)
    with pytest.raises(ValueError, match="subset"):
        model(tok, mask & ~drop, drop)  # dropped but not masked
    uneven = drop.clone()
    uneven[0, (~drop[0]).nonzero()[0]] = True
    with pytest.raises(ValueError, match="same number"):
        model(tok, mask | uneven, uneven)
    with pytest.raises(ValueError, match="shape"):
        model(tok, mask[:, :8], drop)
    with pytest.raises(TypeError, match="bool"):
        model(tok, mask.long(), drop)
    with pytest.raises(ValueError, match="n_positions"):
        model(tokens(2, 17), None, None)
    with pytest.raises(ValueError, match="fake_class_id"):
        tiny(fake_class_id=MASK_ID)
    with pytest.raises(ValueError, match="fake_class_id"):
        tiny(fake_class_id=K - 1)
    with pytest.raises(ValueError, match="cls, mask_token"):
        tiny(pad_with="zeros")
    with pytest.raises(ValueError, match="tokens, continuous"):
        tiny(input_mode="pixels")


def test_uses_the_shared_pre_ln_block_and_official_eps():
    model = tiny()
    assert all(isinstance(b, PreLNBlock) for b in [*model.blocks, *model.decoder_blocks])
    assert model.token_emb.LayerNorm.eps == model.norm.eps == model.decoder_norm.eps == 1e-6
    assert model.mlm_layer.ln.eps == 1e-5  # MlmLayer's nn.LayerNorm default
    assert model.mlm_layer.detach_embedding
    assert model.blocks[0].mlp.fc1.out_features == 4 * 32
    assert torch.equal(model.mlm_layer.bias, torch.zeros(VOCAB))


def test_bf16_autocast_forward_and_backward():
    model = tiny()
    mask, drop = masks(2, 16, 0.7)
    tok = tokens(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tok, mask, drop)
        loss = masked_token_loss(logits, tok, mask, reduction="token_mean")
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].attn.qkv.weight.grad is not None


# -- heads and losses -----------------------------------------------------------------------------


def test_mlm_head_slices_and_detaches():
    head = MLMHead(6, 4, 10, ln_eps=1e-5, detach_embedding=True)
    emb = torch.randn(10, 4, requires_grad=True)
    out = head(torch.randn(3, 6), emb, n_out=7)
    assert out.shape == (3, 7)
    out.sum().backward()
    assert emb.grad is None
    full = MLMHead(6, 4, 10)(torch.randn(3, 6), emb)
    assert full.shape == (3, 10)


def test_projection_head_shapes():
    head = ProjectionHead(32)
    assert head(torch.randn(5, 32)).shape == (5, 256)
    assert head.fc1.out_features == 2048
    assert ProjectionHead(8, hidden=16, out=4)(torch.randn(2, 8)).shape == (2, 4)


def test_info_nce_equals_hand_computation_on_three_samples():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    z2 = torch.tensor([[2.0, 0.5], [0.5, 1.0], [-1.0, 1.0]])
    tau = 0.5
    z = [v / v.norm() for v in [*z1, *z2]]  # 6 anchors, anchor i's positive is (i + 3) % 6
    total = 0.0
    for i in range(6):
        sims = {j: float(z[i] @ z[j]) / tau for j in range(6) if j != i}
        pos = (i + 3) % 6
        total += -sims[pos] + math.log(sum(math.exp(s) for s in sims.values()))
    expected = total / 6  # mean over the 2B anchors
    assert info_nce(z1, z2, tau).item() == pytest.approx(expected, rel=1e-6)
    assert info_nce(z2, z1, tau).item() == pytest.approx(expected, rel=1e-6)
    assert info_nce(3 * z1, z2, tau).item() == pytest.approx(expected, rel=1e-6)  # scale-invariant
    with pytest.raises(ValueError, match="at least 2"):
        info_nce(z1[:1], z2[:1])
    with pytest.raises(ValueError, match="temperature"):
        info_nce(z1, z2, 0.0)


def _smoothed_ce(logits, target, eps):
    logp = logits.log_softmax(-1)
    return (1 - eps) * -logp[target] + eps * -logp.mean()


def test_masked_token_loss_reductions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g)
    targets = torch.randint(0, 5, (2, 4), generator=g)
    mask = torch.tensor([[True, False, False, False], [True, True, True, False]])
    per = [[_smoothed_ce(logits[b, n], targets[b, n], 0.1) for n in range(4) if mask[b, n]] for b in range(2)]
    per_sample = (sum(per[0]) / 1 + sum(per[1]) / 3) / 2  # MaskGIT: per sample, then batch
    token_mean = (sum(per[0]) + sum(per[1])) / 4  # MAGE: over all masked tokens
    assert masked_token_loss(logits, targets, mask).item() == pytest.approx(float(per_sample), rel=1e-6)
    assert masked_token_loss(logits, targets, mask, reduction="token_mean").item() == pytest.approx(
        float(token_mean), rel=1e-6
    )
    assert abs(float(per_sample) - float(token_mean)) > 1e-3  # the two differ with unequal counts
    # Equal counts per sample: the two reductions agree, and equal F.cross_entropy on the masked tokens.
    equal = torch.tensor([[True, False, True, False], [False, True, True, False]])
    a = masked_token_loss(logits, targets, equal)
    b = masked_token_loss(logits, targets, equal, reduction="token_mean")
    ref = F.cross_entropy(logits[equal], targets[equal], label_smoothing=0.1)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, ref)
    # Without smoothing it is the plain NLL.
    plain = masked_token_loss(logits, targets, equal, label_smoothing=0.0)
    torch.testing.assert_close(plain, F.cross_entropy(logits[equal], targets[equal]))


def test_masked_token_loss_errors():
    logits, targets = torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match="every sample"):
        masked_token_loss(logits, targets, mask)
    assert torch.isfinite(masked_token_loss(logits, targets, mask, reduction="token_mean"))
    with pytest.raises(ValueError, match="no masked token"):
        masked_token_loss(logits, targets, torch.zeros(2, 3, dtype=torch.bool), reduction="token_mean")
    with pytest.raises(ValueError, match="per_sample_mean, token_mean"):
        masked_token_loss(logits, targets, mask, reduction="sum")
    with pytest.raises(ValueError, match="expected"):
        masked_token_loss(logits[0], targets, mask)


def test_encoder_only_has_no_decoder_and_pools_image_tokens():
    torch.manual_seed(0)
    full = tiny(dropout=0.0).eval()
    enc = tiny(dropout=0.0, encoder_only=True).eval()
    keys = set(enc.state_dict())
    assert keys < set(full.state_dict())
    assert not any(k.startswith(("decoder", "mlm_layer", "mask_token")) for k in keys)
    enc.load_state_dict({k: full.state_dict()[k] for k in keys})
    t = torch.randint(0, K, (3, 16))
    raw = full.encode(t, final_norm=False)
    torch.testing.assert_close(enc.pool(t), raw[:, 1:].mean(1))  # class slot excluded, no final norm
    torch.testing.assert_close(enc.encode_features(t), full.encode_features(t))
    with pytest.raises(RuntimeError, match="encoder_only"):
        enc(t, torch.zeros(3, 16, dtype=torch.bool))
