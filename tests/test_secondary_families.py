"""Secondary families of tests (`sweep.secondary`, `summary.MetricFamily`): a metric besides the
objective whose comparisons are Holm-adjusted as a family of their own, with their own margin; pinned
to statsmodels' Holm and TOST, read through every output (console rows, parent-run rows and metrics,
report, figure), refused where it cannot keep its error rate, and its rates simulated."""

from __future__ import annotations

import math
import re

import numpy as np
import optuna
import pytest
import yaml
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_paired

from lightning_mim import verdicts
from lightning_mim.orchestration import report, sweep_spec
from lightning_mim.orchestration.config import ConfigError
from lightning_mim.orchestration.summary import (
    MetricFamily,
    TrialOutcome,
    VerdictOptions,
    comparison_rows,
    parent_metrics,
    summarize,
    table_rows,
)

PROBE = "val/probe_top1"
FID = "val/fid_domain"
# 4 ratio distributions x 3 seeds: the probe says trunc_gauss is best, FID says schedule is worst
VALUES = {
    "trunc_gauss": ([0.86, 0.88, 0.85], [16.0, 16.9, 16.4]),
    "fixed": ([0.84, 0.83, 0.86], [16.2, 17.3, 16.5]),
    "uniform": ([0.75, 0.83, 0.74], [16.6, 17.1, 16.8]),
    "schedule": ([0.71, 0.75, 0.73], [19.0, 20.1, 19.6]),
}
FAMILY = MetricFamily(FID, "minimize", 1.0)
SIMS = 4000
BOUND = 0.05 + 3 * math.sqrt(0.05 * 0.95 / SIMS)


def outcomes(values=VALUES, without_fid: tuple[str, str] | None = None) -> list[TrialOutcome]:
    """One trial per (ratio, seed), value the probe; `without_fid`: a (ratio, seed) that recorded no FID."""
    out = []
    for ratio, (probes, fids) in values.items():
        for seed, (probe, fid) in enumerate(zip(probes, fids)):
            metrics = {PROBE: probe} if (ratio, str(seed)) == without_fid else {PROBE: probe, FID: fid}
            out.append(TrialOutcome(len(out), {"ratio": ratio, "seed": str(seed)}, "COMPLETE", probe, metrics))
    return out


def test_a_family_is_read_from_its_command_line_form_and_refused_in_words():
    assert MetricFamily.parse("val/fid_domain:minimize:1.0") == FAMILY
    assert MetricFamily.parse("val/cas:maximize") == MetricFamily("val/cas", "maximize", None)
    assert MetricFamily.parse("val/fid_domain") == MetricFamily(FID, "minimize", None)
    assert MetricFamily.parse(FAMILY.text()) == FAMILY and FAMILY.text() == "val/fid_domain:minimize:1"
    assert MetricFamily(**FAMILY.to_dict()) == FAMILY
    for text, words in (("val/fid_domain:down", "direction 'down' must be minimize or maximize"),
                        ("val/fid_domain:minimize:x", "the margin 'x' is not a number"),
                        ("val/fid_domain:minimize:-1", "margin -1.0 must be a number > 0"),
                        ("val/fid_domain:minimize:nan", "must be a number > 0"),
                        ("a:b:c:d", "has 4 parts"), (":minimize", "no metric name")):
        with pytest.raises(ValueError, match=words):
            MetricFamily.parse(text)


