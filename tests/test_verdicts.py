"""Verdicts of a sweep (lightning_mim.verdicts): every pair compared, Holm over the family, pinned to
scipy and statsmodels on fixed numbers, and calibrated on simulated sweeps with a known truth."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower
from statsmodels.stats.weightstats import ttost_ind, ttost_paired

from lightning_mim import verdicts
from lightning_mim.statistics import paired_p_value, welch_p_value
from lightning_mim.verdicts import (
    BEST,
    DIFFERENT,
    DIFFERENT_FROM_BEST,
    EQUIVALENT,
    EQUIVALENT_TO_BEST,
    NOT_DISTINGUISHED,
    OPEN,
    PAIRED,
    UNTESTABLE,
    WELCH,
    WORSE,
    best_group,
    compare_all,
    point_verdicts,
    simulate,
)

ALPHA = 0.05
COSINE = [2.99, 3.10, 3.25]
LINEAR = [3.31, 4.65, 3.90]
SQRT = [6.03, 6.29, 6.10]
SIMS = 4000
BOUND = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / SIMS)  # a true rate of α, plus 3 Monte-Carlo sds


def by_seed(values, first_seed: int = 0) -> dict[str, float]:
    return {str(first_seed + i): v for i, v in enumerate(values)}


def pair(comparisons, a: str, b: str):
    return next(c for c in comparisons if (c.a, c.b) == (a, b))


# --- Holm over the family -----------------------------------------------------------------------------


def test_holm_is_statsmodels_holm_not_its_default():
    assert verdicts._holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06], abs=1e-15)  # by hand
    assert verdicts._holm([]) == []
    hs = multipletests([0.01, 0.04, 0.03])[1]  # the default, Holm-Šidák, is another procedure
    assert hs[0] == pytest.approx(1 - 0.99**3) and hs[0] != pytest.approx(0.03)
    # the vectorised form the simulation uses is the same adjustment, row by row, ties and caps included
    rows = np.array([[0.01, 0.04, 0.03, 0.5], [0.02, 0.02, 0.02, 0.9], [0.3, 0.001, 0.3, 0.2], [0.9, 0.8, 0.7, 0.6]])
    assert verdicts._holm_rows(rows) == pytest.approx(np.array([multipletests(r, method="holm")[1] for r in rows]))


def test_every_pair_is_compared_in_input_order_with_holm_over_the_family():
    comparisons = compare_all({"linear": by_seed(LINEAR), "cosine": by_seed(COSINE), "sqrt": by_seed(SQRT)})
    assert [(c.a, c.b) for c in comparisons] == [("linear", "cosine"), ("linear", "sqrt"), ("cosine", "sqrt")]
    raw = [stats.ttest_rel(x, y).pvalue for x, y in ((LINEAR, COSINE), (LINEAR, SQRT), (COSINE, SQRT))]
    adjusted = multipletests(raw, method="holm")[1]
    for c, p, q in zip(comparisons, raw, adjusted):
        assert c.test == PAIRED and c.p_value == pytest.approx(p, abs=1e-12)
        assert c.p_adjusted == pytest.approx(q, abs=1e-12)
        assert c.verdict == (DIFFERENT if q < ALPHA else OPEN)
    # by hand: raw 0.149648, 0.019737, 0.001055; smallest x 3, next x 2, largest x 1 (kept monotone)
    assert [c.p_value for c in comparisons] == pytest.approx([0.149648, 0.019737, 0.001055], abs=1e-6)
    assert [c.p_adjusted for c in comparisons] == pytest.approx([0.149648, 2 * 0.0197375, 3 * 0.00105477], abs=1e-6)
    assert [c.verdict for c in comparisons] == [OPEN, DIFFERENT, DIFFERENT]
    strict = compare_all({"linear": by_seed(LINEAR), "cosine": by_seed(COSINE), "sqrt": by_seed(SQRT)}, alpha=0.03)
    assert [c.verdict for c in strict] == [OPEN, OPEN, DIFFERENT]  # 0.0197 < 0.03 alone, not x 2


def test_with_a_margin_the_equivalence_tests_join_the_same_family():
    values = {"cosine": by_seed(COSINE), "linear": by_seed(LINEAR), "sqrt": by_seed(SQRT)}
    comparisons = compare_all(values, equivalence=0.5)
    raw = [c.p_value for c in comparisons] + [c.equivalence_p for c in comparisons]
    adjusted = multipletests(raw, method="holm")[1]
    assert [c.p_adjusted for c in comparisons] == pytest.approx(adjusted[:3], abs=1e-12)
    assert [c.equivalence_p_adjusted for c in comparisons] == pytest.approx(adjusted[3:], abs=1e-12)
    # a family of 6: the first Holm step is now α/6
    without = compare_all(values)
    assert all(c.p_adjusted >= w.p_adjusted for c, w in zip(comparisons, without))
    assert all(c.equivalence_p is None and c.equivalence_p_adjusted is None for c in without)


def test_untestable_pairs_are_reported_and_left_out_of_the_family():
    values = {"cosine": by_seed(COSINE), "linear": by_seed(LINEAR), "one": {"7": 3.0}}
    comparisons = compare_all(values)
    untestable = [c for c in comparisons if "one" in (c.a, c.b)]
    assert [c.verdict for c in untestable] == [UNTESTABLE, UNTESTABLE]
    for c in untestable:
        assert c.test == WELCH and (c.p_value, c.p_adjusted, c.ci_low, c.detectable, c.seeds_needed) == (None,) * 5
    only = pair(comparisons, "cosine", "linear")
    assert only.p_adjusted == only.p_value  # a family of one
    assert compare_all({"a": {"0": 1.0}}) == []  # one point: no pairs


# --- which test: the design ---------------------------------------------------------------------------


def test_shared_seeds_are_compared_paired_whatever_welch_would_say():
    a, b = [1.0, 2.0, 3.0, 4.0], [1.3, 2.1, 3.6, 4.2]
    c = compare_all({"a": by_seed(a), "b": by_seed(b)})[0]
    assert c.test == PAIRED and (c.n_a, c.n_b) == (4, 4)
    assert c.p_value == pytest.approx(stats.ttest_rel(a, b).pvalue, abs=1e-12) == paired_p_value(a, b)
    assert c.difference == pytest.approx(np.mean(np.subtract(a, b)))
    assert c.correlation == pytest.approx(stats.pearsonr(a, b).statistic)
    assert (c.ci_low, c.ci_high) == pytest.approx(tuple(stats.ttest_rel(a, b).confidence_interval(0.95)))
    # the same numbers without blocking: Welch's test, whose p is larger here; the design decides, not p
    w = compare_all({"a": by_seed(a), "b": by_seed(b)}, blocked=False)[0]
    assert w.test == WELCH and w.p_value == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, abs=1e-12)
    assert w.p_value > c.p_value
    welch_interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (w.ci_low, w.ci_high) == pytest.approx(tuple(welch_interval))
    assert w.correlation == c.correlation  # reported whichever the test


def test_disjoint_or_single_common_seeds_are_compared_by_welch():
    a, b = [1.0, 2.0, 3.0], [2.5, 3.1, 3.9, 5.0]
    disjoint = compare_all({"a": by_seed(a), "b": by_seed(b, first_seed=10)})[0]
    assert disjoint.test == WELCH and (disjoint.n_a, disjoint.n_b) == (3, 4) and disjoint.correlation is None
    assert disjoint.p_value == welch_p_value(a, b)
    assert disjoint.p_value == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, abs=1e-12)
    assert disjoint.difference == pytest.approx(np.mean(a) - np.mean(b))
    one_common = compare_all({"a": by_seed(a), "b": by_seed(b, first_seed=2)})[0]  # seed "2" only
    assert one_common.test == WELCH and one_common.p_value == disjoint.p_value


def test_partly_shared_seeds_are_paired_over_the_common_ones():
    a = {"0": 1.0, "1": 2.0, "2": 3.5, "3": 9.0}
    b = {"1": 2.4, "2": 3.6, "0": 1.5, "5": -4.0}
    c = compare_all({"a": a, "b": b})[0]
    common_a, common_b = [1.0, 2.0, 3.5], [1.5, 2.4, 3.6]  # matched by seed, not by position
    assert c.test == PAIRED and (c.n_a, c.n_b) == (3, 3)
    assert c.p_value == pytest.approx(stats.ttest_rel(common_a, common_b).pvalue, abs=1e-12)
    assert c.correlation == pytest.approx(stats.pearsonr(common_a, common_b).statistic)
    two = compare_all({"a": a, "b": {"0": 1.5, "1": 2.4}})[0]
    assert two.test == PAIRED and two.n_a == 2 and two.correlation is None  # correlation needs 3 pairs


# --- equivalence --------------------------------------------------------------------------------------


def test_equivalence_is_statsmodels_tost_paired_or_unequal_variance():
    a, b = [1.0, 2.0, 3.0, 4.0], [1.3, 2.1, 3.6, 4.2]
    paired = compare_all({"a": by_seed(a), "b": by_seed(b)}, equivalence=1.0)[0]
    assert paired.equivalence_p == pytest.approx(ttost_paired(np.array(a), np.array(b), -1.0, 1.0)[0], abs=1e-12)
    welch = compare_all({"a": by_seed(a), "b": by_seed(b)}, equivalence=1.0, blocked=False)[0]
    assert welch.equivalence_p == pytest.approx(ttost_ind(a, b, -1.0, 1.0, usevar="unequal")[0], abs=1e-12)
    lopsided = [1.0, 1.1, 0.9], [0.2, 2.9, 0.4, 3.1, 1.6]
    unequal = compare_all({"a": by_seed(lopsided[0]), "b": by_seed(lopsided[1], 10)}, equivalence=1.5)[0]
    assert unequal.equivalence_p == pytest.approx(ttost_ind(*lopsided, -1.5, 1.5, usevar="unequal")[0], abs=1e-12)
    assert unequal.equivalence_p != pytest.approx(ttost_ind(*lopsided, -1.5, 1.5)[0])  # statsmodels' pooled default


def test_points_well_inside_the_margin_with_enough_seeds_are_equivalent():
    rng = np.random.default_rng(3)
    seed_effect = rng.normal(0, 1, 10)
    a = 5 + seed_effect + rng.normal(0, 0.05, 10)
    b = 5 + seed_effect + rng.normal(0, 0.05, 10)
    c = compare_all({"a": by_seed(a), "b": by_seed(b)}, equivalence=0.2)[0]
    assert c.verdict == EQUIVALENT and c.equivalence_p_adjusted < ALPHA <= c.p_adjusted
    # Welch's test sees the seed effect as noise: the same numbers are not shown equivalent
    assert compare_all({"a": by_seed(a), "b": by_seed(b)}, equivalence=0.2, blocked=False)[0].verdict == OPEN


# --- power ---------------------------------------------------------------------------------------------


def test_detectable_difference_and_seeds_needed_are_statsmodels_power():
    rng = np.random.default_rng(0)
    points = {name: by_seed(rng.normal(0, 1, 10)) for name in ("a", "b", "c")}
    c = compare_all(points, effect=0.8)[0]
    level = ALPHA / 3  # Holm's first step over the 3 comparisons
    differences = np.subtract(list(points["a"].values()), list(points["b"].values()))
    sd = np.std(differences, ddof=1)
    d = TTestPower().solve_power(effect_size=None, nobs=10, alpha=level, power=0.8)
    assert c.detectable == pytest.approx(d * sd, rel=1e-6)
    n = TTestPower().solve_power(effect_size=0.8 / sd, nobs=None, alpha=level, power=0.8)
    assert c.seeds_needed == math.ceil(n) and not c.effect_is_observed
    power = TTestPower().power  # by hand: the solved n reaches 80 %, one seed fewer does not
    assert power(0.8 / sd, c.seeds_needed, level) >= 0.8 > power(0.8 / sd, c.seeds_needed - 1, level)
    # with a margin the family has 6 hypotheses: the level is α/6 and the detectable difference larger
    assert compare_all(points, effect=0.8, equivalence=0.5)[0].detectable > c.detectable
    observed = compare_all(points)[0]
    assert observed.effect_is_observed and observed.seeds_needed == math.ceil(
        TTestPower().solve_power(effect_size=abs(observed.difference) / sd, nobs=None, alpha=level, power=0.8))


def test_welch_power_is_statsmodels_two_sample_power_with_unequal_sizes():
    a, b = [1.0, 2.5, 1.7, 2.2, 0.9], [2.0, 3.1, 2.4, 3.9, 2.2, 3.0, 2.7, 3.3]
    c = compare_all({"a": by_seed(a), "b": by_seed(b, 10)}, effect=1.0)[0]
    sd = math.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)
    d = TTestIndPower().solve_power(effect_size=None, nobs1=5, ratio=8 / 5, alpha=ALPHA, power=0.8)
    assert c.test == WELCH and c.detectable == pytest.approx(d * sd, rel=1e-6)
    n = TTestIndPower().solve_power(effect_size=1.0 / sd, nobs1=None, ratio=1.0, alpha=ALPHA, power=0.8)
    assert c.seeds_needed == math.ceil(n)


def test_power_is_right_at_three_seeds_where_statsmodels_solver_is_not():
    """At 3 pairs and α/3, statsmodels' power is NaN over the root's neighbourhood (scipy 1.17's
    nctdtr) and its solver returns a wrong root; `_power` agrees with statsmodels wherever statsmodels is
    finite, and a Monte-Carlo run of the t-test confirms its answer where statsmodels has none."""
    grid = [(d, n, level) for d in (0.3, 1.0, 2.0, 3.0) for n in (3, 5, 10) for level in (0.05, 0.05 / 6)]
    for d, n, level in grid:
        ours, theirs = verdicts._power(d, n, n, True, level), TTestPower().power(d, n, level)
        if math.isfinite(theirs):
            assert ours == pytest.approx(theirs, abs=1e-12)
        ours, theirs = verdicts._power(d, n, n + 2, False, level), TTestIndPower().power(d, n, level, ratio=(n + 2) / n)
        if math.isfinite(theirs):
            assert ours == pytest.approx(theirs, abs=1e-12)
    d = verdicts._detectable_d(3, 3, True, ALPHA / 3, 0.8)
    differences = np.random.default_rng(0).normal(d, 1.0, size=(40_000, 3))
    rejected = (stats.ttest_1samp(differences, 0.0, axis=1).pvalue < ALPHA / 3).mean()
    assert rejected == pytest.approx(0.8, abs=0.01)  # MC sd 0.002
    assert d == pytest.approx(5.667, abs=1e-3)


# --- edge cases as `statistics` has them -----------------------------------------------------------------


def test_constant_samples_read_as_exact_values():
    shifted = compare_all({"a": by_seed([1.0, 2.0, 3.0]), "b": by_seed([1.5, 2.5, 3.5])}, equivalence=1.0)[0]
    assert shifted.p_value == 0.0 == paired_p_value([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])  # differences all -0.5
    assert (shifted.ci_low, shifted.ci_high) == (-0.5, -0.5) and shifted.equivalence_p == 0.0
    assert shifted.detectable == 0.0 and shifted.seeds_needed is None and shifted.verdict == DIFFERENT
    outside = compare_all({"a": by_seed([1.0, 2.0, 3.0]), "b": by_seed([2.0, 3.0, 4.0])}, equivalence=0.5)[0]
    assert outside.equivalence_p == 1.0
    flat = compare_all({"a": by_seed([2.0, 2.0]), "b": by_seed([2.0, 2.0], 5)})[0]
    assert flat.test == WELCH and flat.p_value == 1.0 == welch_p_value([2.0, 2.0], [2.0, 2.0]) and flat.verdict == OPEN
    assert flat.seeds_needed is None and flat.correlation is None


def test_bad_input_is_refused_in_one_line():
    good = {"a": by_seed(COSINE), "b": by_seed(LINEAR)}
    for kwargs in ({"alpha": 0.0}, {"alpha": 1.5}, {"alpha": float("nan")}, {"power": 1.0},
                   {"equivalence": -0.1}, {"equivalence": 0.0}, {"effect": -1.0}, {"effect": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            compare_all(good, **kwargs)
    with pytest.raises(ValueError, match="'b': no values"):
        compare_all({"a": by_seed(COSINE), "b": {}})
    with pytest.raises(ValueError, match="non-finite"):
        compare_all({"a": by_seed(COSINE), "b": by_seed([1.0, float("nan")])})
    with pytest.raises(ValueError, match="direction"):
        point_verdicts(compare_all(good), {"a": 3.0, "b": 4.0}, "up")
    with pytest.raises(ValueError, match="no comparison"):
        point_verdicts(compare_all(good), {"a": 3.0, "b": 4.0, "c": 5.0}, "minimize")
    for kwargs in ({"correlation": -0.6}, {"correlation": 1.0}, {"noise": "cauchy"}, {"sims": 0}, {"effect": -1.0},
                   {"equivalence": -1.0}, {"alpha": 2.0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            simulate(3, 3, **{"sims": 10, **kwargs})
    with pytest.raises(ValueError, match="n_seeds"):
        simulate(3, 1, sims=10)


# --- per point ---------------------------------------------------------------------------------------


def test_point_verdicts_read_each_point_against_the_best():
    values = {"cosine": by_seed(COSINE), "linear": by_seed(LINEAR), "sqrt": by_seed(SQRT), "one": {"0": 4.0}}
    means = {label: float(np.mean(list(v.values()))) for label, v in values.items()}
    comparisons = compare_all(values)
    got = point_verdicts(comparisons, means, "minimize")
    assert got == {"cosine": BEST, "linear": NOT_DISTINGUISHED, "sqrt": WORSE, "one": UNTESTABLE}
    assert best_group(comparisons, means, "minimize") == ["cosine", "linear", "one"]
    maxed = point_verdicts(comparisons, means, "maximize")
    assert maxed["sqrt"] == BEST and maxed["cosine"] == WORSE
    rng = np.random.default_rng(3)
    seed_effect = rng.normal(0, 1, 10)
    close = {"a": by_seed(5 + seed_effect), "b": by_seed(5 + seed_effect + rng.normal(0, 0.05, 10))}
    means = {label: float(np.mean(list(v.values()))) for label, v in close.items()}
    got = point_verdicts(compare_all(close, equivalence=0.2), means, "maximize")
    assert got == {"a": BEST, "b": EQUIVALENT_TO_BEST}
    # a difference shown both nonzero and within the margin reads DIFFERENT (the equivalence p is kept)
    precise = {"a": close["a"], "b": by_seed(5.01 + seed_effect + rng.normal(0, 0.01, 10))}
    c = compare_all(precise, equivalence=0.2)[0]
    assert c.p_adjusted < ALPHA and c.equivalence_p_adjusted < ALPHA and c.verdict == DIFFERENT


def test_a_difference_favouring_the_other_point_on_common_seeds_is_not_called_worse():
    best = {"0": 1.0, "1": 1.0, "2": -10.0}  # the lowest mean thanks to seed 2, which the other lacks
    other = {"0": 0.5, "1": 0.5}  # lower than best on both common seeds, by exactly 0.5: p = 0
    comparisons = compare_all({"best": best, "other": other})
    assert comparisons[0].verdict == DIFFERENT
    assert point_verdicts(comparisons, {"best": -8 / 3, "other": 0.5}, "minimize")["other"] == DIFFERENT_FROM_BEST


# --- calibration on simulated sweeps ----------------------------------------------------------------------


def test_simulation_reads_sweeps_exactly_as_compare_all_does():
    """3 sweeps x 4 points x 4 seeds read at α = 0.3, with and without a margin of 2 sd: the same
    adjusted p-values and verdicts, all three verdicts occurring (few sweeps: compare_all's Holm costs
    ~0.3 s a call in this process, where statsmodels' runs gc.collect() over torch's objects)."""
    values = np.random.default_rng(1).normal(size=(3, 4, 4)) + np.array([0.0, 0.3, 1.0, 3.0])[None, :, None]
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    seen = set()
    for blocked in (True, False):
        for margin in (None, 2.0):
            p, equivalence_p, _ = verdicts._simulated_family(values, pairs, blocked=blocked, holm=True,
                                                             equivalence=margin)
            for sweep in range(len(values)):
                points = {str(i): by_seed(values[sweep, i]) for i in range(4)}
                comparisons = compare_all(points, alpha=0.3, blocked=blocked, equivalence=margin)
                assert [c.p_adjusted for c in comparisons] == pytest.approx(p[sweep], abs=1e-12)
                if margin is not None:
                    adjusted = [c.equivalence_p_adjusted for c in comparisons]
                    assert adjusted == pytest.approx(equivalence_p[sweep], abs=1e-12)
                equivalence_row = 1.0 if margin is None else equivalence_p[sweep]
                different, equivalent = verdicts._rejected(p[sweep], equivalence_row, 0.3)
                expected = [DIFFERENT if d else EQUIVALENT if e else OPEN for d, e in zip(different, equivalent)]
                assert [c.verdict for c in comparisons] == expected, (blocked, margin, sweep)
                seen.update(expected)
    assert seen == {DIFFERENT, EQUIVALENT, OPEN}


@pytest.mark.parametrize("n_points, n_seeds, noise, correlation, blocked", [
    (3, 3, "normal", 0.0, True), (3, 3, "normal", 0.8, True), (3, 3, "t3", 0.8, True), (3, 3, "normal", -0.5, True),
    (12, 3, "normal", 0.8, True), (12, 3, "t3", 0.0, True), (3, 10, "normal", 0.8, True), (3, 10, "t3", -0.5, True),
    (3, 3, "normal", 0.0, False), (12, 3, "normal", 0.0, False), (3, 10, "t3", 0.0, False),
])
def test_holm_keeps_the_familywise_false_positive_rate_of_a_a_sweeps(n_points, n_seeds, noise, correlation, blocked):
    result = simulate(n_points, n_seeds, noise=noise, correlation=correlation, blocked=blocked, sims=SIMS, seed=11)
    assert result["fwer"] <= BOUND, result
    assert math.isnan(result["power"]) and result["mc_error"] == pytest.approx(
        math.sqrt(result["fwer"] * (1 - result["fwer"]) / SIMS))


def test_without_holm_the_false_positive_rate_grows_with_the_number_of_pairs():
    """Measured (20 000 sweeps, paired, normal): 0.139 at 3 points x 3 seeds, 0.919 at 12 points."""
    assert simulate(3, 3, holm=False, sims=SIMS, seed=11)["fwer"] > 0.11
    assert simulate(12, 3, holm=False, sims=SIMS, seed=11)["fwer"] > 0.85
    assert simulate(12, 3, holm=True, sims=SIMS, seed=11)["fwer"] <= BOUND


def test_paired_verdicts_ignore_a_shared_seed_effect_and_welch_counts_it_as_noise():
    """With the seed effect common to all points, the paired differences do not contain it: on A/A
    sweeps the paired reading is the same whatever the correlation (same sweeps, same numbers: the t
    statistic does not see the scale √(1 - ρ)); Welch's test becomes conservative as the correlation
    grows (measured 0.027 -> 0.004 at 3 x 3)."""
    a_a = dict(sims=SIMS, seed=5)
    assert simulate(3, 3, correlation=0.0, **a_a) == simulate(3, 3, correlation=0.8, **a_a)
    welch_blocked = simulate(3, 3, correlation=0.8, blocked=False, **a_a)
    assert welch_blocked["fwer"] < 0.01 < simulate(3, 3, blocked=False, **a_a)["fwer"]


def test_welch_on_blocked_data_with_negative_correlation_is_anti_conservative():
    """Measured (20 000 sweeps, Holm): at 3 points x 10 seeds with ρ = -0.5, Welch 0.109, paired 0.044;
    at 3 seeds the conservatism of Welch's few degrees of freedom hides it (0.052 at ρ = -0.5)."""
    welch = simulate(3, 10, correlation=-0.5, blocked=False, sims=SIMS, seed=7)
    paired = simulate(3, 10, correlation=-0.5, blocked=True, sims=SIMS, seed=7)
    assert welch["fwer"] > 0.08 and paired["fwer"] <= BOUND


