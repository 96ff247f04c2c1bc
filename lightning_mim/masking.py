"""Masking math shared by MaskGIT and MAGE: mask schedules, masked counts, random masks, ratios.

Pure torch; randomness comes only from an explicit `torch.Generator` (None = global RNG), whose
device must match the `device` argument (a CPU generator cannot draw CUDA tensors).

Reference: docs/FIDELITY.md "Mask schedules", "MaskGIT training", "MAGE", "Float32 counts"; the
official code is `maskgit/libml/mask_schedule.py` and `models_mage.py` (LTH14/mage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from lightning_mim.settings import (
    NEEDS_N_TOKENS,
    SCHEDULE_ALIASES,
    RatioSettings,
    SCHEDULE_NAMES,
    canonical_schedule_name,
    schedule_exponent,
    validated,
)

__all__ = [
    "SCHEDULES",
    "SCHEDULE_NAMES",
    "NEEDS_N_TOKENS",
    "gamma",
    "canonical_schedule_name",
    "validate_schedule",
    "num_masked",
    "rank_noise",
    "mask_from_ranks",
    "random_mask",
    "mask_tokens",
    "MASK_MODES",
    "resolve_device",
    "ScheduleRatio",
    "TruncGaussRatio",
    "UniformRatio",
    "FixedRatio",
]

# γ is clipped to [EPS, 1] as in the official code, so even r -> 1 masks a (tiny) positive fraction.
GAMMA_EPS = 1e-6

Number = Union[int, float]
ScheduleFn = Callable[[Tensor, Optional[Tensor]], Tensor]


# ---------------------------------------------------------------------------------------------
# Mask schedules γ(r): r ∈ [0, 1] -> fraction of tokens masked.  All math in float32 (the official
# JAX code runs in float32; it matters: cos(π/3) is just below 0.5 there, see decoding tests).
# ---------------------------------------------------------------------------------------------
def _pow(r: Tensor, n: Optional[Tensor], exponent: float) -> Tensor:
    return 1.0 - r**exponent


def _cosine(r: Tensor, n: Optional[Tensor]) -> Tensor:
    return torch.cos(torch.tensor(math.pi / 2, dtype=torch.float32, device=r.device) * r)


def _arccos(r: Tensor, n: Optional[Tensor]) -> Tensor:
    # valeoai's MaskGIT-pytorch reimplementation: arccos(r) / (π/2). Not in the official code;
    # it masks more than cosine at every r (more weight on hard, high-ratio training examples).
    return torch.arccos(r) / torch.tensor(math.pi / 2, dtype=torch.float32, device=r.device)


def _log(r: Tensor, n: Optional[Tensor]) -> Tensor:
    # −log2(r) / log2(N). N < 2 makes log2(N) <= 0 (division by zero / sign flip): we use N >= 2;
    # with one unknown token the decode's clamps decide the count anyway.
    return -torch.log2(r) / torch.log2(n.clamp(min=2))


def _exp(r: Tensor, n: Optional[Tensor]) -> Tensor:
    # 1 − 2^(−log2(N)·(1 − r)); N = 0 would give log2(0) = −inf and NaN at r = 1, so N >= 1.
    return 1.0 - torch.exp2(-torch.log2(n.clamp(min=1)) * (1.0 - r))


_linear = partial(_pow, exponent=1.0)
_square = partial(_pow, exponent=2.0)
_cubic = partial(_pow, exponent=3.0)
_sqrt = partial(_pow, exponent=0.5)

# Every accepted schedule name -> its function. The names and their rules are `lightning_mim.settings`'
# (SCHEDULE_NAMES, SCHEDULE_ALIASES: the official google-research/maskgit names map to the same function
# objects); any other `powX` (X a float, e.g. `pow1.5`) is parsed on the fly.
_FUNCTIONS: dict[str, ScheduleFn] = {
    "linear": _linear,
    "square": _square,
    "cubic": _cubic,
    "sqrt": _sqrt,
    "cosine": _cosine,
    "log": _log,
    "exp": _exp,
    "arccos": _arccos,
}
SCHEDULES: dict[str, ScheduleFn] = {**_FUNCTIONS, **{alias: _FUNCTIONS[c] for alias, c in SCHEDULE_ALIASES.items()}}


def _lookup(name: str) -> tuple[str, ScheduleFn]:
    """(canonical name, function) of a schedule name; ValueError listing the valid names."""
    canonical = canonical_schedule_name(name)
    if canonical in _FUNCTIONS:
        return canonical, _FUNCTIONS[canonical]
    return canonical, partial(_pow, exponent=schedule_exponent(name))


def validate_schedule(name: str, n_tokens: Optional[int] = None) -> str:
    """Check a schedule name (and that `log`/`exp` get N) early, e.g. in a constructor; returns the canonical name."""
    canonical = _lookup(name)[0]
    if canonical in NEEDS_N_TOKENS and n_tokens is None:
        raise ValueError(f"mask schedule {name!r} depends on the number of tokens: pass n_tokens")
    return canonical


def gamma(name: str, r: Union[Tensor, Number], n_tokens: Union[int, Tensor, None] = None) -> Tensor:
    """γ(r) of schedule `name`, in float32, clipped to [1e-6, 1].

    `r` in [0, 1] (training: r ~ U[0,1); decoding: r = (t+1)/T). `n_tokens` (N, the number of
    unknown tokens; an int or a tensor broadcastable with r, e.g. per sample) is required by
    `log` and `exp` and ignored by the others.
    """
    canonical, fn = _lookup(name)
    device = r.device if isinstance(r, Tensor) else n_tokens.device if isinstance(n_tokens, Tensor) else None
    r = torch.as_tensor(r, device=device).to(torch.float32)
    n: Optional[Tensor] = None
    if canonical in NEEDS_N_TOKENS:
        if n_tokens is None:
            raise ValueError(f"mask schedule {name!r} depends on the number of tokens: pass n_tokens")
        n = torch.as_tensor(n_tokens, device=r.device).to(torch.float32)
    return fn(r, n).clamp(GAMMA_EPS, 1.0)


# ---------------------------------------------------------------------------------------------
# Counts and masks
# ---------------------------------------------------------------------------------------------
def num_masked(ratio: Union[Tensor, Number], n_tokens: int) -> Tensor:
    """⌈ratio·N⌉ as int64, clamped to [0, N]: ratio 0 masks nothing, ratio 1 masks all N.

    The product is taken in float32 (like the official MaskGIT decode, and because our ratios are
    float32): float32(0.3)·10 rounds to exactly 3.0 in float32 -> 3, whereas promoting the float32
    ratio to float64 first would give ⌈3.0000001⌉ = 4. (MAGE's numpy code draws a float64 ratio;
    the two differ only when ratio·N is within ~1e-7 of an integer.)
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    device = ratio.device if isinstance(ratio, Tensor) else None
    ratio = torch.as_tensor(ratio, device=device).to(torch.float32)
    n = torch.ceil(ratio * torch.tensor(float(n_tokens), dtype=torch.float32, device=ratio.device))
    return n.to(torch.int64).clamp(0, n_tokens)