def test_a_secondary_family_is_holm_over_its_own_pairs_with_its_own_margin():
    options = VerdictOptions(equivalence=0.03)
    alone = summarize(outcomes(), PROBE, "maximize", options=options)
    summary = summarize(outcomes(), PROBE, "maximize", options=options, secondary=[FAMILY])
    # the objective's verdicts do not change when a family is added
    assert [(c.a, c.b, c.p_adjusted, c.verdict) for c in summary.comparisons] == [
        (c.a, c.b, c.p_adjusted, c.verdict) for c in alone.comparisons]
    (fid,) = summary.secondary
    assert (fid.objective, fid.direction, fid.options) == (FID, "minimize", VerdictOptions(0.05, 1.0, None))
    assert fid.family == FAMILY
    assert [p.params["ratio"] for p in fid.points] == ["trunc_gauss", "fixed", "uniform", "schedule"]  # lowest FID first
    assert all(set(p.estimates) == {FID} for p in fid.points)
    # Holm over the 6 pairs' paired t-tests and their 6 TOSTs at ±1.0 FID — this family only
    labels = [p.label() for p in fid.points]
    raw_p, raw_tost = [], []
    for c in fid.comparisons:
        a, b = (np.array(VALUES[label.split("=")[1]][1]) for label in (c.a, c.b))
        raw_p.append(stats.ttest_rel(a, b).pvalue)
        raw_tost.append(ttost_paired(a, b, -1.0, 1.0)[0])
    adjusted = multipletests(raw_p + raw_tost, method="holm")[1]
    assert [c.p_adjusted for c in fid.comparisons] == pytest.approx(adjusted[:6], abs=1e-12)
    assert [c.equivalence_p_adjusted for c in fid.comparisons] == pytest.approx(adjusted[6:], abs=1e-12)
    assert {(c.a, c.b) for c in fid.comparisons} == {(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]}
    # the objective's own family is not widened by the second one's hypotheses
    assert len(summary.comparisons) == 6 and "the 12 hypotheses of 6 pair(s)" in fid.legend()
    assert "within ±1 by two one-sided tests" in fid.legend() and "within ±0.03" in summary.legend()


def test_a_trial_without_the_metric_is_left_out_of_that_family_only():
    summary = summarize(outcomes(without_fid=("fixed", "1")), PROBE, "maximize", secondary=[FAMILY])
    fixed = next(p for p in summary.points if p.params["ratio"] == "fixed")
    fixed_fid = next(p for p in summary.secondary[0].points if p.params["ratio"] == "fixed")
    assert fixed.seeds == ["0", "1", "2"] and fixed_fid.seeds == ["0", "2"]
    assert fixed_fid.estimates[FID].mean == pytest.approx((16.2 + 16.5) / 2)


def test_every_output_row_names_its_family():
    summary = summarize(outcomes(), PROBE, "maximize", options=VerdictOptions(equivalence=0.03), secondary=[FAMILY])
    rows = {row["ratio"]: row for row in table_rows(summary)}
    fid_points = {p.params["ratio"]: p for p in summary.secondary[0].points}
    for ratio, row in rows.items():
        assert row[f"verdict {FID}"] == fid_points[ratio].verdict
        assert row[f"p_vs_best {FID}"] == fid_points[ratio].p_vs_best
    assert rows["schedule"][f"verdict {FID}"] == "worse than best"
    pairs = comparison_rows(summary)
    assert [r["metric"] for r in pairs] == [PROBE] * 6 + [FID] * 6
    assert {r["equivalence"] for r in pairs[:6]} == {0.03} and {r["equivalence"] for r in pairs[6:]} == {1.0}
    flat = parent_metrics(summary)
    assert flat[f"point/ratio_schedule/{FID}/p_vs_best"] == fid_points["schedule"].p_vs_best
    assert f"point/ratio_trunc_gauss/{FID}/p_vs_best" not in flat  # the best of the FID family


