"""Across-seed statistics (lightning_mim.statistics) and the per-point sweep summary, pinned to scipy
on fixed numbers."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from lightning_mim.orchestration.summary import (
    TrialOutcome,
    format_comparison,
    format_estimate,
    parent_metrics,
    summarize,
    table_rows,
)
from lightning_mim.statistics import mean_interval, paired_p_value, resolved, welch_p_value

COSINE = [2.99, 3.10, 3.25]
LINEAR = [3.31, 4.65, 3.90]
SQRT = [6.03, 6.29, 6.10]


def test_interval_is_students_t_as_scipy_computes_it():
    est = mean_interval(COSINE)
    low, high = stats.t.interval(0.95, df=2, loc=sum(COSINE) / 3, scale=stats.sem(COSINE))
    assert est.n == 3 and est.mean == pytest.approx(sum(COSINE) / 3, abs=1e-12)
    assert (est.low, est.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    # by hand: t_{0.975,2} = 4.302653 times s/sqrt(3)
    s = math.sqrt(sum((x - est.mean) ** 2 for x in COSINE) / 2)
    assert est.half_width == pytest.approx(4.302652729749464 * s / math.sqrt(3), rel=1e-9)
    est90 = mean_interval(COSINE, confidence=0.9)
    assert est90.half_width < est.half_width


def test_one_seed_has_no_interval_and_bad_input_is_refused():
    est = mean_interval([3.1])
    assert (est.mean, est.n, est.low, est.high, est.half_width) == (3.1, 1, None, None, None)
    assert format_estimate(est) == "3.1000 (n=1)"
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([1.0, 2.0], confidence=1.0)


def test_welch_test_matches_scipy_and_edge_cases():
    p = welch_p_value(COSINE, LINEAR)
    assert p == pytest.approx(stats.ttest_ind(COSINE, LINEAR, equal_var=False).pvalue, abs=1e-12)
    assert p > 0.05 and resolved(p) is False  # cosine vs linear: not resolved at 3 seeds
    q = welch_p_value(COSINE, SQRT)
    assert q < 0.05 and resolved(q) is True
    assert welch_p_value([1.0], [2.0, 3.0]) is None and resolved(None) is None
    assert welch_p_value([1.0, 1.0], [1.0, 1.0]) == 1.0 and welch_p_value([1.0, 1.0], [2.0, 2.0]) == 0.0


def outcomes(per_point: dict[str, list[float]], state: str = "COMPLETE") -> list[TrialOutcome]:
    out, number = [], 0
    for schedule, values in per_point.items():
        for seed, value in enumerate(values):
            metrics = {"val/fid_domain": value, "val/cas": 1 - value / 10}
            out.append(TrialOutcome(number, {"schedule": schedule, "seed": str(seed)}, state, value, metrics))
            number += 1
    return out


def holm(pvalues):
    from statsmodels.stats.multitest import multipletests

    return list(multipletests(pvalues, method="holm")[1])


def test_summary_pools_seeds_per_point_and_compares_every_pair_with_holm():
    trials = outcomes({"linear": LINEAR, "sqrt": SQRT, "cosine": COSINE})
    trials.append(TrialOutcome(99, {"schedule": "log", "seed": "0"}, "FAIL", None, {}))
    summary = summarize(trials, "val/fid_domain", "minimize")
    points = summary.points
    assert [p.params["schedule"] for p in points] == ["cosine", "linear", "sqrt"]  # best first; FAIL left out
    best, linear, sqrt = points
    assert best.is_best and best.p_vs_best is None and format_comparison(best) == "best"
    assert best.seeds == ["0", "1", "2"] and len(best.trials) == 3
    # every pair, paired by seed (the points share seeds 0, 1, 2), Holm over the three
    raw = {("schedule=cosine", "schedule=linear"): stats.ttest_rel(COSINE, LINEAR).pvalue,
           ("schedule=cosine", "schedule=sqrt"): stats.ttest_rel(COSINE, SQRT).pvalue,
           ("schedule=linear", "schedule=sqrt"): stats.ttest_rel(LINEAR, SQRT).pvalue}
    adjusted = dict(zip(raw, holm(list(raw.values()))))
    assert len(summary.comparisons) == 3 and {c.test for c in summary.comparisons} == {"paired"}
    for c in summary.comparisons:
        key = tuple(sorted((c.a, c.b)))
        assert c.p_value == pytest.approx(raw[key], abs=1e-12) and c.p_adjusted == pytest.approx(adjusted[key], abs=1e-12)
    assert linear.p_vs_best == pytest.approx(adjusted[("schedule=cosine", "schedule=linear")], abs=1e-12)
    assert (sqrt.verdict, linear.verdict) == ("worse than best", "not distinguished from best")
    assert format_comparison(sqrt) == f"worse than best (p={sqrt.p_vs_best:.2g}, paired)"
    cas = best.estimates["val/cas"]
    assert cas.mean == pytest.approx(sum(1 - v / 10 for v in COSINE) / 3)
    maxed = summarize(trials, "val/cas", "maximize")
    assert maxed.points[0].params["schedule"] == "cosine"  # highest CAS first


def test_table_rows_and_parent_metrics_carry_the_same_numbers():
    summary = summarize(outcomes({"cosine": COSINE, "sqrt": SQRT}), "val/fid_domain", "minimize")
    points = summary.points
    rows = table_rows(summary)
    assert rows[0]["point"] == "schedule=cosine" and rows[0]["n_seeds"] == 3 and rows[0]["verdict"] == "best"
    assert rows[1]["verdict"] == "worse than best" and rows[1]["p_vs_best"] == points[1].p_vs_best
    assert rows[1]["test"] == "paired"
    metrics = parent_metrics(summary)
    est = points[0].estimates["val/fid_domain"]
    assert metrics["point/schedule_cosine/val/fid_domain/mean"] == est.mean
    assert metrics["point/schedule_cosine/val/fid_domain/ci_low"] == est.low
    assert metrics["point/schedule_cosine/n_seeds"] == 3.0
    assert metrics["point/schedule_sqrt/p_vs_best"] == points[1].p_vs_best
    assert all(set(k) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_/. -") for k in metrics)


def test_single_seed_summary_says_no_interval():
    points = summarize(outcomes({"cosine": [3.0], "sqrt": [6.0]}), "val/fid_domain", "minimize").points
    assert format_estimate(points[0].estimates["val/fid_domain"]) == "3.0000 (n=1)"
    assert points[1].p_vs_best is None and format_comparison(points[1]) == "n/a (needs 2+ seeds)"
    summary = summarize(outcomes({"cosine": [3.0], "sqrt": [6.0]}), "val/fid_domain", "minimize")
    assert "point/schedule_cosine/val/fid_domain/ci_low" not in parent_metrics(summary)


def test_rows_read_back_give_the_same_estimates():
    import pandas as pd

    from lightning_mim.orchestration.summary import estimates_from_row, table_json

    summary = summarize(outcomes({"cosine": COSINE, "sqrt": [6.0]}), "val/fid_domain", "minimize")
    table = table_json(table_rows(summary))
    frame = pd.DataFrame(table["data"], columns=table["columns"])  # as mlflow.load_table returns it (NaN for None)
    for point, (_, row) in zip(summary.points, frame.iterrows()):
        back = estimates_from_row(row.to_dict())
        assert back.keys() == point.estimates.keys()
        for name, estimate in point.estimates.items():
            assert format_estimate(back[name]) == format_estimate(estimate)


# The steps sweep of docs/RESULTS.md "Decoding steps, on the same models": the cosine models of seeds 0, 1, 2
# evaluated at T = 4 and T = 12 (FID_domain).
COSINE_T4 = [3.566, 4.641, 4.054]
COSINE_T12 = [2.756, 3.221, 2.931]


def test_paired_test_matches_scipy_and_edge_cases():
    p = paired_p_value(COSINE_T4, COSINE_T12)
    assert p == pytest.approx(stats.ttest_rel(COSINE_T4, COSINE_T12).pvalue, abs=1e-12)
    assert p < 0.05 < welch_p_value(COSINE_T4, COSINE_T12)  # the shared seed-to-seed spread is not noise here
    assert paired_p_value([1.0], [2.0]) is None
    assert paired_p_value([1.0, 2.0], [1.0, 2.0]) == 1.0 and paired_p_value([1.0, 2.0], [2.0, 3.0]) == 0.0
    with pytest.raises(ValueError, match="equal lengths"):
        paired_p_value([1.0, 2.0], [1.0, 2.0, 3.0])


def steps_outcomes(per_point: dict[tuple[str, str], list[float]]) -> list[TrialOutcome]:
    out = []
    for (schedule, steps), values in per_point.items():
        for seed, value in enumerate(values):
            params = {"schedule": schedule, "decode.steps": steps, "seed": str(seed)}
            out.append(TrialOutcome(len(out), params, "COMPLETE", value, {"val/fid_domain": value}))
    return out


def test_points_are_compared_by_seed_by_design_and_welch_only_without_common_seeds():
    """Seed i of every point shares init, data order and evaluation draws: the design pairs by seed,
    whatever the axis (inference-only or trained) and whatever the p-values say."""
    trials = steps_outcomes({("cosine", "12"): COSINE_T12, ("cosine", "4"): COSINE_T4, ("linear", "12"): LINEAR})
    summary = summarize(trials, "val/fid_domain", "minimize")
    best, linear, t4 = summary.points  # means 2.97, 3.95, 4.09
    assert best.params == {"schedule": "cosine", "decode.steps": "12"} and best.test is None
    assert t4.test == linear.test == "paired"
    assert t4.vs_best.p_value == pytest.approx(stats.ttest_rel(COSINE_T4, COSINE_T12).pvalue)
    assert linear.vs_best.p_value == pytest.approx(stats.ttest_rel(LINEAR, COSINE_T12).pvalue)
    assert [row["test"] for row in table_rows(summary)] == [None, "paired", "paired"]
    assert "paired t-test" in summary.legend() and "Holm" in summary.legend()
    # pairs are matched by seed: a point missing a seed pairs over the seeds both have (here 2)
    partial = [t for t in trials if not (t.params["decode.steps"] == "4" and t.params["seed"] == "1")]
    t4_partial = next(p for p in summarize(partial, "val/fid_domain", "minimize").points if p.params["decode.steps"] == "4")
    kept = [0, 2]
    assert t4_partial.test == "paired" and t4_partial.vs_best.n_a == 2
    assert t4_partial.vs_best.p_value == pytest.approx(
        stats.ttest_rel([COSINE_T4[i] for i in kept], [COSINE_T12[i] for i in kept]).pvalue
    )
    # disjoint seeds (replicates of an A/A design): nothing to pair, Welch's test
    shifted = [TrialOutcome(t.number, {**t.params, "seed": str(int(t.params["seed"]) + 10)}, t.state, t.value, t.metrics)
               if t.params["decode.steps"] == "4" else t for t in trials]
    t4_welch = next(p for p in summarize(shifted, "val/fid_domain", "minimize").points if p.params["decode.steps"] == "4")
    assert t4_welch.test == "welch" and t4_welch.vs_best.p_value == pytest.approx(welch_p_value(COSINE_T4, COSINE_T12))


def test_an_adaptive_sweeps_verdicts_are_its_rounds_decisions():
    """With `rounds` (sweep.seeds=auto), the table's verdicts are the sequential design's; intervals and
    differences are over every seed in; the p cell is the deciding round's nominal p against its level."""
    from lightning_mim.orchestration.summary import comparison_cells, comparison_columns, round_line
    from lightning_mim.sequential import SequentialDesign, decide

    design = SequentialDesign(first_round=3, round_size=2, max_seeds=5)
    cosine, linear, sqrt = [2.9, 3.1, 3.0, 3.2, 2.8], [3.3, 3.5, 3.2, 3.6, 3.4], [6.0, 6.3, 6.1, 6.2, 6.4]
    values = {"schedule=cosine": cosine, "schedule=linear": linear, "schedule=sqrt": sqrt}
    first = decide(design, {label: {str(i): v for i, v in enumerate(xs[:3])} for label, xs in values.items()})
    seeds = {label: 3 + 2 * (label in first.points_needing_seeds) for label in first.points}
    last = decide(design, {label: {str(i): v for i, v in enumerate(values[label][:seeds[label]])} for label in first.points},
                  first)
    trials = outcomes({"cosine": cosine[:seeds["schedule=cosine"]], "linear": linear[:seeds["schedule=linear"]],
                       "sqrt": sqrt[:seeds["schedule=sqrt"]]})
    summary = summarize(trials, "val/fid_domain", "minimize", rounds=last)
    decisions = {frozenset((p.a, p.b)): p for p in last.pairs}
    for comparison in summary.comparisons:
        decision = decisions[frozenset((comparison.a, comparison.b))]
        assert comparison.verdict == decision.status and comparison.p_adjusted is None
        cells = dict(zip(comparison_columns(summary), comparison_cells(comparison)))
        assert cells["p (nominal, at its round)"].startswith(f"round {comparison.look + 1}: p=")
    assert summary.sequential and "seeds in rounds (sweep.seeds=auto: looks at 3, 5 seeds" in summary.legend()
    assert "p (Holm)" not in comparison_columns(summary)
    assert round_line(last).startswith(f"round {last.look + 1} of at most 2 ")
    assert summary.points[0].label() == "schedule=cosine"
