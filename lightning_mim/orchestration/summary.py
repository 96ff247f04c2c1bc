"""A sweep's result per grid point and its verdicts: the seeds of a point pooled into mean ± 95 %
interval (`lightning_mim.statistics`), and every pair of points compared with the family-wise error
controlled (`lightning_mim.verdicts`: Holm over all pairs at `sweep.alpha`; the paired t-test over the
seeds two points share — seed i of every point has the same initial weights, data order and
evaluation draws, so the design blocks by seed —, Welch's test where they share none; equivalence
within `sweep.equivalence` by two one-sided tests; the seeds a comparison still open would need).

One function, `summarize`, computes what the console table (`sweep_console.print_summary`), the MLflow
parent run (`log_to_parent`), the report and the notebook show, so they agree by construction; the
cells are formatted once here (`point_cells`, `comparison_cells`).

A sweep may name metrics besides its objective whose comparisons are a family of tests of their own
(`MetricFamily`, `sweep.secondary`: MAGE's ratio ablation reads the probe and, second, FID): each such
family is read like the objective's, Holm over its own pairs at the same α with its own equivalence
margin, so the family-wise error rate is α per family (the families are reported apart, never merged
into one verdict).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

from lightning_mim.orchestration.fingerprint import PROTOCOL_ATTR, protocol_difference
from lightning_mim.settings import SECOND_DRAW_SUFFIX
from lightning_mim.sequential import SPENDING_NAMES, RoundState
from lightning_mim.statistics import ALPHA, Estimate, NoiseShare, evaluation_noise, mean_interval
from lightning_mim.verdicts import (
    BEST,
    DIFFERENT,
    DIRECTIONS,
    EQUIVALENT,
    OPEN,
    PAIRED,
    UNTESTABLE,
    WELCH,
    Comparison,
    compare_all,
    point_verdicts,
)

SEED_KEY = "seed"
SEED_ATTR = "seed"  # the Optuna trial's user attribute with the seed it trained with
REPEATS_ATTR = "repeats"  # a `sweep.repeats` trial's user attribute: {seed: that seed's metrics}
ROUNDS_ATTR = "rounds"  # an adaptive sweep's study attribute: one `sequential.RoundState.to_dict()` per round
PARENT_ATTR = "mlflow_parent_run_id"  # the study's attribute holding its MLflow parent run id
TRACKING_ATTR = "mlflow_tracking_uri"  # ... and the tracking URI its runs are in (what readers open)
REPORTED_METRICS = ("val/fid_domain", "val/cas", "val/is_domain", "val/loss")
TABLE_ARTIFACT = "points.json"
COMPARISONS_ARTIFACT = "comparisons.json"
_UNSAFE = re.compile(r"[^a-zA-Z0-9_/. -]")  # MLflow metric names allow only these characters
__all__ = ["PAIRED", "WELCH", "DIFFERENT", "EQUIVALENT", "OPEN", "UNTESTABLE"]


@dataclass(frozen=True)
class VerdictOptions:
    """How the comparisons are read, fixed before the sweep (`sweep.alpha`, `sweep.equivalence`,
    `sweep.effect`): the family-wise error rate; a margin in objective units within which two points
    count as equivalent (None: no equivalence tests); the difference the seeds-needed estimate is for
    (None: the observed one, flagged as such)."""

    alpha: float = ALPHA
    equivalence: float | None = None
    effect: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"sweep.alpha={self.alpha}: must be in (0, 1)")
        for name in ("equivalence", "effect"):
            value = getattr(self, name)
            if not is_margin(value):
                raise ValueError(f"sweep.{name}={value}: must be a number > 0 (objective units)")


def is_margin(value: float | None) -> bool:
    """Whether `value` can be a margin or an effect in a metric's units: None (none) or a finite number > 0."""
    return value is None or (math.isfinite(value) and value > 0)