def rank_noise(
    batch: int,
    n_tokens: int,
    generator: Optional[torch.Generator] = None,
    device: Union[torch.device, str, None] = None,
) -> Tensor:
    """A uniformly random permutation rank per row, (B, N) int64 in [0, N).

    MAE/MAGE style: argsort of uniform noise. `mask_from_ranks(ranks, n)` then takes the n lowest
    ranks, so masks built with different counts from ONE ranking are nested (MAGE: dropped ⊆ masked).
    Ranks have no ties, unlike MAGE's `noise <= cutoff` (which re-draws noise on a tie).
    """
    device = resolve_device(device, generator)
    noise = torch.rand(batch, n_tokens, generator=generator, device=device)
    return torch.argsort(torch.argsort(noise, dim=1), dim=1)


def mask_from_ranks(ranks: Tensor, n: Union[Tensor, int]) -> Tensor:
    """(B, N) bool: True where rank < n (per-sample n as a (B,) tensor, or one int for all)."""
    n = torch.as_tensor(n, device=ranks.device)
    if n.dim() == 0:
        return ranks < n
    if n.shape != ranks.shape[:1]:
        raise ValueError(f"n must be a scalar or have shape ({ranks.shape[0]},), got {tuple(n.shape)}")
    return ranks < n[:, None]


def random_mask(
    batch: int,
    n_tokens: int,
    n_masked: Union[Tensor, int],
    generator: Optional[torch.Generator] = None,
    device: Union[torch.device, str, None] = None,
) -> Tensor:
    """(B, N) bool with exactly n_masked[b] uniformly random True positions in row b."""
    n_masked = torch.as_tensor(n_masked)
    if n_masked.dim() == 0:
        n_masked = n_masked.expand(batch)
    if n_masked.shape != (batch,):
        raise ValueError(f"n_masked must be a scalar or have shape ({batch},), got {tuple(n_masked.shape)}")
    if bool((n_masked < 0).any()) or bool((n_masked > n_tokens).any()):
        raise ValueError(f"n_masked must lie in [0, {n_tokens}], got {n_masked.tolist()}")
    ranks = rank_noise(batch, n_tokens, generator, device)
    return mask_from_ranks(ranks, n_masked.to(ranks.device))


MASK_MODES = ("exact", "bernoulli")