def test_equivalence_is_rarely_shown_at_the_margin():
    """effect = margin: the pairs with point 0 sit exactly on the equivalence null. Measured (20 000
    sweeps, paired): one unadjusted TOST (2 points x 10 seeds) 0.043; unadjusted over 3 points x 10
    seeds (two pairs on the margin) 0.082; with Holm 0.0095 there and 0.0069 at 3 seeds; with a seed
    correlation of 0.8 (the difference test rejects first, leaving the TOST nearly α) 0.044 at 2 x 10."""
    one = simulate(2, 10, effect=1.0, equivalence=1.0, holm=False, sims=SIMS, seed=3)
    assert one["false_equivalence"] <= BOUND
    for n_points, n_seeds, correlation in ((3, 3, 0.0), (3, 10, 0.0), (2, 10, 0.8), (3, 10, 0.8)):
        result = simulate(n_points, n_seeds, effect=1.0, equivalence=1.0, correlation=correlation, sims=SIMS, seed=3)
        assert result["false_equivalence"] <= BOUND, (n_points, n_seeds, correlation, result)
    assert simulate(3, 10, effect=1.0, equivalence=1.0, holm=False, sims=SIMS, seed=3)["false_equivalence"] > 0.065
    assert math.isnan(simulate(3, 3, effect=1.0, sims=10)["false_equivalence"])
    assert simulate(3, 3, effect=0.5, equivalence=1.0, sims=10)["false_equivalence"] == 0.0  # no pair that far apart