@dataclass(frozen=True)
class MetricFamily:
    """A metric whose comparisons are a family of tests of their own (`sweep.secondary`): its name, the
    direction that is better, and its equivalence margin in its own units (None: no equivalence tests).
    Written `METRIC:DIRECTION[:MARGIN]` on the command line (`val/fid_domain:minimize:1.0`)."""

    metric: str
    direction: str = "minimize"
    equivalence: float | None = None

    def __post_init__(self) -> None:
        if not self.metric:
            raise ValueError("no metric name")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"{self.metric}'s direction {self.direction!r} must be minimize or maximize")
        if self.equivalence is not None:
            margin = float(self.equivalence)
            if not is_margin(margin):
                raise ValueError(f"{self.metric}'s margin {self.equivalence} must be a number > 0 (its own units)")
            object.__setattr__(self, "equivalence", margin)

    @classmethod
    def parse(cls, text: str) -> "MetricFamily":
        """`val/fid_domain:minimize:1.0` (or without the margin, or without both: minimize, no margin);
        ValueError naming what is wrong."""
        parts = str(text).split(":")
        if len(parts) > 3:
            raise ValueError(f"{text!r} has {len(parts)} parts")
        margin = None
        if len(parts) == 3:
            try:
                margin = float(parts[2])
            except ValueError:
                raise ValueError(f"the margin {parts[2]!r} is not a number") from None
        return cls(parts[0], parts[1] if len(parts) > 1 else "minimize", margin)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "direction": self.direction, "equivalence": self.equivalence}

    def text(self) -> str:
        """`val/fid_domain:minimize:1` — what `parse` reads back."""
        return f"{self.metric}:{self.direction}" + ("" if self.equivalence is None else f":{self.equivalence:g}")


@dataclass(frozen=True)
class TrialOutcome:
    """What the summary needs of one finished trial (an Optuna FrozenTrial reduced to plain data)."""

    number: int
    params: dict[str, str]
    state: str  # COMPLETE, FAIL, PRUNED, ...
    value: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    protocol: dict[str, Any] | None = None  # `fingerprint.evaluation_protocol` (None: not recorded)
    seed: str | None = None  # the seed it trained with, when that is not its `seed` param (sweep.replicates)

    def trained_seed(self) -> str:
        return self.seed if self.seed is not None else self.params.get(SEED_KEY, "")


class ProtocolMismatch(ValueError):
    """Trials measured under different evaluation protocols: their numbers are neither pooled nor compared."""


@dataclass(frozen=True)
class PointSummary:
    """One grid point: its non-seed params, the seeds and trials behind it, an Estimate per metric
    (objective first), every metric per seed (`seed_values`, objective first; the objective's alone:
    `by_seed`), its comparison with the best point and its verdict (`verdicts.point_verdicts`: best,
    worse than best, equivalent to best, not distinguished from best, not testable)."""

    params: dict[str, str]
    seeds: list[str]
    trials: list[int]
    estimates: dict[str, Estimate]
    values: dict[str, list[float]]
    seed_values: dict[str, dict[str, float]]  # metric -> seed -> value, the objective first
    is_best: bool
    verdict: str
    vs_best: Comparison | None = None

    def label(self) -> str:
        return point_label(self.params)

    @property
    def by_seed(self) -> dict[str, float]:
        """The objective per seed (the blocks the comparisons pair)."""
        return next(iter(self.seed_values.values()))

    @property
    def p_vs_best(self) -> float | None:
        """The Holm-adjusted p-value of the difference from the best point (None: best or not testable)."""
        return None if self.vs_best is None else self.vs_best.p_adjusted

    @property
    def test(self) -> str | None:
        return None if self.vs_best is None else self.vs_best.test


