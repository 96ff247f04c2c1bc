"""The MaskGIT tokenizer (VQGAN without attention), one class from a 32x32 toy to the official f=16.

Architecture (docs/FIDELITY.md "MaskGIT tokenizer"; MaskGIT `nets/vqgan_tokenizer.py`, MAGE `taming/`):

    encoder: conv3x3 (no bias) -> for each level: `num_res_blocks` ResBlocks, 2x2 average pool
             (not after the last level) -> 2 mid ResBlocks -> GroupNorm -> swish -> conv1x1 (bias)
    quantize: nearest code (see `quantizer.py`)
    decoder: conv3x3 (bias) -> 2 mid ResBlocks -> for each level, coarsest first: ResBlocks,
             nearest x2 upsample + conv3x3 (bias) (not after the finest level)
             -> GroupNorm -> swish -> conv3x3 (bias) to RGB

ResBlock: GN -> swish -> conv3x3 (no bias) -> GN -> swish -> conv3x3 (no bias); when channels
change, a 1x1 shortcut conv (out, out) is applied to the block's *output* h, not to its input
(the upstream quirk; needed to load the official weights).

Parameter names are the official ones (`encoder.down.{i}.block.{j}.norm1`, `decoder.up.{i}.upsample.conv`,
`quantize.embedding.weight`, ...), so MAGE's `vqgan_jax_strongaug.ckpt` loads with no renaming.

Images go in and come out in [0, 1] (the official tokenizer takes [0, 1]); `decode*` does not clamp
unless asked (`clamp=True`): the raw output is what the official code returns before its `np.clip`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mim.nn.quantizer import QuantizerOutput, VectorQuantizer
from lightning_mim.tokens import downsample_factor


def official_maskgit_f16_config() -> dict[str, Any]:
    """VQGAN kwargs of the official MaskGIT tokenizer (MAGE's `vqgan_jax_strongaug.ckpt`): 54.5 M params."""
    return dict(
        in_channels=3,
        out_channels=3,
        base_channels=128,
        channel_multipliers=[1, 1, 2, 2, 4],
        num_res_blocks=2,
        codebook_size=1024,
        code_dim=256,
        norm_groups=32,
        norm_eps=1e-6,
        quantizer={},
    )


def group_norm(channels: int, groups: int, eps: float) -> nn.GroupNorm:
    """GroupNorm with `min(groups, channels)` groups; a width not divisible by that is an error.

    Tiny widths (e.g. 16 channels) adapt to one channel per group instead of failing; widths like 48
    with 32 groups are rejected with the valid choices, since silently changing the grouping would
    change what a config means.
    """
    g = min(groups, channels)
    if channels % g != 0:
        valid = [d for d in range(1, channels + 1) if channels % d == 0]
        raise ValueError(
            f"GroupNorm: {channels} channels cannot be split into {g} groups; "
            f"set norm_groups to a divisor of every width (divisors of {channels}: {valid})"
        )
    return nn.GroupNorm(g, channels, eps=eps, affine=True)


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each pixel separately (`norm="channel"`).

    GroupNorm normalises over the whole feature map, so on tiny images (32x32 digits, an 8x8 latent
    grid) a background cell's features shift with how much ink the rest of the image has, and the
    quantiser spreads plain background over several codes chosen by global statistics: tokens a
    stage-2 model cannot predict from their neighbours. A per-pixel norm keeps every code a function
    of its receptive field only. Parameters are named `weight` / `bias` like GroupNorm's.
    """

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


NORMS = ("group", "channel")


def norm_factory(kind: str, groups: int, eps: float) -> Callable[[int], nn.Module]:
    """channels -> a fresh norm layer: `group` (official GroupNorm) or `channel` (see ChannelNorm)."""
    if kind == "group":
        return lambda channels: group_norm(channels, groups, eps)
    if kind == "channel":
        return lambda channels: ChannelNorm(channels, eps)
    raise ValueError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")


class ResBlock(nn.Module):
    """GN-swish-conv x2 with the official shortcut-on-output quirk when channels change."""

    def __init__(self, in_channels: int, out_channels: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(h)  # applied to h, not x: upstream quirk (see module docstring)
        return x + h


class Downsample(nn.Module):
    """2x2 average pooling (MaskGIT: `conv_downsample=False`); no parameters."""

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3 (with bias), as in the official decoder."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level; exists so parameter names read `down.{i}.block.{j}` / `up.{i}.upsample`."""

    def __init__(self, blocks: list[ResBlock], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            self.add_module(name, resample)


class _Mid(nn.Module):
    def __init__(self, channels: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.block_1 = ResBlock(channels, channels, norm)
        self.block_2 = ResBlock(channels, channels, norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    def __init__(
        self,
        in_channels: int,
        base_channels: int,
        channel_multipliers: Sequence[int],
        num_res_blocks: int,
        code_dim: int,
        norm: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        ch = base_channels
        for i, mult in enumerate(channel_multipliers):
            out = base_channels * mult
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, out, norm))
                ch = out
            last = i == len(channel_multipliers) - 1
            self.down.append(_Level(blocks, None if last else Downsample(), "downsample"))
        self.mid = _Mid(ch, norm)
        self.norm_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, code_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self,
        out_channels: int,
        base_channels: int,
        channel_multipliers: Sequence[int],
        num_res_blocks: int,
        code_dim: int,
        norm: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        ch = base_channels * channel_multipliers[-1]
        self.conv_in = nn.Conv2d(code_dim, ch, 3, padding=1)
        self.mid = _Mid(ch, norm)
        levels: list[_Level] = []
        for i in reversed(range(len(channel_multipliers))):
            out = base_channels * channel_multipliers[i]
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, out, norm))
                ch = out
            levels.insert(0, _Level(blocks, Upsample(ch) if i > 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)  # up[0] is the finest level, as in the official code
        self.norm_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGAN(nn.Module):
    """Encoder + vector quantiser + decoder; the stage-2 API is `encode_to_indices` / `decode_indices`.

    Args:
        base_channels: width after `conv_in` (official 128).
        channel_multipliers: one per level; downsample factor = 2 ** (levels - 1) (official [1,1,2,2,4], f=16).
        num_res_blocks: ResBlocks per level (official 2; the mid stage always has 2).
        codebook_size, code_dim: K and D of the codebook (official 1024, 256).
        norm_groups, norm_eps: GroupNorm settings (official 32, 1e-6); see `group_norm` for tiny widths.
        norm: "group" (official) or "channel" (per-pixel LayerNorm, local codes on tiny images; see ChannelNorm).
        quantizer: extra `VectorQuantizer` kwargs (beta, ema, decay, eps, restart_after, l2_normalize).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 128,
        channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        codebook_size: int = 1024,
        code_dim: int = 256,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
        norm: str = "group",
        quantizer: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        channel_multipliers = [int(m) for m in channel_multipliers]
        if not channel_multipliers or min(channel_multipliers) < 1:
            raise ValueError(f"channel_multipliers must be a non-empty list of ints >= 1, got {channel_multipliers}")
        if num_res_blocks < 1 or base_channels < 1:
            raise ValueError(f"num_res_blocks and base_channels must be >= 1, got {num_res_blocks}, {base_channels}")
        quantizer = dict(quantizer or {})
        valid_q = {"beta", "ema", "decay", "eps", "restart_after", "l2_normalize"}
        unknown = set(quantizer) - valid_q
        if unknown:
            raise ValueError(f"unknown quantizer option(s) {sorted(unknown)}; valid: {sorted(valid_q)}")
        self.config: dict[str, Any] = dict(
            in_channels=in_channels,
            out_channels=out_channels,
            base_channels=base_channels,
            channel_multipliers=channel_multipliers,
            num_res_blocks=num_res_blocks,
            codebook_size=codebook_size,
            code_dim=code_dim,
            norm_groups=norm_groups,
            norm_eps=norm_eps,
            norm=norm,
            quantizer=quantizer,
        )
        make_norm = norm_factory(norm, norm_groups, norm_eps)
        arch = (base_channels, channel_multipliers, num_res_blocks, code_dim, make_norm)
        self.encoder = Encoder(in_channels, *arch)
        self.decoder = Decoder(out_channels, *arch)
        self.quantize = VectorQuantizer(codebook_size, code_dim, **quantizer)

    # -- sizes ------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.quantize.codebook_size

    @property
    def code_dim(self) -> int:
        return self.quantize.code_dim

    @property
    def downsample_factor(self) -> int:
        return downsample_factor(self.config["channel_multipliers"])

    def grid_size(self, image_size: int | tuple[int, int]) -> int | tuple[int, int]:
        """Latent grid for an image size: 256 -> 16 for f=16; a (H, W) tuple gives (h, w)."""
        f = self.downsample_factor
        sizes = (image_size,) if isinstance(image_size, int) else tuple(image_size)
        for s in sizes:
            if s % f:
                raise ValueError(f"image size {image_size} is not divisible by the downsample factor {f}")
        return image_size // f if isinstance(image_size, int) else (sizes[0] // f, sizes[1] // f)

    def get_last_layer(self) -> Tensor:
        """Weight of the decoder's last conv: the adaptive GAN weight compares gradients there."""
        return self.decoder.conv_out.weight

    # -- the pieces -------------------------------------------------------------------------
    def _check_images(self, x: Tensor) -> None:
        c = self.config["in_channels"]
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"expected images of shape (B, {c}, H, W), got {tuple(x.shape)}")
        self.grid_size((x.shape[-2], x.shape[-1]))

    def encode(self, x: Tensor) -> Tensor:
        """Continuous latents (B, D, h, w) of images in [0, 1] (before quantisation)."""
        self._check_images(x)
        return self.encoder(x)

    def decode(self, z_q: Tensor, *, clamp: bool = False) -> Tensor:
        """Images from (quantised) latents (B, D, h, w); ~[0, 1], clamped only if `clamp`."""
        x = self.decoder(z_q)
        return x.clamp(0.0, 1.0) if clamp else x

    def quantize_latents(self, z: Tensor) -> QuantizerOutput:
        return self.quantize(z)

    @torch.no_grad()
    def encode_to_indices(self, images: Tensor) -> Tensor:
        """Token grid (B, h, w) int64 of images (B, 3, H, W) in [0, 1]."""
        return self.quantize(self.encode(images)).indices

    @torch.no_grad()
    def decode_indices(self, indices: Tensor, *, clamp: bool = False) -> Tensor:
        """Images (B, 3, H, W) from a token grid (B, h, w); ~[0, 1], not clamped unless `clamp`.

        A flat (B, N) sequence with N a perfect square is accepted too (row-major grid).
        """
        if indices.ndim == 2:
            side = int(round(indices.shape[1] ** 0.5))
            if side * side != indices.shape[1]:
                raise ValueError(f"cannot reshape {indices.shape[1]} tokens into a square grid; pass (B, h, w)")
            indices = indices.view(indices.shape[0], side, side)
        if indices.ndim != 3:
            raise ValueError(f"expected indices of shape (B, h, w), got {tuple(indices.shape)}")
        return self.decode(self.quantize.embed_indices(indices), clamp=clamp)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """encode -> nearest codes -> decode, clamped to [0, 1] (pictures, metrics)."""
        q = self.quantize(self.encode(images))
        return self.decode(q.z_q, clamp=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction (B,3,H,W) unclamped, quantiser loss (scalar), indices (B,h,w))."""
        q = self.quantize(self.encode(x))
        return self.decode(q.z_q), q.loss, q.indices
