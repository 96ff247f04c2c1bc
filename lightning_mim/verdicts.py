"""Verdicts of a sweep: every pair of grid points compared, with the family-wise error rate controlled.

A sweep trains each grid point with a few seeds; `compare_all` turns the per-seed objective values of
the points into one `Comparison` per unordered pair, `point_verdicts` reads them against the best point,
and `simulate` measures, on sweeps with a known truth, how often the procedure is wrong.

Conventions (the procedures are scipy's and statsmodels'; this module only chooses and glues them):

- Design, not data, fixes the test. Seed i of every point shares its initial weights, data order and
  evaluation draws, so with `blocked=True` two points that share >= 2 seeds are compared by the paired
  t-test over the seeds both have (`statistics.paired_p_value`, i.e. `scipy.stats.ttest_rel`); pairs
  sharing fewer (and every pair with `blocked=False`) by Welch's test over all their values
  (`statistics.welch_p_value`, i.e. `ttest_ind(equal_var=False)`). The test is never chosen by which
  p-value is smaller, nor by the measured correlation (reported only).
- Multiplicity: Holm's step-down procedure (`statsmodels.stats.multitest.multipletests(method='holm')`;
  its default is Holm-Šidák; its Holm branch runs `gc.collect()`, 0.1-0.3 s a call in a process that has
  torch loaded) over every hypothesis tested in the sweep: the m "no difference" nulls
  and, with an equivalence margin, the m "|Δ| >= margin" nulls, one family of 2m. Holm controls the
  family-wise error rate at α under any dependence between the tests; for each pair at most one of its
  two nulls can be true (Δ = 0 and |Δ| >= margin > 0 exclude each other). Since every pair is in the
  family, naming the best point after seeing the data does not inflate the error rate.
- Equivalence: two one-sided tests (TOST) of |Δ| >= margin, `statsmodels.stats.weightstats.ttost_paired`
  or `ttost_ind(usevar='unequal')` (its default pools the variances).
- Power: the smallest |Δ| a comparison detects with `power` (80 %) at the family's per-comparison level
  α / (number of hypotheses in the family) — Holm's first step, i.e. Bonferroni; later Holm steps test at
  larger levels, so this is an upper bound —, and the seeds per point a given effect needs. The power is
  statsmodels' (`TTestPower` for paired differences, d = Δ / sd of the differences; `TTestIndPower` for
  two samples, d = Δ / sqrt((s_a² + s_b²) / 2), pooled degrees of freedom as statsmodels has them),
  evaluated through `_power` (see there: with scipy 1.17, statsmodels' `power` returns NaN and its
  `solve_power` wrong roots exactly at 3 seeds).
- Edge cases follow `statistics`: constant samples are taken as exact (p = 0 or 1), a side with < 2
  values is "not testable" (None), non-finite values are refused.

scipy and statsmodels are imported where used, as in `statistics`: importing this module costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import combinations
from numbers import Integral
from statistics import fmean, stdev, variance  # the standard library's
from typing import Mapping, NamedTuple, Sequence

from lightning_mim.statistics import ALPHA, CONFIDENCE, paired_p_value, welch_p_value

PAIRED, WELCH = "paired", "welch"
DIFFERENT, EQUIVALENT, OPEN, UNTESTABLE = "different", "equivalent", "open", "not testable"
BEST = "best"
WORSE = "worse than best"
DIFFERENT_FROM_BEST = "different from best"
EQUIVALENT_TO_BEST = "equivalent to best"
NOT_DISTINGUISHED = "not distinguished from best"
POWER = 0.8
DIRECTIONS = ("minimize", "maximize")
NOISES = ("normal", "t3")


@dataclass(frozen=True)
class Comparison:
    """Point `a` against point `b` (labels), as `compare_all` computes it.

    test: PAIRED (matched by seed over the seeds both have) or WELCH (fewer than 2 common seeds, or not
      blocked). n_a, n_b: the values used on each side (paired: both are the number of pairs).
    difference: mean(a) - mean(b) (paired: the mean per-seed difference over the common seeds); ci_low,
      ci_high: its Student-t interval at `statistics.CONFIDENCE` (95 %; paired: of the mean difference;
      Welch: Welch-Satterthwaite degrees of freedom), per comparison, not adjusted for multiplicity.
    p_value: raw two-sided p of "no difference"; p_adjusted: Holm-adjusted over the whole family.
    correlation: Pearson correlation of a and b over their common seeds (>= 3 pairs, neither constant),
      reported, never used to choose the test.
    equivalence_p, equivalence_p_adjusted: TOST p of "|Δ| >= margin", raw and Holm-adjusted in the same
      family (None without a margin).
    verdict: DIFFERENT (p_adjusted < α), else EQUIVALENT (equivalence_p_adjusted < α), else OPEN;
      UNTESTABLE when a side has < 2 values. A difference that is both significant and within the
      margin reads DIFFERENT (its equivalence p is still reported).
    detectable: smallest |Δ| detected with the requested power (80 %) at the family's per-comparison
      level α / (hypotheses in the family) with the current n, in objective units.
    seeds_needed: seeds per point (paired: pairs) that detect `effect` — the caller's, or else the
      observed |difference| (`effect_is_observed`) — at that level and power.
    None throughout means "not testable" or "not computable" (no margin; zero spread or a zero effect
    for seeds_needed; < 3 pairs for the correlation).
    look, nominal_level: set only when a sequential design (`lightning_mim.sequential`, `sweep.seeds=auto`)
      read the pair: the look (0-based round) whose test the verdict is from — the one that decided it,
      or the last one for an open pair —, and the nominal level its p-value (`p_value`, of that look;
      the equivalence p for EQUIVALENT) had to fall below there; p_adjusted is then None.
    """

    a: str
    b: str
    test: str
    n_a: int
    n_b: int
    difference: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    p_adjusted: float | None
    correlation: float | None
    equivalence_p: float | None
    equivalence_p_adjusted: float | None
    verdict: str
    detectable: float | None
    seeds_needed: int | None
    effect_is_observed: bool
    look: int | None = None
    nominal_level: float | None = None


def compare_all(
    values: Mapping[str, Mapping[str, float]],
    *,
    alpha: float = ALPHA,
    blocked: bool = True,
    equivalence: float | None = None,
    effect: float | None = None,
    power: float = POWER,
) -> list[Comparison]:
    """Every unordered pair of points compared, in input order of the labels ((0, 1), (0, 2), ...,
    (1, 2), ...), read with Holm over the whole family (module docstring).

    values: point label -> {seed: objective value}. blocked=True: a pair sharing >= 2 seeds is compared
    paired over its common seeds (`ttest_rel`; equivalence `ttost_paired`; power `TTestPower`, d = Δ / sd
    of the per-seed differences); otherwise, and always with blocked=False, by Welch over all values of
    each point (`ttest_ind(equal_var=False)`; `ttost_ind(usevar='unequal')`; `TTestIndPower`,
    d = Δ / sqrt((s_a² + s_b²) / 2)). The design fixes the test, never the smaller p.
    Family: the m difference hypotheses of the testable pairs, plus their m equivalence hypotheses when
    `equivalence` (a margin > 0, objective units) is given — one family of 2m, valid because every
    hypothesis tested is in it (for each pair at most one of its two nulls can be true). Pairs with < 2
    values a side (< 2 pairs) are UNTESTABLE and left out of the family.
    effect: the difference (> 0, objective units) `seeds_needed` is for; None: each pair's observed
    |difference|. power: of `detectable` and `seeds_needed` (0.8).
    """
    _check_level(alpha, "alpha")
    _check_level(power, "power")
    _check_positive(equivalence, "equivalence")
    _check_positive(effect, "effect")
    points = _checked_values(values)
    pairs = list(combinations(points, 2))
    sides = [_sides(points[a], points[b], blocked) for a, b in pairs]
    hypotheses = sum(s.testable for s in sides) * (1 if equivalence is None else 2)
    level = alpha / max(hypotheses, 1)  # Holm's first step: Bonferroni over the family
    measured = [_measure(a, b, s, equivalence=equivalence, effect=effect, level=level, power=power)
                for (a, b), s in zip(pairs, sides)]
    testable = [c for c in measured if c.p_value is not None]
    raw = [c.p_value for c in testable] + [c.equivalence_p for c in testable if equivalence is not None]
    adjusted = _holm(raw)
    m = len(testable)
    read = iter(zip(adjusted[:m], adjusted[m:] if equivalence is not None else [None] * m))
    return [c if c.p_value is None else _read(c, *next(read), alpha=alpha) for c in measured]


def point_verdicts(comparisons: Sequence[Comparison], means: Mapping[str, float], direction: str) -> dict[str, str]:
    """Per point label (`means`' keys, in their order): BEST ("best") for the best mean (`direction`
    "minimize" or "maximize"; ties: the first in `means`' order); every other point from its comparison
    with the best: WORSE ("worse than best", DIFFERENT), EQUIVALENT_TO_BEST ("equivalent to best"),
    NOT_DISTINGUISHED ("not distinguished from best", OPEN) or UNTESTABLE ("not testable"). A DIFFERENT
    comparison whose difference favours the other point — possible only when a paired comparison's
    common seeds are not all of the best's seeds — reads DIFFERENT_FROM_BEST ("different from best").

    Because every pair is in the Holm family, picking the best after seeing the data keeps the
    family-wise error rate at the α the comparisons were read with.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be minimize or maximize, got {direction!r}")
    if not means:
        raise ValueError("point_verdicts: no points")
    bad = {label: m for label, m in means.items() if not math.isfinite(m)}
    if bad:
        raise ValueError(f"point_verdicts: non-finite means {bad}")
    sign = 1 if direction == "minimize" else -1
    best = min(means, key=lambda label: sign * means[label])
    verdicts = {}
    for label in means:
        comparison = None if label == best else next((c for c in comparisons if {c.a, c.b} == {label, best}), None)
        if label != best and comparison is None:
            raise ValueError(f"point_verdicts: no comparison of {label!r} with the best point {best!r}")
        verdicts[label] = BEST if comparison is None else _against_best(comparison, label, sign)
    return verdicts


def best_group(comparisons: Sequence[Comparison], means: Mapping[str, float], direction: str) -> list[str]:
    """The labels not shown different from the best point: the best first, then the points equivalent
    to it, not distinguished from it or not testable, in `means`' order."""
    verdicts = point_verdicts(comparisons, means, direction)
    group = [label for label, v in verdicts.items() if v not in (WORSE, DIFFERENT_FROM_BEST)]
    return sorted(group, key=lambda label: verdicts[label] != BEST)


def simulate(
    n_points: int,
    n_seeds: int,
    *,
    effect: float = 0.0,
    noise: str = "normal",
    correlation: float = 0.0,
    sims: int,
    alpha: float = ALPHA,
    blocked: bool = True,
    holm: bool = True,
    equivalence: float | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Monte-Carlo sweeps with a known truth, read as `compare_all` reads them: every point has the
    seeds 0..n_seeds-1, so `blocked` compares every pair paired and blocked=False by Welch; the family is
    Holm's over all pairs (and their equivalence tests with a margin); `holm=False` reads each test alone
    at α, the unadjusted reading, for comparison. `_simulated_family` vectorises what `compare_all`
    does per sweep (a test checks that the two agree sweep by sweep).

    Truth (direction minimize): point 0 lower by `effect`, all other points equal; `effect` and the
    margin `equivalence` are in noise-sd units. Noise: unit variance, "normal" or "t3" (Student's t with
    3 degrees of freedom divided by √3), correlated across the points of a seed with `correlation` ρ
    (`_noise`): ρ >= 0 as a seed block, value = μ_point + √ρ z_seed + √(1 - ρ) e_point,seed; ρ < 0, down
    to -1/(n_points - 1) (the least an equicorrelation allows), through the symmetric square root of
    the equicorrelation matrix. numpy's Generator(PCG64(seed)): equal arguments give equal numbers, and
    calls differing only in `blocked`, `holm`, `alpha` or `equivalence` see the same sweeps.

    Returns shares of the `sims` sweeps:
    - fwer: >= 1 DIFFERENT among the truly equal pairs (every pair when effect is 0); mc_error: its
      binomial standard error sqrt(fwer (1 - fwer) / sims);
    - power: every pair with point 0 DIFFERENT, point 0 the better one (NaN when effect is 0);
      power_any: at least one of them;
    - false_equivalence: >= 1 equivalence shown (adjusted TOST p < α) for a pair whose true |Δ| >= margin,
      the error the family controls (0.0 when no pair is that far apart; NaN without a margin). It counts
      such a pair also when it is shown DIFFERENT, and so reads EQUIVALENT nowhere: with precise
      estimates a pair on the margin is nearly always shown different, and the verdicts alone would
      hide the test's error;
    - sims.
    """
    _check_simulation(n_points, n_seeds, effect, noise, correlation, sims)
    _check_level(alpha, "alpha")
    _check_positive(equivalence, "equivalence")
    import numpy as np

    rng = np.random.default_rng(seed)
    truth = np.zeros(n_points)
    truth[0] = -effect
    values = truth[None, :, None] + _noise(rng, noise, correlation, (sims, n_points, n_seeds))
    pairs = list(combinations(range(n_points), 2))
    p, equivalence_p, difference = _simulated_family(values, pairs, blocked=blocked, holm=holm, equivalence=equivalence)
    different, _ = _rejected(p, 1.0, alpha)  # DIFFERENT whatever the equivalence test says
    gap = np.array([abs(truth[i] - truth[j]) for i, j in pairs])
    null, with_best = gap == 0, np.array([i == 0 for i, _ in pairs])
    fwer = float(different[:, null].any(axis=1).mean()) if null.any() else 0.0
    found = different[:, with_best] & (difference[:, with_best] < 0)
    far = gap >= (math.inf if equivalence is None else equivalence)
    return {
        "fwer": fwer,
        "mc_error": math.sqrt(fwer * (1 - fwer) / sims),
        "power": float(found.all(axis=1).mean()) if effect > 0 else math.nan,
        "power_any": float(found.any(axis=1).mean()) if effect > 0 else math.nan,
        "false_equivalence": (math.nan if equivalence_p is None
                              else float((equivalence_p[:, far] < alpha).any(axis=1).mean()) if far.any() else 0.0),
        "sims": float(sims),
    }


def simulate_families(
    n_points: int,
    n_seeds: int,
    *,
    metric_correlation: float,
    correlation: float = 0.0,
    sims: int,
    alpha: float = ALPHA,
    seed: int = 0,
) -> dict[str, float]:
    """Monte-Carlo A/A sweeps with two metrics per trial, read as a sweep with one secondary family
    reads them (`orchestration.summary.MetricFamily`): each metric's pairs are a family of their own,
    paired and Holm-adjusted at α apart from the other's. Every point is equal on both metrics; the two
    metrics of one trial are correlated with `metric_correlation` (a model's probe and its FID move
    together), each correlated across the points of a seed with `correlation` as in `simulate`
    (normal noise: second = r first + √(1 - r²) independent, which keeps ρ across points).

    Returns shares of the `sims` sweeps with >= 1 pair called DIFFERENT: `first` and `second` (each
    family's FWER, at most α each), `either` (in one family or the other: at most 2α, since the
    guarantee is per family; equal to `first` when the metrics are identical, r = 1), and sims."""
    _check_simulation(n_points, n_seeds, 0.0, "normal", correlation, sims)
    _check_level(alpha, "alpha")
    if not -1 <= metric_correlation <= 1:
        raise ValueError(f"metric_correlation must be in [-1, 1], got {metric_correlation!r}")
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (sims, n_points, n_seeds)
    first = _noise(rng, "normal", correlation, shape)
    second = metric_correlation * first + math.sqrt(1 - metric_correlation ** 2) * _noise(rng, "normal", correlation, shape)
    pairs = list(combinations(range(n_points), 2))
    found = [_rejected(_simulated_family(v, pairs, blocked=True, holm=True, equivalence=None)[0], 1.0, alpha)[0].any(axis=1)
             for v in (first, second)]
    return {"first": float(found[0].mean()), "second": float(found[1].mean()),
            "either": float((found[0] | found[1]).mean()), "sims": float(sims)}


# --- one comparison ----------------------------------------------------------------------------------


class _Sides(NamedTuple):
    """The values a comparison tests: its `test`, side a and side b (paired: matched by seed), and the
    two points' values at their common seeds (for the correlation, whichever the test)."""

    test: str
    a: list[float]
    b: list[float]
    common_a: list[float]
    common_b: list[float]

    @property
    def testable(self) -> bool:
        return min(len(self.a), len(self.b)) >= 2


def _sides(xa: Mapping[str, float], xb: Mapping[str, float], blocked: bool) -> _Sides:
    """PAIRED over the common seeds (in a's order) when blocked and >= 2 are common, else WELCH over all."""
    common = [s for s in xa if s in xb]
    ca, cb = [xa[s] for s in common], [xb[s] for s in common]
    if blocked and len(common) >= 2:
        return _Sides(PAIRED, ca, cb, ca, cb)
    return _Sides(WELCH, list(xa.values()), list(xb.values()), ca, cb)


def _measure(a: str, b: str, sides: _Sides, *, equivalence: float | None, effect: float | None, level: float,
             power: float) -> Comparison:
    """A pair's numbers before the family is read (p_adjusted, equivalence_p_adjusted None; verdict
    UNTESTABLE until `_read`)."""
    paired = sides.test == PAIRED
    difference = fmean(sides.a) - fmean(sides.b)
    p = (paired_p_value if paired else welch_p_value)(sides.a, sides.b)
    common = dict(a=a, b=b, test=sides.test, n_a=len(sides.a), n_b=len(sides.b), difference=difference,
                  correlation=_correlation(sides.common_a, sides.common_b), p_adjusted=None,
                  equivalence_p_adjusted=None, verdict=UNTESTABLE, effect_is_observed=effect is None)
    if p is None:
        return Comparison(**common, ci_low=None, ci_high=None, p_value=None, equivalence_p=None, detectable=None,
                          seeds_needed=None)
    sd = _spread(sides)
    low, high = _interval(sides, difference, sd)
    d = _detectable_d(len(sides.a), len(sides.b), paired, level, power)
    wanted = effect if effect is not None else abs(difference)
    return Comparison(
        **common, ci_low=low, ci_high=high, p_value=p,
        equivalence_p=None if equivalence is None else _equivalence_p(sides, difference, sd, equivalence),
        detectable=None if d is None else d * sd,
        seeds_needed=None if sd == 0 or wanted == 0 else _seeds_needed(wanted / sd, paired, level, power),
    )


def _read(c: Comparison, p_adjusted: float, equivalence_p_adjusted: float | None, *, alpha: float) -> Comparison:
    """A testable comparison with its Holm-adjusted p-values and its verdict."""
    return replace(c, p_adjusted=p_adjusted, equivalence_p_adjusted=equivalence_p_adjusted,
                   verdict=_verdict(p_adjusted, equivalence_p_adjusted, alpha))


def _rejected(p_adjusted, equivalence_p_adjusted, alpha: float):
    """(different, equivalent), the verdict rule, on floats or numpy arrays alike: different when
    p_adjusted < α; equivalent when not different and equivalence_p_adjusted < α."""
    return p_adjusted < alpha, (p_adjusted >= alpha) & (equivalence_p_adjusted < alpha)


def _verdict(p_adjusted: float, equivalence_p_adjusted: float | None, alpha: float) -> str:
    """DIFFERENT, EQUIVALENT or OPEN (no margin: an equivalence p of 1, which never rejects)."""
    shown = 1.0 if equivalence_p_adjusted is None else equivalence_p_adjusted
    different, equivalent = _rejected(p_adjusted, shown, alpha)
    return DIFFERENT if different else EQUIVALENT if equivalent else OPEN


def _against_best(c: Comparison, label: str, sign: int) -> str:
    """A point's verdict from its comparison `c` with the best (sign: +1 minimize, -1 maximize)."""
    if c.verdict != DIFFERENT:
        return {EQUIVALENT: EQUIVALENT_TO_BEST, OPEN: NOT_DISTINGUISHED}.get(c.verdict, UNTESTABLE)
    label_minus_best = c.difference if c.a == label else -c.difference
    return WORSE if sign * label_minus_best > 0 else DIFFERENT_FROM_BEST


def _spread(sides: _Sides) -> float:
    """The sd a difference is standardised by: paired, of the per-seed differences; Welch,
    sqrt((s_a² + s_b²) / 2) (sample variances, ddof 1)."""
    if sides.test == PAIRED:
        return stdev([x - y for x, y in zip(sides.a, sides.b)])
    return math.sqrt((variance(sides.a) + variance(sides.b)) / 2)


def _interval(sides: _Sides, difference: float, sd: float) -> tuple[float, float]:
    """Student-t interval of the difference at CONFIDENCE: paired, of the mean per-seed difference
    (`DescrStatsW.tconfint_mean`); Welch, `CompareMeans.tconfint_diff(usevar='unequal')`. No spread
    (constant samples, read as exact like the p-values): (Δ, Δ)."""
    if sd == 0:
        return difference, difference
    from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

    if sides.test == PAIRED:
        low, high = DescrStatsW([x - y for x, y in zip(sides.a, sides.b)]).tconfint_mean(alpha=1 - CONFIDENCE)
    else:
        low, high = CompareMeans(DescrStatsW(sides.a), DescrStatsW(sides.b)).tconfint_diff(
            alpha=1 - CONFIDENCE, usevar="unequal")
    return float(low), float(high)


def _equivalence_p(sides: _Sides, difference: float, sd: float, margin: float) -> float:
    """TOST p-value of the null |Δ| >= margin (the larger one-sided p): `ttost_paired(a, b, -margin,
    margin)` or `ttost_ind(a, b, -margin, margin, usevar='unequal')`. No spread: 0.0 when |Δ| < margin,
    else 1.0 (constant samples read as exact, as `statistics` reads them)."""
    if sd == 0:
        return 0.0 if abs(difference) < margin else 1.0
    import numpy as np
    from statsmodels.stats.weightstats import ttost_ind, ttost_paired

    a, b = np.asarray(sides.a), np.asarray(sides.b)  # ttost_paired subtracts its arguments
    if sides.test == PAIRED:
        return float(ttost_paired(a, b, -margin, margin)[0])
    return float(ttost_ind(a, b, -margin, margin, usevar="unequal")[0])


def _correlation(xa: list[float], xb: list[float]) -> float | None:
    """Pearson correlation (`scipy.stats.pearsonr`) of paired values; None with < 3 pairs or a constant side."""
    if len(xa) < 3 or stdev(xa) == 0 or stdev(xb) == 0:
        return None
    from scipy import stats

    return float(stats.pearsonr(xa, xb).statistic)


# --- power ---------------------------------------------------------------------------------------------


def _power(d: float, n_a: int, n_b: int, paired: bool, level: float) -> float:
    """Power of the two-sided t-test at level `level` for a standardised difference d, as statsmodels
    defines it: P(T > c) + P(T < -c), c = t_{1-level/2, df}, T ~ noncentral t(df, nc) —
    paired (`TTestPower`, n_a pairs): df = n_a - 1, nc = d √n_a; two samples (`TTestIndPower`, nobs1 = n_a,
    ratio = n_b / n_a): df = n_a + n_b - 2, nc = d √(n_a n_b / (n_a + n_b)).

    Evaluated here with both tails as scipy survival functions (P(T < -c) = sf(c; df, -nc)) because
    statsmodels' `power` computes the lower tail with `scipy.special.nctdtr`, which in scipy 1.17
    returns NaN over a band of large nc (scipy/scipy#25470) — at 3 seeds, e.g. n = 3 pairs, d in about
    [4.8, 67] at level 0.05 —, and its `solve_power` then returns a wrong root or its bracket's end (10.0)
    without an error. Where statsmodels' value is finite the two agree to 1e-12 (tests pin it)."""
    from scipy import stats

    df = n_a - 1 if paired else n_a + n_b - 2
    nc = d * math.sqrt(n_a if paired else n_a * n_b / (n_a + n_b))
    critical = stats.t.isf(level / 2, df)
    return float(stats.nct.sf(critical, df, nc) + stats.nct.sf(critical, df, -nc))


@lru_cache(maxsize=256)
def _detectable_d(n_a: int, n_b: int, paired: bool, level: float, power: float) -> float | None:
    """The standardised difference detected with `power` (`scipy.optimize.brentq` on `_power`); 0.0
    when even d = 0 reaches it (power <= level); None when the power is not computable. Cached: the
    pairs of a sweep mostly share their n and level."""
    from scipy import optimize

    def shortfall(d: float) -> float:
        return _power(d, n_a, n_b, paired, level) - power

    if shortfall(0.0) >= 0:
        return 0.0
    high = 1.0
    while (gap := shortfall(high)) < 0 and high < 2.0**40:
        high *= 2
    if not gap >= 0:  # NaN, or no d up to 2^40 sd
        return None
    return float(optimize.brentq(shortfall, 0.0, high, xtol=1e-12, rtol=1e-12))


def _seeds_needed(d: float, paired: bool, level: float, power: float) -> int | None:
    """The least n >= 2 (seeds per point; paired: pairs) whose `_power` at d reaches `power` (the
    power grows with n: doubling, then bisection); None beyond 2^40."""

    def reaches(n: int) -> bool:
        return _power(d, n, n, paired, level) >= power

    high = 2
    while not reaches(high):
        if high >= 2**40:
            return None
        high *= 2
    low = high // 2  # does not reach (or is 1, below the least testable n)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if reaches(middle) else (middle, high)
    return high


# --- family --------------------------------------------------------------------------------------------


def _holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (`multipletests(method='holm')`; its default 'hs' is Holm-Šidák):
    sorted ascending, p_(i) · (m - i + 1), made monotone, capped at 1. Empty in, empty out."""
    if len(p_values) == 0:
        return []
    from statsmodels.stats.multitest import multipletests

    return [float(p) for p in multipletests(p_values, method="holm")[1]]


def _holm_rows(p_values):
    """`_holm` of every row of a (sweeps, hypotheses) array at once: the same step-down adjustment in
    numpy (sort each row, p_(i) · (m - i + 1), running maximum, cap at 1, unsort). Written out because
    statsmodels' `multipletests(method='holm')` runs `gc.collect()` on every call (statsmodels 0.15:
    ~70 ms each once scipy and statsmodels are loaded, minutes for a few thousand simulated sweeps);
    a test pins the two to each other, ties included."""
    import numpy as np

    order = np.argsort(p_values, axis=1)
    ranked = np.take_along_axis(p_values, order, axis=1) * np.arange(p_values.shape[1], 0, -1)
    adjusted = np.empty_like(ranked)
    np.put_along_axis(adjusted, order, np.minimum(np.maximum.accumulate(ranked, axis=1), 1.0), axis=1)
    return adjusted


# --- simulation ----------------------------------------------------------------------------------------


def _noise(rng, noise: str, correlation: float, shape: tuple[int, int, int]):
    """Unit-variance noise of shape (sims, points, seeds), equicorrelated across points within a seed:
    ρ >= 0: √ρ z_seed + √(1 - ρ) e (the seed block); ρ < 0: Σ^½ e with Σ = (1 - ρ) I + ρ J, i.e.
    √(1 - ρ) (e - ē) + √(1 + (k - 1) ρ) ē, ē the mean of e over the k points."""
    if correlation >= 0:
        block = _draws(rng, noise, (shape[0], 1, shape[2]))
        return math.sqrt(correlation) * block + math.sqrt(1 - correlation) * _draws(rng, noise, shape)
    e = _draws(rng, noise, shape)
    centre = e.mean(axis=1, keepdims=True)
    return math.sqrt(1 - correlation) * (e - centre) + math.sqrt(max(0.0, 1 + (shape[1] - 1) * correlation)) * centre


def _draws(rng, noise: str, shape: tuple[int, ...]):
    """Independent unit-variance draws: standard normal, or t with 3 degrees of freedom over √3."""
    return rng.standard_normal(shape) if noise == "normal" else rng.standard_t(3, shape) / math.sqrt(3)


def _simulated_family(values, pairs: Sequence[tuple[int, int]], *, blocked: bool, holm: bool,
                      equivalence: float | None):
    """`compare_all`'s p-values for many sweeps at once. values: (sims, points, seeds), every point with
    every seed. Returns (p, equivalence_p, difference), each (sims, pairs) for the pairs (i, j) of
    `pairs`: the difference and equivalence p-values, Holm-adjusted over each sweep's family when `holm`
    (equivalence_p None without a margin), and mean(a) - mean(b). The tests run vectorised over the
    sweeps (scipy's `ttest_rel` / `ttest_ind(equal_var=False)` along the seeds, statsmodels' TOST
    column-wise), Holm on all rows at once (`_holm_rows`); continuous noise has no constant samples, so
    `statistics`' edge cases do not arise."""
    import numpy as np
    from scipy import stats

    a, b = values[:, [i for i, _ in pairs]], values[:, [j for _, j in pairs]]  # (sims, pairs, seeds)
    if blocked:
        p = stats.ttest_rel(a, b, axis=2).pvalue
    else:
        p = stats.ttest_ind(a, b, axis=2, equal_var=False).pvalue
    family = p if equivalence is None else np.concatenate([p, _simulated_tost(a, b, blocked, equivalence)], axis=1)
    adjusted = _holm_rows(family) if holm else family
    m = len(pairs)
    return adjusted[:, :m], None if equivalence is None else adjusted[:, m:], a.mean(axis=2) - b.mean(axis=2)


def _simulated_tost(a, b, blocked: bool, margin: float):
    """TOST p-values of (sims, pairs, seeds) arrays: statsmodels' `ttost_paired` / `ttost_ind(usevar=
    'unequal')` on columns (one column per sweep and pair)."""
    from statsmodels.stats.weightstats import ttost_ind, ttost_paired

    columns_a, columns_b = a.reshape(-1, a.shape[2]).T, b.reshape(-1, b.shape[2]).T
    if blocked:
        p = ttost_paired(columns_a, columns_b, -margin, margin)[0]
    else:
        p = ttost_ind(columns_a, columns_b, -margin, margin, usevar="unequal")[0]
    return p.reshape(a.shape[:2])


# --- guards --------------------------------------------------------------------------------------------


def _check_level(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and 0 < value < 1):
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def _check_positive(value: float | None, name: str) -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be None or a finite number > 0 (objective units), got {value!r}")


def _checked_values(values: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """values as floats; ValueError for a point without values or with non-finite ones."""
    if not isinstance(values, Mapping):
        raise ValueError(f"values must map point labels to {{seed: value}}, got {type(values).__name__}")
    out = {}
    for label, by_seed in values.items():
        if not isinstance(by_seed, Mapping) or not by_seed:
            raise ValueError(f"point {label!r}: no values (needs {{seed: value}} with at least one seed)")
        out[label] = {seed: float(v) for seed, v in by_seed.items()}
        bad = {seed: v for seed, v in out[label].items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"point {label!r}: non-finite values {bad}")
    return out


def _check_simulation(n_points: int, n_seeds: int, effect: float, noise: str, correlation: float, sims: int) -> None:
    for name, value, least in (("n_points", n_points, 2), ("n_seeds", n_seeds, 2), ("sims", sims, 1)):
        if not (isinstance(value, Integral) and value >= least):
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not (math.isfinite(effect) and effect >= 0):
        raise ValueError(f"effect must be a finite number >= 0 (noise sd units), got {effect!r}")
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    least = -1 / (n_points - 1)
    if not least <= correlation < 1:
        raise ValueError(f"correlation must be in [{least:.3g}, 1) for {n_points} points, got {correlation!r}")