@dataclass(frozen=True)
class SweepSummary:
    """The points (best first) and every pairwise comparison of their objective, read with `options`."""

    objective: str
    direction: str
    options: VerdictOptions
    points: list[PointSummary]
    comparisons: list[Comparison]
    noise: NoiseShare | None = None  # evaluation noise against the seeds' spread (`evaluation.second_draw`)
    rounds: RoundState | None = None  # `sweep.seeds=auto`: the last round's decisions, which the verdicts are
    secondary: tuple["SweepSummary", ...] = ()  # one summary per `MetricFamily` of `sweep.secondary`, in its order
    missing: str | None = None  # a secondary family no completed trial recorded: why it has no table (`missing_family_line`)

    @property
    def sequential(self) -> bool:
        return self.rounds is not None

    @property
    def family(self) -> MetricFamily:
        """The metric these verdicts are about, its direction and margin."""
        return MetricFamily(self.objective, self.direction, self.options.equivalence)

    def legend(self) -> str:
        """How the verdicts were reached, for a table's title."""
        if self.rounds is not None:
            return sequential_legend(self.rounds)
        tests = sorted({c.test for c in self.comparisons if c.p_value is not None})
        named = {PAIRED: "paired t-test over the seeds both points have", WELCH: "Welch's t-test (no common seeds)"}
        tested = len([c for c in self.comparisons if c.p_value is not None])
        hypotheses = tested * (2 if self.options.equivalence is not None else 1)
        text = (f"every pair of points compared, {' / '.join(named[t] for t in tests) or 'no test (one seed)'}; "
                f"p-values Holm-adjusted over the {hypotheses} hypotheses of {tested} pair(s), "
                f"family-wise α = {self.options.alpha}")
        if self.options.equivalence is not None:
            text += f"; equivalent: within ±{self.options.equivalence:g} by two one-sided tests (in the same Holm family)"
        return text

    def noise_line(self) -> str | None:
        """`evaluation noise: 12 % of the seed-to-seed variance of val/fid_domain (second draws of 9
        trials) — more seeds sharpen ...`, or None without second draws."""
        noise = self.noise
        if noise is None:
            return None
        if noise.share is None:
            return (f"evaluation noise of {self.objective}: sd {noise.evaluation_variance ** 0.5:.3g} "
                    f"(second draws of {noise.trials} trial(s)); no point has 2+ seeds to set it against")
        share = noise.share
        advice = ("more evaluation samples would sharpen the comparisons most" if share >= 0.5 else
                  "more seeds, not more evaluation samples, would sharpen the comparisons")
        return (f"evaluation noise: {100 * share:.0f} % of the seed-to-seed variance of {self.objective} "
                f"(sd {noise.evaluation_variance ** 0.5:.3g} of {noise.seed_variance ** 0.5:.3g}; second draws of "
                f"{noise.trials} trial(s)): {advice}")


def outcomes_from_optuna(trials: Iterable[Any]) -> list[TrialOutcome]:
    """Optuna FrozenTrials -> TrialOutcome (params as strings, the metrics the trial recorded). A trial
    of a `sweep.repeats` search (`REPEATS_ATTR`) becomes one outcome per seed it trained, so its
    configuration is a point with those seeds, paired by seed with the other configurations (each
    carries the trial's Optuna value, the seeds' mean; the summary reads a seed's own in its metrics)."""
    outcomes = []
    for t in trials:
        if t.state.name == "WAITING":
            continue
        params = {k: str(v) for k, v in t.params.items()}
        common = dict(number=t.number, params=params, state=t.state.name, value=t.value, protocol=t.user_attrs.get(PROTOCOL_ATTR))
        repeats = t.user_attrs.get(REPEATS_ATTR) if t.state.name == "COMPLETE" else None
        if repeats:
            outcomes += [TrialOutcome(**common, metrics=dict(metrics), seed=str(seed)) for seed, metrics in repeats.items()]
        else:
            outcomes.append(TrialOutcome(**common, metrics=dict(t.user_attrs.get("metrics") or {}),
                                         seed=t.user_attrs.get(SEED_ATTR)))
    return outcomes


