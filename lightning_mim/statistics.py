"""Across-seed statistics of an ablation: mean, 95 % confidence interval, and whether two points differ.

Each grid point of a sweep is trained with n seeds; what varies between seeds (weight init, data order,
masks, the evaluation's samples) is the noise a difference between points has to beat.

- Interval: Student's t interval of the mean, mean ± t_{1-α/2, n-1} · s / √n, with s the sample
  standard deviation (ddof 1). With 3 seeds the normal or bootstrap intervals are far too narrow (the
  bootstrap of 3 values has at most 10 distinct means); the t interval is exact for normal noise and
  honest about how little 3 values say (t_{0.975, 2} = 4.30). n = 1 gives no interval (None), never ±0.
- Difference: Welch's two-sample t-test (`scipy.stats.ttest_ind(equal_var=False)`), which does not
  assume equal variances across points; a difference is *resolved* at level α when p < α. Both sides
  need >= 2 values; otherwise the p-value is None ("not testable").
- Evaluation noise: with a second evaluation of each trial's model on an independent draw of samples
  (x1, x2), Var(x1 - x2) = 2 σ²_eval, so σ²_eval = Σ (x1 - x2)² / 2m over m trials; the seed-to-seed
  variance of a point's values (σ²_seed = σ²_training + σ²_eval) is the within-point sample variance
  pooled over points (Σ (n_i - 1) s_i² / Σ (n_i - 1)). Their ratio is the share of the seed-to-seed
  spread that more evaluation samples would remove; the rest only more seeds do. (A bootstrap of the
  samples would not do: FID is biased in the number of samples, so a resample is no second draw.)
- Paired difference: when two points evaluate the *same* trained models (they differ only in
  inference-only settings such as `decode.steps`), seed i of one and seed i of the other share their
  weights, so their values are correlated and Welch's independence assumption does not hold (it is
  then conservative: the shared seed-to-seed spread counts as noise twice). The paired t-test
  (`scipy.stats.ttest_rel`) tests the mean of the per-seed differences instead; it needs >= 2 pairs.

scipy computes the quantiles and the tests (imported where used: a sweep's workers and its
`--prepare-only` never summarize, and scipy.stats is a second of start-up); this module only fixes
the conventions (which interval, which test, what n = 1 means) so that the console table, the MLflow
parent run and the notebook agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


CONFIDENCE = 0.95
ALPHA = 0.05


@dataclass(frozen=True)
class Estimate:
    """Mean of n values and its confidence interval (low, high); both None when n < 2."""

    mean: float
    n: int
    low: float | None
    high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2


def _finite(values: Sequence[float], name: str) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"{name}: no values")
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name}: non-finite values {bad}")
    return out


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean and Student-t confidence interval of `values` (see the module docstring)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    xs = _finite(values, "mean_interval")
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return Estimate(mean, n, None, None)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    from scipy import stats as scipy_stats

    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * sd / math.sqrt(n)
    return Estimate(mean, n, mean - half, mean + half)


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test for equal means; None when either side has < 2 values.
    Two constant samples: 1.0 if their means are equal, else 0.0 (scipy returns NaN there)."""
    xa, xb = _finite(a, "welch_p_value a"), _finite(b, "welch_p_value b")
    if len(xa) < 2 or len(xb) < 2:
        return None
    if max(xa) == min(xa) and max(xb) == min(xb):
        return 1.0 if xa[0] == xb[0] else 0.0
    from scipy import stats as scipy_stats

    return float(scipy_stats.ttest_ind(xa, xb, equal_var=False).pvalue)


def paired_p_value(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of the paired t-test for a zero mean of `a[i] - b[i]`; None with < 2 pairs.
    All differences equal (zero variance): 1.0 if they are 0, else 0.0 (scipy returns NaN there)."""
    xa, xb = _finite(a, "paired_p_value a"), _finite(b, "paired_p_value b")
    if len(xa) != len(xb):
        raise ValueError(f"paired_p_value: {len(xa)} values against {len(xb)}; pairs need equal lengths")
    if len(xa) < 2:
        return None
    differences = [x - y for x, y in zip(xa, xb)]
    if max(differences) == min(differences):
        return 1.0 if differences[0] == 0 else 0.0
    from scipy import stats as scipy_stats

    return float(scipy_stats.ttest_rel(xa, xb).pvalue)


def resolved(p_value: float | None, alpha: float = ALPHA) -> bool | None:
    """Whether a difference is resolved at level `alpha` (None: not testable)."""
    return None if p_value is None else p_value < alpha


@dataclass(frozen=True)
class NoiseShare:
    """How much of the seed-to-seed variance of an objective is evaluation noise (module docstring)."""

    evaluation_variance: float
    seed_variance: float | None  # None: no point has 2+ seeds
    trials: int

    @property
    def share(self) -> float | None:
        if not self.seed_variance:
            return None
        return self.evaluation_variance / self.seed_variance


def evaluation_noise(draws: Sequence[tuple[float, float]], groups: Sequence[Sequence[float]]) -> NoiseShare | None:
    """σ²_eval from `draws` (each trial's objective on its two draws) against σ²_seed pooled over
    `groups` (each point's first-draw values over its seeds); None without any draw pair."""
    pairs = [(float(a), float(b)) for a, b in draws]
    if not pairs:
        return None
    _finite([v for pair in pairs for v in pair], "evaluation_noise draws")
    evaluation_variance = sum((a - b) ** 2 for a, b in pairs) / (2 * len(pairs))
    dof = sum(len(g) - 1 for g in groups if len(g) >= 2)
    pooled = None
    if dof:
        pooled = sum(sum((x - sum(g) / len(g)) ** 2 for x in _finite(g, "evaluation_noise groups")) for g in groups if len(g) >= 2) / dof
    return NoiseShare(evaluation_variance, pooled, len(pairs))