def test_named_ratios_sweep_fixes_both_margins_and_the_command_line_can_change_them():
    spec = sweep_spec.parse(["sweep=ratios"])
    assert (spec.objective, spec.direction, spec.equivalence) == (PROBE, "maximize", 0.03)
    assert spec.secondary == [FAMILY]
    # the margins are how the trials are read, not which trials run: the study is the same
    plain = sweep_spec.parse(["sweep=ratios", "sweep.secondary=none", "sweep.equivalence=0.05"])
    assert plain.secondary == [] and plain.study_name() == spec.study_name()
    two = sweep_spec.parse(["sweep=ratios", "sweep.secondary=[val/fid_domain:minimize:2,val/cas:maximize]"])
    assert two.secondary == [MetricFamily(FID, "minimize", 2.0), MetricFamily("val/cas", "maximize")]
    for args, words in ((["sweep.secondary=val/fid_domain:minimize:0"], "sweep.secondary=val/fid_domain:minimize:0: "
                                                                        "val/fid_domain's margin 0.0 must be"),
                        (["sweep=ratios", "sweep.secondary=val/probe_top1:maximize"], "not the objective (val/probe_top1)"),
                        (["schedule=cosine,linear", "sweep.secondary=[val/cas:maximize,val/cas:maximize]"], "each metric once"),
                        (["sweep=ratios", "sweep.seeds=auto"], "sweep.secondary=val/fid_domain:minimize:1: with sweep.seeds=auto")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            sweep_spec.parse(args)
    assert sweep_spec.parse(["sweep=ratios", "sweep.seeds=auto", "sweep.secondary=none"]).adaptive
    with pytest.raises(ValueError, match="sweep.seeds=auto"):
        summarize(outcomes(), PROBE, "maximize", secondary=[FAMILY], rounds=object())


def write_ratio_study(home) -> report.Study:
    """A finished `sweep=ratios` study as the sweep leaves it: spec.yaml (written by `write_spec`) and trials."""
    spec = sweep_spec.parse(["sweep=ratios"])
    spec.seeds = 3
    directory = home / "sweeps" / spec.study_name()
    directory.mkdir(parents=True)
    sweep_spec.write_spec(spec, directory / report.SPEC_FILE)
    study = optuna.create_study(study_name=directory.name, storage=f"sqlite:///{home}/optuna.db")
    space = {k: optuna.distributions.CategoricalDistribution(v) for k, v in spec.grid_space().items()}
    for outcome in outcomes():
        study.add_trial(optuna.trial.create_trial(params=outcome.params, distributions=space, value=outcome.value,
                                                  user_attrs={"metrics": outcome.metrics}))
    return report.find_study(home)


def unwrapped(text) -> str:
    """A figure's verdict label as one line (the figure wraps it: `report.verdict_label`)."""
    return " ".join(text.get_text().split())


def assert_labels_end_before_the_next_value(figure) -> None:
    """Every verdict written beside a categorical point ends, in the drawn figure, before the x of the
    next value's bar and inside its panel, and no two labels of a panel overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)  # lay out (constrained) as savefig does
    for panel in figure.axes:
        step = panel.transData.transform((1, 0))[0] - panel.transData.transform((0, 0))[0]  # one value apart
        labels = sorted(((panel.transData.transform(t.xy)[0], t.get_window_extent(renderer)) for t in panel.texts),
                        key=lambda label: label[0])
        assert len(labels) == 4
        for (x, box), (_, after) in zip(labels, labels[1:]):
            assert box.x1 < x + step and box.x1 < after.x0
        assert labels[-1][1].x1 <= panel.get_window_extent(renderer).x1


def test_a_verdict_label_is_the_verdict_in_lines_short_enough_to_sit_between_two_values():
    for verdict in ("best", "worse than best", "not distinguished from best", "equivalent to best"):
        label = report.verdict_label(verdict)
        assert " ".join(label.split()) == verdict
        assert max(len(line) for line in label.splitlines()) <= report.VERDICT_LINE_CHARS
    assert report.verdict_label("not distinguished from best") == "not distinguished\nfrom best"


def test_the_report_shows_each_family_with_its_own_verdicts(tmp_path):
    study = write_ratio_study(tmp_path / "home")
    assert yaml.safe_load((study.directory / report.SPEC_FILE).read_text())["secondary"] == [FAMILY.to_dict()]
    assert study.secondary == [FAMILY]
    summary = study.summary()
    files = report.write_report(study)
    assert sorted(p.name for p in files) == ["axis-ratio.png", "summary.md"]
    text = (study.directory / "report" / "summary.md").read_text()
    first, second = text.split(f"## Second family of tests: {FID} (minimize)")
    assert first.count("\n| ") == 1 + 4 + 1 + 6 and "within ±0.03" in first
    assert second.count("\n| ") == 1 + 4 + 1 + 6 and "within ±1 by two one-sided tests" in second
    assert "| schedule | 3 | 19.5667 ± " in second and PROBE not in second.split("Comparisons")[0]
    figure = report.draw_axis_figure(study, summary.points, "ratio", study.directory / "check.png", summary.secondary)
    probe_panel, fid_panel = figure.axes
    assert PROBE in probe_panel.get_ylabel() and "↑" in probe_panel.get_ylabel()
    assert FID in fid_panel.get_ylabel() and "↓" in fid_panel.get_ylabel()
    probe_by_ratio = {p.params["ratio"]: p.verdict for p in summary.points}
    assert [unwrapped(t) for t in probe_panel.texts] == [probe_by_ratio[r] for r in study.axis_values("ratio")]
    fid_by_ratio = {p.params["ratio"]: p.verdict for p in summary.secondary[0].points}
    assert [unwrapped(t) for t in fid_panel.texts] == [fid_by_ratio[r] for r in study.axis_values("ratio")]
    assert_labels_end_before_the_next_value(figure)
    assert len([line for line in fid_panel.get_lines() if line.get_alpha() == 0.35]) == 3  # a line per seed


def test_the_console_prints_the_second_family_after_the_objectives(tmp_path, capsys):
    from types import SimpleNamespace

    from lightning_mim.orchestration.sweep_console import print_summary

    study = write_ratio_study(tmp_path / "home")
    spec = sweep_spec.parse(["sweep=ratios"])
    print_summary(spec, study.name, "sqlite:///x.db", study.trials, SimpleNamespace(tracking_uri=None))
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long titles at spaces
    first, second = out.split(f"second family of tests: {FID} (minimize)")
    assert f"{study.name} — {PROBE} (maximize)" in first and "within ±0.03" in first
    assert "within ±1 by two one-sided tests" in second and "worse than best" in second
    assert second.index("schedule") < second.index("study: ")  # its tables come before the links


def test_a_family_no_trial_recorded_says_so_with_the_names_recorded(tmp_path, capsys):
    from types import SimpleNamespace

    from lightning_mim.orchestration.sweep_console import print_summary

    study = write_ratio_study(tmp_path / "home")
    spec = sweep_spec.parse(["sweep=ratios", "sweep.secondary=val/fid:minimize"])  # misspelt
    print_summary(spec, study.name, "sqlite:///x.db", study.trials, SimpleNamespace(tracking_uri=None))
    out = capsys.readouterr().out
    assert ("second family of tests: val/fid: no completed trial recorded it (recorded: val/fid_domain, "
            "val/probe_top1)") in out
    study.spec["secondary"] = [MetricFamily("val/fid", "minimize").to_dict()]
    text = report.summary_markdown(study, study.summary())
    assert text.rstrip().endswith("val/fid: no completed trial recorded it (recorded: val/fid_domain, val/probe_top1)")


def test_each_family_keeps_its_error_rate_and_together_at_most_twice_it():
    """A/A sweeps of 4 points x 3 seeds with two metrics (`verdicts.simulate_families`). Measured (20 000
    sweeps, docs/SWEEPS.md): each family at or below α whatever the metrics' correlation; either
    family's false "different" near 2α for unrelated metrics, α for one metric read twice."""
    for correlation, metric_correlation in ((0.0, 0.0), (0.5, -0.6)):
        rates = verdicts.simulate_families(4, 3, metric_correlation=metric_correlation, correlation=correlation,
                                           sims=SIMS, seed=13)
        assert rates["first"] <= BOUND and rates["second"] <= BOUND, rates
        assert max(rates["first"], rates["second"]) < rates["either"] <= 2 * BOUND, rates
    same = verdicts.simulate_families(4, 3, metric_correlation=1.0, sims=SIMS, seed=13)
    assert same["first"] == same["second"] == same["either"]
    unrelated = verdicts.simulate_families(4, 3, metric_correlation=0.0, sims=SIMS, seed=13)
    assert unrelated["either"] == pytest.approx(1 - (1 - unrelated["first"]) * (1 - unrelated["second"]), abs=0.01)
    with pytest.raises(ValueError, match="metric_correlation"):
        verdicts.simulate_families(4, 3, metric_correlation=1.5, sims=10)