def summarize(
    outcomes: Sequence[TrialOutcome],
    objective: str,
    direction: str,
    metrics: Sequence[str] = REPORTED_METRICS,
    options: VerdictOptions = VerdictOptions(),
    rounds: RoundState | None = None,
    secondary: Sequence[MetricFamily] = (),
) -> SweepSummary:
    """Pool the COMPLETE trials by grid point (params without `seed`), best point first, and compare
    every pair of points (`verdicts.compare_all`, blocked by seed). With `rounds` (an adaptive sweep's
    last decisions) the verdicts are the sequential design's (`sequential_comparisons`), the intervals,
    differences and correlations those of every seed in. Each of `secondary` is summarized the same way
    as a family of its own (`family_outcomes`; at `options.alpha`, with its own margin), in `.secondary`;
    one that no completed trial recorded says so in its `.missing`.

    Per point: an Estimate of the objective (the trial's recorded metric of that name, else its Optuna
    value) and of every metric in `metrics` that its trials report. The best point has the best mean
    objective (`direction`); because every pair is in the Holm family, naming the best after seeing the
    data keeps the family-wise error rate at `options.alpha`.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be minimize or maximize, got {direction!r}")
    problem = secondary_problem(objective, secondary, adaptive=rounds is not None)
    if problem:
        raise ValueError(f"secondary families {[f.metric for f in secondary]}: {problem}")
    groups: dict[tuple, list[TrialOutcome]] = {}
    for outcome in outcomes:
        if outcome.state != "COMPLETE" or outcome.value is None or not math.isfinite(outcome.value):
            continue
        point = {k: v for k, v in outcome.params.items() if k != SEED_KEY}
        groups.setdefault(tuple(sorted(point.items())), []).append(outcome)
    check_one_protocol([o for members in groups.values() for o in members])
    names = [objective, *(m for m in metrics if m != objective)]
    pooled = []
    for key, members in groups.items():
        values: dict[str, list[float]] = {objective: [float(o.metrics.get(objective, o.value)) for o in members]}
        seed_values = {objective: dict(zip((o.trained_seed() for o in members), values[objective]))}  # blocks: the seeds points share
        for name in names[1:]:
            got = [(o.trained_seed(), float(o.metrics[name])) for o in members if name in o.metrics and math.isfinite(o.metrics[name])]
            if got:
                values[name], seed_values[name] = [v for _, v in got], dict(got)
        pooled.append((dict(key), members, values, {n: mean_interval(v) for n, v in values.items()}, seed_values))
    sign = 1 if direction == "minimize" else -1
    pooled.sort(key=lambda p: (sign * p[3][objective].mean, str(sorted(p[0].items()))))
    labels = [point_label(params) for params, *_ in pooled]
    comparisons = compare_all(
        {label: seed_values[objective] for label, (*_, seed_values) in zip(labels, pooled)},
        alpha=options.alpha, blocked=True, equivalence=options.equivalence, effect=options.effect,
    ) if len(pooled) > 1 else []
    if rounds is not None:
        comparisons = sequential_comparisons(comparisons, rounds)
    means = {label: p[3][objective].mean for label, p in zip(labels, pooled)}
    verdicts = point_verdicts(comparisons, means, direction) if comparisons else {label: BEST for label in labels}
    points = []
    for index, (label, (params, members, values, estimates, seed_values)) in enumerate(zip(labels, pooled)):
        vs_best = None if index == 0 else next(c for c in comparisons if {c.a, c.b} == {label, labels[0]})
        points.append(PointSummary(
            params=params,
            seeds=sorted({o.trained_seed() for o in members}, key=lambda s: (len(s), s)),
            trials=sorted(o.number for o in members),
            estimates=estimates,
            values=values,
            seed_values=seed_values,
            is_best=index == 0,
            verdict=verdicts[label],
            vs_best=vs_best,
        ))
    draws = [(float(o.metrics.get(objective, o.value)), float(o.metrics[objective + SECOND_DRAW_SUFFIX]))
             for members in groups.values() for o in members if objective + SECOND_DRAW_SUFFIX in o.metrics]
    noise = evaluation_noise(draws, [p[2][objective] for p in pooled])
    families = []
    for family in secondary:
        read = summarize(family_outcomes(outcomes, family.metric), family.metric, family.direction, metrics=(),
                         options=VerdictOptions(options.alpha, family.equivalence))
        families.append(replace(read, missing=missing_family_line(family.metric, outcomes)) if points and not read.points
                        else read)
    return SweepSummary(objective, direction, options, points, comparisons, noise, rounds, tuple(families))


def secondary_problem(objective: str, secondary: Sequence[MetricFamily], adaptive: bool) -> str | None:
    """Why `secondary` cannot be read beside `objective` (None: it can): each metric once and none the
    objective; and fixed seeds — `sweep.seeds=auto` adds seeds for the objective's comparisons only, so
    another metric's tests, read at a sample size the objective's chose, would not keep their error rate."""
    names = [family.metric for family in secondary]
    if objective in names or len(set(names)) < len(names):
        return f"each metric once, and not the objective ({objective})"
    if names and adaptive:
        return ("with sweep.seeds=auto the rounds add seeds for the objective's comparisons only; "
                "use fixed seeds or sweep.secondary=none")
    return None


def missing_family_line(metric: str, outcomes: Sequence[TrialOutcome]) -> str:
    """Why a secondary family has no table: `val/fid: no completed trial recorded it (recorded: val/cas,
    val/fid_domain)` — a misspelt `sweep.secondary` shows itself after the first trials."""
    recorded = sorted({name for o in outcomes if o.state == "COMPLETE" for name in o.metrics})
    return f"{metric}: no completed trial recorded it (recorded: {', '.join(recorded) or 'none'})"


def family_outcomes(outcomes: Sequence[TrialOutcome], metric: str) -> list[TrialOutcome]:
    """`outcomes` as a family on `metric` reads them: each trial's value is its recorded `metric` (a
    trial that did not record it has none, so it is left out of that family's points)."""
    return [replace(o, value=o.metrics.get(metric)) for o in outcomes]