def mask_tokens(
    tokens: Tensor,
    ratio: Union[Tensor, Number],
    mask_id: int,
    generator: Optional[torch.Generator] = None,
    mode: str = "exact",
) -> tuple[Tensor, Tensor]:
    """Replace a random subset of tokens (B, N) by `mask_id`; returns (masked_tokens, mask (B, N) bool).

    mode "exact" (official MaskGIT/MAGE): exactly ⌈ratio·N⌉ positions per sample, uniformly at
    random. mode "bernoulli" (some reimplementations, e.g. valeoai): each position independently
    with probability ratio, so the count varies around ratio·N (and may be 0).
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, N), got shape {tuple(tokens.shape)}")
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; valid: {', '.join(MASK_MODES)}")
    batch, n_tokens = tokens.shape
    ratio = torch.as_tensor(ratio, device=tokens.device).to(torch.float32)
    if ratio.dim() == 0:
        ratio = ratio.expand(batch)
    if ratio.shape != (batch,):
        raise ValueError(f"ratio must be a float or have shape ({batch},), got {tuple(ratio.shape)}")
    if mode == "exact":
        ranks = rank_noise(batch, n_tokens, generator, tokens.device)
        mask = mask_from_ranks(ranks, num_masked(ratio, n_tokens))
    else:
        mask = torch.rand(batch, n_tokens, generator=generator, device=resolve_device(tokens.device, generator)) < ratio[:, None]
    return tokens.masked_fill(mask, mask_id), mask


def resolve_device(device: Union[torch.device, str, None], generator: Optional[torch.Generator]) -> torch.device:
    """The device to draw on (None: the generator's, else CPU); a clear error when it differs from the generator's."""
    if device is None:
        return generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but tensors are on {device}: "
            f"create it with torch.Generator(device={str(device)!r})"
        )
    return device


# ---------------------------------------------------------------------------------------------
# Masking-ratio distributions (config group `ratio/`). Each is called as
# `dist(batch_size, generator=None, device=None) -> (B,) float32 in [0, 1]`.
# ---------------------------------------------------------------------------------------------
@dataclass
class ScheduleRatio:
    """MaskGIT training: r ~ U[0, 1) per sample, ratio = γ(r). `n_tokens` is needed by log/exp."""

    schedule: str = "cosine"
    n_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        validate_schedule(self.schedule, self.n_tokens)

    def __call__(self, batch_size: int, generator: Optional[torch.Generator] = None, device=None) -> Tensor:
        r = torch.rand(batch_size, generator=generator, device=resolve_device(device, generator))
        return gamma(self.schedule, r, self.n_tokens)


@dataclass
class TruncGaussRatio:
    """MAGE: N(mean, std²) truncated to [low, high] (`scipy.stats.truncnorm`), sampled by inverse CDF.

    x = mean + std·Φ⁻¹(Φ(a) + u·(Φ(b) − Φ(a))), a, b the standardised bounds, u ~ U[0,1) from the
    generator: exact, seeded and on-device. Defaults are MAGE's (mean 0.55, std 0.25, [0.5, 1]);
    the truncated mean is then 0.694. MAGE draws ONE ratio per step (per_sample=False: every
    sample of the batch gets the same value); per_sample=True draws one per sample.
    """

    mean: float = 0.55
    std: float = 0.25
    low: float = 0.5
    high: float = 1.0
    per_sample: bool = False

    def __post_init__(self) -> None:
        validated(RatioSettings, {"mean": self.mean, "std": self.std, "low": self.low, "high": self.high}, "ratio")
        if not self.low < self.high:
            raise ValueError(f"ratio.low={self.low}: must be < ratio.high={self.high} (a truncated Gaussian needs an interval)")
        a, b = (self.low - self.mean) / self.std, (self.high - self.mean) / self.std
        self._cdf_a, self._cdf_b = _norm_cdf(a), _norm_cdf(b)
        if not self._cdf_b > self._cdf_a:
            raise ValueError(
                f"TruncGaussRatio: [low, high] = [{self.low}, {self.high}] lies too far in the tail of "
                f"N({self.mean}, {self.std}²) to sample"
            )

    def __call__(self, batch_size: int, generator: Optional[torch.Generator] = None, device=None) -> Tensor:
        device = resolve_device(device, generator)
        u = torch.rand(batch_size if self.per_sample else 1, generator=generator, device=device)
        p = self._cdf_a + u * (self._cdf_b - self._cdf_a)
        x = (self.mean + self.std * torch.special.ndtri(p)).clamp(self.low, self.high)
        return x if self.per_sample else x.expand(batch_size).clone()


@dataclass
class UniformRatio:
    """Ratio ~ U[low, high), one per sample (per_sample=True) or one per batch."""

    low: float = 0.5
    high: float = 1.0
    per_sample: bool = True

    def __post_init__(self) -> None:
        validated(RatioSettings, {"low": self.low, "high": self.high}, "ratio")

    def __call__(self, batch_size: int, generator: Optional[torch.Generator] = None, device=None) -> Tensor:
        u = torch.rand(batch_size if self.per_sample else 1, generator=generator, device=resolve_device(device, generator))
        x = self.low + (self.high - self.low) * u
        return x if self.per_sample else x.expand(batch_size).clone()


@dataclass
class FixedRatio:
    """A constant ratio (MAGE's fixed-ratio ablation baselines)."""

    value: float = 0.75

    def __post_init__(self) -> None:
        validated(RatioSettings, {"value": self.value}, "ratio")

    def __call__(self, batch_size: int, generator: Optional[torch.Generator] = None, device=None) -> Tensor:
        return torch.full((batch_size,), float(self.value), dtype=torch.float32, device=resolve_device(device, generator))


def _norm_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))