def test_power_as_measured():
    """Measured (20 000 sweeps, paired + Holm, normal noise; power = every pair with the better point
    found): 3 sd at 10 seeds 0.999; at 3 seeds 0.107 with independent seeds and 0.667 with a seed
    correlation of 0.8 (Welch: 0.273 and 0.446); 12 points x 3 seeds never find all 11."""
    assert simulate(3, 10, effect=3.0, sims=SIMS, seed=2)["power"] > 0.99
    independent = simulate(3, 3, effect=3.0, sims=SIMS, seed=2)
    blocked = simulate(3, 3, effect=3.0, correlation=0.8, sims=SIMS, seed=2)
    assert independent["power"] < 0.2 and 0.6 < blocked["power"] < 0.75
    assert independent["fwer"] <= BOUND and blocked["fwer"] <= BOUND
    welch = simulate(3, 3, effect=3.0, blocked=False, sims=SIMS, seed=2)
    welch_blocked = simulate(3, 3, effect=3.0, correlation=0.8, blocked=False, sims=SIMS, seed=2)
    assert welch["power"] > independent["power"] and welch_blocked["power"] < blocked["power"]
    assert simulate(12, 3, effect=3.0, correlation=0.8, sims=SIMS, seed=2)["power"] < 0.01


def test_simulation_is_deterministic_and_the_module_imports_nothing_heavy():
    assert simulate(4, 3, effect=1.0, sims=200, seed=9) == simulate(4, 3, effect=1.0, sims=200, seed=9)
    code = ("import sys, lightning_mim.verdicts; heavy = [m for m in ('scipy', 'statsmodels', 'numpy', 'torch', "
            "'lightning', 'pydantic', 'lightning_mim.orchestration') if m in sys.modules]; print(heavy)")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