def latest_round(user_attrs: Mapping[str, Any]) -> RoundState | None:
    """The last decisions of an adaptive sweep from its study's user attributes (None: seeds were fixed)."""
    rounds = all_rounds(user_attrs)
    return rounds[-1] if rounds else None


def sequential_comparisons(comparisons: Sequence[Comparison], rounds: RoundState) -> list[Comparison]:
    """`comparisons` (descriptive: `compare_all` over every seed in) with the verdicts of the sequential
    design's last decisions `rounds`: the status of each pair, the nominal p-value and level of the look
    that decided it (the last look for an open pair), no Holm-adjusted p (the design has none)."""
    decisions = {frozenset((d.a, d.b)): d for d in rounds.pairs}
    out = []
    for c in comparisons:
        d = decisions.get(frozenset((c.a, c.b)))
        if d is None:
            raise ValueError(f"the adaptive sweep's rounds have no decision for {c.a} vs {c.b}")
        equivalent = d.status == EQUIVALENT
        look = d.equivalent_at if equivalent else d.different_at if d.status == DIFFERENT else rounds.look
        out.append(replace(c, verdict=d.status, p_adjusted=None, equivalence_p_adjusted=None, look=look,
                           p_value=d.equivalence_p if equivalent else d.p_value,
                           nominal_level=d.equivalence_nominal_level if equivalent else d.nominal_level))
    return out


def round_line(state: RoundState) -> str:
    """An adaptive sweep's decision after a round, on one line: `round 2 of at most 3 (10 seeds a point):
    different: a vs c | open: a vs b — next round: 15 seeds for a, b` (or why it ends)."""
    by_status: dict[str, list[str]] = {}
    for pair in state.pairs:
        by_status.setdefault(pair.status, []).append(f"{pair.a} vs {pair.b}")
    said = " | ".join(f"{status}: {'; '.join(pairs)}" for status, pairs in by_status.items())
    looks = state.design.looks
    if all(pair.decided for pair in state.pairs):
        after = "done: every pair decided"
    elif state.finished:
        after = f"done: {state.seeds} seeds is the most a point may have (sweep.max_seeds); open stays open"
    else:
        after = f"next round: {looks[state.look + 1]} seeds for {', '.join(state.points_needing_seeds)}"
    return f"round {state.look + 1} of at most {len(looks)} ({state.seeds} seeds a point): {said} — {after}"


def all_rounds(user_attrs: Mapping[str, Any]) -> list[RoundState]:
    """Every round's decisions of an adaptive sweep, oldest first, from its study's user attributes."""
    return [RoundState.from_dict(record) for record in user_attrs.get(ROUNDS_ATTR) or []]


def sequential_legend(rounds: RoundState) -> str:
    """How an adaptive sweep's verdicts were reached, for a table's title."""
    design = rounds.design
    text = (f"seeds in rounds (sweep.seeds=auto: looks at {', '.join(map(str, design.looks))} seeds a point; this is "
            f"round {rounds.look + 1}); every pair of points compared by a group-sequential paired t-test "
            f"({SPENDING_NAMES[design.spending]} α-spending), Holm over the {design.hypotheses(len(rounds.points))} "
            f"hypotheses at family-wise α = {design.alpha} across all rounds; p is the nominal p of the deciding "
            f"round's test, against the level it had to beat there")
    if design.equivalence is not None:
        text += f"; equivalent: within ±{design.equivalence:g} by two one-sided tests (in the same family)"
    return text


