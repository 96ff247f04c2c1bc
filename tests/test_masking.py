"""lightning_mim.masking pinned to docs/FIDELITY.md: schedules, counts, masks, ratio distributions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from lightning_mim import masking
from lightning_mim.masking import (
    SCHEDULE_NAMES,
    SCHEDULES,
    FixedRatio,
    ScheduleRatio,
    TruncGaussRatio,
    UniformRatio,
    canonical_schedule_name,
    gamma,
    mask_from_ranks,
    mask_tokens,
    num_masked,
    random_mask,
    rank_noise,
    resolve_device,
)

CONF = Path(__file__).resolve().parent.parent / "conf"
R = np.array([0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.9, 0.999, 1.0], dtype=np.float64)

# docs/FIDELITY.md "Mask schedules" table, in float64 (γ is computed in float32, compared to 1e-6).
REFERENCE = {
    "linear": lambda r, n: 1 - r,
    "square": lambda r, n: 1 - r**2,
    "cubic": lambda r, n: 1 - r**3,
    "sqrt": lambda r, n: 1 - np.sqrt(r),
    "cosine": lambda r, n: np.cos(np.pi * r / 2),
    "log": lambda r, n: -np.log2(r) / np.log2(n),
    "exp": lambda r, n: 1 - 2 ** (-np.log2(n) * (1 - r)),
    "arccos": lambda r, n: np.arccos(r) / (np.pi / 2),
    "pow1.5": lambda r, n: 1 - r**1.5,
}
OFFICIAL_ALIASES = {"uniform": "linear", "pow2": "square", "pow3": "cubic", "pow0.5": "sqrt"}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_gamma_matches_formula_and_clip(name):
    with np.errstate(divide="ignore"):
        expected = np.clip(REFERENCE[name](R, 256), 1e-6, 1.0)
    got = gamma(name, torch.tensor(R, dtype=torch.float32), n_tokens=256)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-6, rtol=1e-5)
    assert float(got.min()) >= np.float32(1e-6) and float(got.max()) <= 1.0


@pytest.mark.parametrize("alias,paper", list(OFFICIAL_ALIASES.items()))
def test_official_names_are_the_paper_schedules(alias, paper):
    r = torch.rand(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gamma(alias, r), gamma(paper, r))
    assert canonical_schedule_name(alias) == paper


def test_canonical_names():
    assert SCHEDULE_NAMES == ("linear", "square", "cubic", "sqrt", "cosine", "log", "exp", "arccos")
    for name in SCHEDULE_NAMES:
        assert canonical_schedule_name(name) == name
    assert canonical_schedule_name("pow2.0") == "square"
    assert canonical_schedule_name("pow1") == "linear"
    assert canonical_schedule_name("pow1.50") == "pow1.5"
    assert set(SCHEDULE_NAMES) | set(OFFICIAL_ALIASES) == set(SCHEDULES)


def test_every_schedule_config_is_accepted():
    names = [line.split(":", 1)[1].strip() for f in sorted((CONF / "schedule").glob("*.yaml"))
             for line in f.read_text().splitlines() if line.startswith("name:")]
    assert len(names) >= 8
    for name in names:
        masking.validate_schedule(name, n_tokens=256)


def test_gamma_endpoints_and_scalar_input():
    assert float(gamma("cosine", 0.0)) == 1.0
    assert float(gamma("cosine", 1.0)) == pytest.approx(1e-6)  # cos(π/2) < 0 in float32 -> clipped
    assert float(gamma("linear", 1.0)) == pytest.approx(1e-6)
    assert float(gamma("log", 0.0, n_tokens=256)) == 1.0  # −log2(0) = inf -> clipped to 1
    assert float(gamma("exp", 0.0, n_tokens=256)) == pytest.approx(1 - 1 / 256)
    assert float(gamma("arccos", 0.0)) == 1.0


def test_gamma_is_float32_like_the_official_code():
    # cos(π/2 · 8/12) lands just below 0.5 in float32: 256·γ floors to 127 (float64: 128).
    r = torch.tensor(8.0) / torch.tensor(12.0)
    assert math.floor(256 * math.cos(math.pi / 2 * 8 / 12)) == 128
    assert int(torch.floor(256 * gamma("cosine", r))) == 127
    assert int(torch.floor(256 * gamma("cosine", 8 / 12))) == 127


def test_gamma_per_sample_n_tokens():
    n = torch.tensor([256, 16, 1, 0])
    got = gamma("log", torch.full((4,), 0.5), n_tokens=n)
    np.testing.assert_allclose(got[:2].numpy(), [1 / 8, 1 / 4], rtol=1e-6)
    assert torch.isfinite(got).all() and (got >= 1e-6).all() and (got <= 1).all()
    got = gamma("exp", torch.tensor([1.0, 0.0, 1.0]), n_tokens=torch.tensor([256, 0, 0]))
    assert torch.isfinite(got).all()


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown mask schedule 'cosin'.*cosine.*arccos.*powX"):
        gamma("cosin", 0.5)
    with pytest.raises(ValueError, match="exponent"):
        gamma("pow0", 0.5)
    with pytest.raises(ValueError, match="unknown mask schedule"):
        canonical_schedule_name("pow")


@pytest.mark.parametrize("name", ["log", "exp"])
def test_log_exp_need_n_tokens(name):
    with pytest.raises(ValueError, match="n_tokens"):
        gamma(name, 0.5)
    with pytest.raises(ValueError, match="n_tokens"):
        ScheduleRatio(name)
    assert ScheduleRatio(name, n_tokens=256)(3).shape == (3,)


# ------------------------------------------------------------------------------------ counts
def test_num_masked_is_ceil_clamped():
    ratio = torch.tensor([0.0, 1e-6, 0.5, 0.3, 0.55, 0.999, 1.0, 1.5, -0.2])
    assert num_masked(ratio, 256).tolist() == [0, 1, 128, 77, 141, 256, 256, 256, 0]
    assert num_masked(ratio, 256).dtype == torch.int64
    assert int(num_masked(0.3, 10)) == 3  # float32 math: not ⌈3.0000001⌉ = 4
    assert int(num_masked(0.5, 256)) == 128  # MAGE's drop count ⌈0.5·256⌉
    assert int(num_masked(0.0, 0)) == 0
    with pytest.raises(ValueError):
        num_masked(0.5, -1)


def test_num_masked_matches_ceil_on_random_ratios():
    ratio = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    expected = np.ceil(ratio.numpy().astype(np.float32) * np.float32(256)).astype(np.int64)
    assert num_masked(ratio, 256).numpy().tolist() == expected.tolist()


# ------------------------------------------------------------------------------------ masks
def test_rank_noise_is_a_permutation_and_masks_are_nested():
    ranks = rank_noise(64, 256, torch.Generator().manual_seed(0))
    assert ranks.shape == (64, 256) and ranks.dtype == torch.int64
    assert torch.equal(ranks.sort(dim=1).values, torch.arange(256).expand(64, 256))
    n_masked = num_masked(torch.full((64,), 0.7), 256)
    masked = mask_from_ranks(ranks, n_masked)
    dropped = mask_from_ranks(ranks, 128)
    assert (masked.sum(1) == 180).all() and (dropped.sum(1) == 128).all()
    assert not (dropped & ~masked).any()  # MAGE: dropped ⊆ masked
    with pytest.raises(ValueError, match="shape"):
        mask_from_ranks(ranks, torch.ones(3, dtype=torch.long))


def test_random_mask_exact_counts():
    n = torch.tensor([0, 1, 7, 16])
    mask = random_mask(4, 16, n, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [0, 1, 7, 16]
    assert random_mask(3, 5, 2).sum(1).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        random_mask(1, 16, torch.tensor([17]))
    with pytest.raises(ValueError, match="shape"):
        random_mask(2, 16, torch.tensor([1, 2, 3]))


def test_mask_tokens_exact():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1024, (8, 256), generator=gen)
    ratio = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.55, 0.9, 0.999, 1.0])
    masked, mask = mask_tokens(tokens, ratio, mask_id=2024, generator=gen)
    assert mask.sum(1).tolist() == num_masked(ratio, 256).tolist() == [0, 26, 77, 128, 141, 231, 256, 256]
    assert (masked[mask] == 2024).all()
    assert torch.equal(masked[~mask], tokens[~mask])
    m2, _ = mask_tokens(tokens, 0.25, mask_id=2024, generator=gen)
    assert ((m2 == 2024).sum(1) == 64).all()


def test_mask_tokens_reproducible_and_uniform():
    tokens = torch.zeros(20000, 16, dtype=torch.long)
    _, a = mask_tokens(tokens, 0.25, 5, torch.Generator().manual_seed(3))
    _, b = mask_tokens(tokens, 0.25, 5, torch.Generator().manual_seed(3))
    _, c = mask_tokens(tokens, 0.25, 5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    freq = a.float().mean(0)  # every position equally likely: 0.25 ± 4σ (σ ≈ 0.003)
    assert torch.allclose(freq, torch.full((16,), 0.25), atol=0.013)


def test_mask_tokens_bernoulli():
    tokens = torch.zeros(4000, 64, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    masked, mask = mask_tokens(tokens, 0.3, 9, gen, mode="bernoulli")
    counts = mask.sum(1).float()
    assert abs(counts.mean().item() - 0.3 * 64) < 0.2
    assert counts.std().item() == pytest.approx(math.sqrt(64 * 0.3 * 0.7), rel=0.1)  # not a fixed count
    assert (masked[mask] == 9).all()
    _, none = mask_tokens(tokens[:5], 0.0, 9, gen, mode="bernoulli")
    _, full = mask_tokens(tokens[:5], 1.0, 9, gen, mode="bernoulli")
    assert not none.any() and full.all()


def test_mask_tokens_errors():
    tokens = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="exact, bernoulli"):
        mask_tokens(tokens, 0.5, 9, mode="poisson")
    with pytest.raises(ValueError, match=r"\(2,\)"):
        mask_tokens(tokens, torch.tensor([0.5, 0.5, 0.5]), 9)
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        mask_tokens(tokens[0], 0.5, 9)


def test_generator_device_mismatch_is_explained():
    with pytest.raises(ValueError, match="generator is on cpu"):
        resolve_device("cuda", torch.Generator())
    assert resolve_device(None, None) == torch.device("cpu")


# ------------------------------------------------------------------------------------ ratios
def test_trunc_gauss_moments_and_bounds():
    dist = TruncGaussRatio(per_sample=True)
    x = dist(100_000, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == (100_000,)
    assert abs(x.mean().item() - 0.694) < 0.005
    assert abs(x.std().item() - 0.129) < 0.005
    assert x.min().item() >= 0.5 and x.max().item() <= 1.0
    ref = stats.truncnorm((0.5 - 0.55) / 0.25, (1.0 - 0.55) / 0.25, loc=0.55, scale=0.25)
    assert ref.mean() == pytest.approx(0.694, abs=5e-4) and ref.std() == pytest.approx(0.129, abs=5e-4)
    q = np.linspace(0.01, 0.99, 99)
    np.testing.assert_allclose(np.quantile(x.numpy(), q), ref.ppf(q), atol=0.005)
    assert stats.kstest(x.numpy(), ref.cdf).statistic < 0.006  # ≈ the 0.1 % critical value at n = 1e5


def test_trunc_gauss_one_ratio_per_step_and_seeded():
    dist = TruncGaussRatio()
    a = dist(16, torch.Generator().manual_seed(7))
    assert a.shape == (16,) and (a == a[0]).all()
    assert torch.equal(a, dist(16, torch.Generator().manual_seed(7)))
    gen = torch.Generator().manual_seed(7)
    draws = torch.stack([dist(1, gen) for _ in range(50)])
    assert draws.unique().numel() == 50  # a fresh ratio each step


def test_trunc_gauss_validation():
    for kwargs in [dict(std=0.0), dict(low=0.8, high=0.6), dict(high=1.2), dict(low=-0.1), dict(mean=-80.0)]:
        with pytest.raises(ValueError, match=r"^ratio\.(std|low|high|mean)=.*: must be"):  # settings.RatioSettings' rules
            TruncGaussRatio(**kwargs)


def test_schedule_ratio_is_gamma_of_uniform():
    dist = ScheduleRatio("cosine")
    got = dist(1000, torch.Generator().manual_seed(5))
    r = torch.rand(1000, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, gamma("cosine", r))
    assert got.min() >= 1e-6 and got.max() <= 1.0
    # mean of cos(πr/2) over U[0,1) is 2/π
    assert abs(ScheduleRatio("cosine")(100_000, torch.Generator().manual_seed(0)).mean().item() - 2 / math.pi) < 0.005
    with pytest.raises(ValueError, match="valid"):
        ScheduleRatio("cosinus")


def test_uniform_and_fixed_ratio():
    x = UniformRatio(0.2, 0.6)(10_000, torch.Generator().manual_seed(0))
    assert x.min() >= 0.2 and x.max() < 0.6 and abs(x.mean().item() - 0.4) < 0.01
    y = UniformRatio(0.2, 0.6, per_sample=False)(8, torch.Generator().manual_seed(0))
    assert (y == y[0]).all()
    z = FixedRatio(0.75)(5)
    assert z.dtype == torch.float32 and z.tolist() == [0.75] * 5
    with pytest.raises(ValueError, match=r"ratio\.low=0\.7: must be <= ratio\.high=0\.3"):
        UniformRatio(0.7, 0.3)
    with pytest.raises(ValueError, match=r"ratio\.value=1\.5: must be <= 1"):
        FixedRatio(1.5)


def test_ratio_configs_instantiate():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    files = sorted((CONF / "ratio").glob("*.yaml"))
    assert files
    for f in files:
        cfg = OmegaConf.create({"schedule": {"name": "cosine"}, "ratio": OmegaConf.load(f)})
        dist = instantiate(cfg.ratio)
        x = dist(4, torch.Generator().manual_seed(0))
        assert x.shape == (4,) and x.dtype == torch.float32 and (x >= 0).all() and (x <= 1).all(), f.name
