"""The MaskGIT tokenizer architecture (docs/FIDELITY.md "MaskGIT tokenizer"): shapes, layout, quirks, API."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_mim.nn.vqgan import VQGAN, ChannelNorm, ResBlock, group_norm, norm_factory, official_maskgit_f16_config

TINY = dict(base_channels=16, channel_multipliers=[1, 2, 4], num_res_blocks=1, codebook_size=64, code_dim=16, norm_groups=8)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.parametrize(
    "kwargs, image, grid",
    [
        (TINY, 32, 8),  # f=4, the digits preset
        (dict(base_channels=8, channel_multipliers=[1, 2], num_res_blocks=2, codebook_size=32, code_dim=4, norm_groups=4), 16, 8),
        (dict(base_channels=8, channel_multipliers=[1, 1, 2, 2], num_res_blocks=1, codebook_size=256, code_dim=8, norm_groups=8), 64, 8),
        (dict(base_channels=8, channel_multipliers=[1], num_res_blocks=1, codebook_size=16, code_dim=4, norm_groups=8), 12, 12),
    ],
)
def test_shapes_for_several_configurations(kwargs, image, grid):
    torch.manual_seed(0)
    m = VQGAN(**kwargs)
    x = torch.rand(2, 3, image, image)
    recon, vq_loss, indices = m(x)
    assert recon.shape == x.shape
    assert vq_loss.ndim == 0
    assert indices.shape == (2, grid, grid) and indices.dtype == torch.int64
    assert int(indices.min()) >= 0 and int(indices.max()) < kwargs["codebook_size"]
    assert m.downsample_factor == image // grid
    assert m.grid_size(image) == grid and m.grid_size((image, 2 * image)) == (grid, 2 * grid)
    assert m.codebook_size == kwargs["codebook_size"] and m.code_dim == kwargs["code_dim"]
    m.eval()
    tokens = m.encode_to_indices(x)
    assert tokens.shape == (2, grid, grid)
    assert m.decode_indices(tokens).shape == x.shape
    assert m.decode_indices(tokens.flatten(1)).shape == x.shape  # (B, N) square sequences are accepted


def test_official_configuration_matches_the_paper():
    m = VQGAN(**official_maskgit_f16_config())
    assert m.downsample_factor == 16 and m.grid_size(256) == 16
    assert m.codebook_size == 1024 and m.code_dim == 256
    n = sum(p.numel() for p in m.parameters())
    assert n == 54_515_587  # "54.5 M params"
    assert len(m.state_dict()) == 168
    assert not any(isinstance(mod, torch.nn.MultiheadAttention) for mod in m.modules())
    assert m.encoder.conv_in.bias is None and m.decoder.conv_in.bias is not None
    assert all(g.eps == 1e-6 and g.num_groups == 32 for g in m.modules() if isinstance(g, torch.nn.GroupNorm))
    x = torch.rand(1, 3, 32, 32)
    recon, _, idx = m(x)
    assert recon.shape == x.shape and idx.shape == (1, 2, 2)


def test_resblock_shortcut_is_applied_to_the_output():
    torch.manual_seed(0)
    block = ResBlock(8, 16, norm_factory("group", 4, 1e-6))
    assert block.nin_shortcut.weight.shape == (16, 16, 1, 1)  # (out, out): it sees h, not x
    x = torch.randn(2, 8, 5, 5)
    h = block.conv1(F.silu(block.norm1(x)))
    h = block.conv2(F.silu(block.norm2(h)))
    torch.testing.assert_close(block(x), block.nin_shortcut(h) + h)
    same = ResBlock(8, 8, norm_factory("group", 4, 1e-6))
    assert not hasattr(same, "nin_shortcut")
    h = same.conv2(F.silu(same.norm2(same.conv1(F.silu(same.norm1(x))))))
    torch.testing.assert_close(same(x), x + h)


def test_downsampling_is_average_pooling_and_upsampling_is_nearest_plus_conv():
    m = VQGAN(**TINY)
    down = m.encoder.down[0].downsample
    x = torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    assert not list(down.parameters())
    up = m.decoder.up[1].upsample
    y = torch.randn(1, up.conv.in_channels, 3, 3)
    torch.testing.assert_close(up(y), up.conv(F.interpolate(y, scale_factor=2, mode="nearest")))
    assert not hasattr(m.decoder.up[0], "upsample") and not hasattr(m.encoder.down[2], "downsample")


def test_group_norm_adapts_to_tiny_widths_and_rejects_bad_ones():
    assert group_norm(16, 32, 1e-6).num_groups == 16
    assert group_norm(64, 32, 1e-6).num_groups == 32
    with pytest.raises(ValueError, match=r"48 channels cannot be split into 32 groups.*divisors of 48"):
        group_norm(48, 32, 1e-6)
    with pytest.raises(ValueError, match="norm_groups"):
        VQGAN(base_channels=24, channel_multipliers=[1, 2], num_res_blocks=1, codebook_size=8, code_dim=4, norm_groups=16)


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    m = VQGAN(**TINY)
    x = torch.rand(2, 3, 32, 32)
    recon, vq_loss, _ = m(x)
    F.mse_loss(recon, x).backward()  # reconstruction only: the encoder is reached through z_q = z + sg(e - z)
    assert m.encoder.conv_in.weight.grad is not None
    assert m.encoder.conv_in.weight.grad.abs().sum() > 0
    assert m.quantize.embedding.weight.grad is None or m.quantize.embedding.weight.grad.abs().sum() == 0


def test_decode_clamps_only_when_asked():
    torch.manual_seed(0)
    m = VQGAN(**TINY).eval()
    with torch.no_grad():
        m.decoder.conv_out.bias.fill_(5.0)  # push the output outside [0, 1]
    tokens = torch.zeros(1, 8, 8, dtype=torch.long)
    assert m.decode_indices(tokens).max() > 1.0
    assert m.decode_indices(tokens, clamp=True).max() == 1.0


def test_bf16_autocast_keeps_quantisation_in_float32():
    torch.manual_seed(0)
    m = VQGAN(**TINY).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, loss, idx = m(x)
    assert idx.shape == (2, 8, 8) and loss.dtype == torch.float32 and torch.isfinite(recon).all()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="valid: .*restart_after"):
        VQGAN(**{**TINY, "quantizer": {"restart": 3}})
    m = VQGAN(**TINY)
    with pytest.raises(ValueError, match="not divisible by the downsample factor 4"):
        m.encode(torch.rand(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="square grid"):
        m.decode_indices(torch.zeros(1, 10, dtype=torch.long))


def test_channel_norm_is_per_pixel_and_keeps_codes_local():
    """`norm="channel"`: normalising one pixel's channels must not depend on any other pixel, which
    GroupNorm does (it pools statistics over the whole map)."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 4, 4)
    y = x.clone()
    y[..., 3, 3] += 10.0  # change one far-away pixel
    channel, group = ChannelNorm(8, 1e-6), group_norm(8, 4, 1e-6)
    assert torch.allclose(channel(x)[..., 0, 0], channel(y)[..., 0, 0])
    assert not torch.allclose(group(x)[..., 0, 0], group(y)[..., 0, 0])
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,), eps=1e-6).permute(0, 3, 1, 2)
    assert torch.allclose(channel(x), ref, atol=1e-6)
    a = VQGAN(base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1, codebook_size=16, code_dim=4, norm_groups=4)
    b = VQGAN(base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1, codebook_size=16, code_dim=4, norm_groups=4, norm="channel")
    assert a.state_dict().keys() == b.state_dict().keys()  # same checkpoint layout
    with pytest.raises(ValueError, match="unknown norm 'batch'; valid: group, channel"):
        VQGAN(base_channels=8, channel_multipliers=[1, 2], norm="batch")