def check_one_protocol(outcomes: Sequence[TrialOutcome]) -> None:
    """ProtocolMismatch, in one line naming the first difference, when two of `outcomes` were scored
    under different evaluation protocols (trials that recorded none are taken as they are)."""
    recorded = [o for o in outcomes if o.protocol is not None]
    for outcome in recorded[1:]:
        difference = protocol_difference(recorded[0].protocol, outcome.protocol)
        if difference:
            raise ProtocolMismatch(
                f"trials {recorded[0].number} and {outcome.number} were scored under different evaluation protocols "
                f"({difference}): their numbers are not pooled or compared; sweep each protocol on its own"
            )


def point_label(params: Mapping[str, str]) -> str:
    """A point's label in tables, comparisons and an adaptive sweep's rounds: `schedule=cosine,decode.steps=8`
    (params in key order, the seed left out by the caller; `all` for no params)."""
    return ",".join(f"{k}={v}" for k, v in sorted(params.items())) or "all"


def format_estimate(estimate: Estimate | None, digits: int = 4) -> str:
    """`3.1042 ± 0.4210` (95 % interval half-width), or `3.1042 (n=1)` when no interval exists."""
    if estimate is None:
        return ""
    if estimate.half_width is None:
        return f"{estimate.mean:.{digits}f} (n={estimate.n})"
    return f"{estimate.mean:.{digits}f} ± {estimate.half_width:.{digits}f}"


def format_comparison(point: PointSummary) -> str:
    """The point's verdict cell: `best`, `worse than best (p=0.003, paired)`, `not distinguished from
    best (p=0.41, paired)`, `equivalent to best (p=0.01, paired)` or `n/a (needs 2+ seeds)`; p is the
    Holm-adjusted p-value of the comparison that decided (the equivalence test's for "equivalent"). An
    adaptive sweep's: `worse than best (round 2: p=0.0004 < 0.0021)` (`p_cell`)."""
    if point.is_best:
        return BEST
    comparison = point.vs_best
    if comparison is None or comparison.verdict == UNTESTABLE:
        return "n/a (needs 2+ seeds)"
    if comparison.look is not None:
        return f"{point.verdict} ({p_cell(comparison)})"
    p = comparison.equivalence_p_adjusted if comparison.verdict == EQUIVALENT else comparison.p_adjusted
    return f"{point.verdict} (p={p:.2g}, {comparison.test})"


def p_cell(comparison: Comparison) -> str:
    """The p-value as the tables show it: Holm-adjusted (`0.17`), or for a sequential design the nominal
    p of the look that decided against the level it had to beat there (`round 2: p=0.0004 < 0.0021`;
    open: `round 3: p=0.04, needed < 0.0081`)."""
    if comparison.look is None:
        return "" if comparison.p_adjusted is None else format(comparison.p_adjusted, ".2g")
    if comparison.p_value is None or comparison.nominal_level is None:
        return f"round {comparison.look + 1}: not tested"
    decided = comparison.verdict in (DIFFERENT, EQUIVALENT)
    return (f"round {comparison.look + 1}: p={comparison.p_value:.2g} "
            + (f"< {comparison.nominal_level:.2g}" if decided else f"needed < {comparison.nominal_level:.2g}"))


def point_columns(summary: SweepSummary, axes: Sequence[str],
                  reported: Sequence[str] = REPORTED_METRICS) -> tuple[list[str], list[str]]:
    """(columns, metrics shown) of the per-point table: the axes, seeds, the objective and those of
    `reported` present, the verdict."""
    metrics = [summary.objective, *(m for m in reported if m != summary.objective)]
    metrics = [m for m in metrics if any(m in p.estimates for p in summary.points)] or [summary.objective]
    return [*axes, "seeds", *metrics, "verdict (Holm-adjusted p)"], metrics


def point_cells(point: PointSummary, axes: Sequence[str], metrics: Sequence[str]) -> list[str]:
    """One row of the per-point table, as the console, the report and the notebook print it."""
    return ([point.params.get(k, "") for k in axes] + [str(len(point.seeds))]
            + [format_estimate(point.estimates.get(m)) for m in metrics] + [format_comparison(point)])


COMPARISON_COLUMNS = ("a", "b", "test", "n", "a − b", "95 % CI of a − b", "seed correlation", "p (Holm)",
                      "verdict", "detectable (80 % power)", "seeds needed")


def comparison_columns(summary: SweepSummary) -> tuple[str, ...]:
    """The comparisons table's columns: COMPARISON_COLUMNS, with the p column named for a sequential
    design's p (`p_cell`) when the sweep added seeds in rounds."""
    if not summary.sequential:
        return COMPARISON_COLUMNS
    return tuple("p (nominal, at its round)" if c == "p (Holm)" else c for c in COMPARISON_COLUMNS)


def comparison_cells(comparison: Comparison) -> list[str]:
    """One row of the comparisons table: the pair, its test and size, the difference of means (paired:
    the mean per-seed difference), the correlation of the two points' per-seed values, the adjusted
    p-value, the verdict, and for an open comparison the smallest difference its seeds could detect
    and the seeds per point a named (or, marked `~`, the observed) difference would need."""
    def number(value: float | None, digits: str = ".3g") -> str:
        return "" if value is None else format(value, digits)

    interval = "" if comparison.ci_low is None else f"[{comparison.ci_low:.3g}, {comparison.ci_high:.3g}]"
    n = str(comparison.n_a) if comparison.test == PAIRED else f"{comparison.n_a}+{comparison.n_b}"
    needed = ""
    if comparison.verdict == OPEN and comparison.seeds_needed is not None:
        needed = ("~" if comparison.effect_is_observed else "") + str(comparison.seeds_needed)
    return [comparison.a, comparison.b, comparison.test, n, f"{comparison.difference:+.4g}", interval,
            number(comparison.correlation, ".2f"), p_cell(comparison), comparison.verdict,
            number(comparison.detectable) if comparison.verdict == OPEN else "", needed]


MAX_PAIRS_SHOWN = 15  # the console lists every pair up to 6 points; beyond, the pairs with the best point


def shown_comparisons(summary: SweepSummary) -> list[Comparison]:
    """The comparisons a console table lists: all of them, or those with the best point when there
    are more than MAX_PAIRS_SHOWN (the report lists all)."""
    if len(summary.comparisons) <= MAX_PAIRS_SHOWN:
        return list(summary.comparisons)
    best = summary.points[0].label()
    return [c for c in summary.comparisons if best in (c.a, c.b)]


def table_rows(summary: SweepSummary) -> list[dict[str, Any]]:
    """One plain row per point (the MLflow table artifact and the notebook read these columns):
    the params, `n_seeds`, `<metric> mean / ci_low / ci_high` for every estimate, `verdict`,
    `p_vs_best` (Holm-adjusted; None for the best point), `test` (paired / welch); per secondary
    family, `verdict <metric>` and `p_vs_best <metric>` (its own family's)."""
    families = [(family, {p.label(): p for p in family.points}) for family in summary.secondary]
    rows = []
    for point in summary.points:
        row: dict[str, Any] = {**point.params, "point": point.label(), "n_seeds": len(point.values[summary.objective])}
        for name, estimate in point.estimates.items():
            row[f"{name} mean"] = estimate.mean
            row[f"{name} ci_low"] = estimate.low
            row[f"{name} ci_high"] = estimate.high
        row["verdict"] = point.verdict
        row["p_vs_best"] = point.p_vs_best
        row["test"] = point.test
        for family, by_point in families:  # `verdict val/fid_domain`, `p_vs_best val/fid_domain`
            other = by_point.get(point.label())
            row[f"verdict {family.objective}"] = None if other is None else other.verdict
            row[f"p_vs_best {family.objective}"] = None if other is None else other.p_vs_best
        rows.append(row)
    return rows


def comparison_rows(summary: SweepSummary) -> list[dict[str, Any]]:
    """Every comparison as a plain row (`comparisons.json` on the parent run): the `metric` compared
    (the objective's family first, then each secondary family's), all of `Comparison`'s fields, plus
    the options the verdicts were read with."""
    from dataclasses import asdict

    rows = []
    for family in (summary, *summary.secondary):
        extra = {"alpha": family.options.alpha, "equivalence": family.options.equivalence, "effect": family.options.effect}
        rows += [{"metric": family.objective, **asdict(c), **extra} for c in family.comparisons]
    return rows


def metric_key(*parts: str) -> str:
    """An MLflow-safe metric name from parts (`point/schedule_cosine/val/fid_domain/mean`)."""
    return "/".join(_UNSAFE.sub("_", p) for p in parts)


def _metric_label(params: Mapping[str, str]) -> str:
    """A point in flat metric names: `schedule_cosine` (`all` for no params)."""
    return "_".join(f"{k}_{v}" for k, v in sorted(params.items())) or "all"


def parent_metrics(summary: SweepSummary) -> dict[str, float]:
    """Per-point aggregates as flat MLflow metrics: mean, ci_low, ci_high, n, p_vs_best (Holm-adjusted;
    a secondary family's under its metric's name)."""
    out: dict[str, float] = {}
    for point in summary.points:
        label = _metric_label(point.params)
        for name, estimate in point.estimates.items():
            out[metric_key("point", label, name, "mean")] = estimate.mean
            if estimate.low is not None:
                out[metric_key("point", label, name, "ci_low")] = estimate.low
                out[metric_key("point", label, name, "ci_high")] = estimate.high
        out[metric_key("point", label, "n_seeds")] = float(len(next(iter(point.values.values()))))
        if point.p_vs_best is not None:
            out[metric_key("point", label, "p_vs_best")] = point.p_vs_best
    for family in summary.secondary:  # `point/<label>/val/fid_domain/p_vs_best`: that family's Holm-adjusted p
        for point in family.points:
            if point.p_vs_best is not None:
                out[metric_key("point", _metric_label(point.params), family.objective, "p_vs_best")] = point.p_vs_best
    if summary.noise is not None:
        out["evaluation_noise/variance"] = summary.noise.evaluation_variance
        if summary.noise.share is not None:
            out["evaluation_noise/share_of_seed_variance"] = summary.noise.share
    return out


def table_json(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rows -> MLflow's table layout `{"columns": [...], "data": [[...], ...]}` (pandas' orient="split")."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return {"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]}


def log_to_parent(client, run_id: str, summary: SweepSummary) -> None:
    """The per-point aggregates on the sweep's MLflow parent run: flat metrics, the verdict options as
    tags, and the table artifacts `points.json` (a row per point) and `comparisons.json` (a row per
    pair), which `mlflow.load_table` and the run's artifact view read.

    Written with `log_dict` in MLflow's table layout and registered as a table in the run's
    `mlflow.loggedArtifacts` tag, as `MlflowClient.log_table` does, because `log_table` APPENDS to an
    existing file: a rerun or resumed sweep would repeat every row. This way the table is replaced."""
    import json

    from mlflow.entities import Metric
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    items = list(parent_metrics(summary).items())
    for start in range(0, len(items), 500):
        client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in items[start : start + 500]])
    for key, value in {"alpha": summary.options.alpha, "equivalence": summary.options.equivalence,
                       "effect": summary.options.effect}.items():
        client.set_tag(run_id, f"sweep.{key}", str(value))  # tags: a resumed sweep may read them otherwise
    if summary.secondary:
        client.set_tag(run_id, "sweep.secondary", " ".join(f.family.text() for f in summary.secondary))
    logged = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    for name, rows in ((TABLE_ARTIFACT, table_rows(summary)), (COMPARISONS_ARTIFACT, comparison_rows(summary))):
        if not rows:
            continue
        client.log_dict(run_id, table_json(rows), name)
        entry = {"path": name, "type": "table"}
        if entry not in logged:
            logged.append(entry)
    client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(logged))


def estimates_from_row(row: Mapping[str, Any]) -> dict[str, Estimate]:
    """The Estimates of one `table_rows` row (as read back from `points.json`; NaN counts as missing)."""

    def number(value: Any) -> float | None:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

    n = int(row["n_seeds"])
    names = [key[: -len(" mean")] for key in row if key.endswith(" mean")]
    return {
        name: Estimate(float(row[f"{name} mean"]), n, number(row.get(f"{name} ci_low")), number(row.get(f"{name} ci_high")))
        for name in names
        if number(row.get(f"{name} mean")) is not None
    }


def rows_from_table_artifact(table: Mapping[str, Any]) -> list[dict[str, Any]]:
    """MLflow's `{"columns": [...], "data": [[...], ...]}` table JSON -> rows (for the notebook)."""
    return [dict(zip(table["columns"], values)) for values in table["data"]]
