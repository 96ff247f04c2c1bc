"""A sweep's result per grid point: the seeds of a point pooled into mean ± 95 % interval, and each
point tested against the best one (`lightning_mim.statistics`: Student-t interval; Welch's t-test, or the
paired t-test by seed when both points evaluate the same trained models).

One function, `summarize`, computes what the console table (`orchestration.sweep.print_summary`), the
MLflow parent run (`log_to_parent`) and the notebook show, so the three agree by construction.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from lightning_mim.statistics import ALPHA, Estimate, mean_interval, paired_p_value, resolved, welch_p_value

SEED_KEY = "seed"
WELCH, PAIRED = "welch", "paired"  # PointSummary.test: which test gave p_vs_best
REPORTED_METRICS = ("val/fid_domain", "val/cas", "val/is_domain", "val/loss")
TABLE_ARTIFACT = "points.json"
_UNSAFE = re.compile(r"[^a-zA-Z0-9_/. -]")  # MLflow metric names allow only these characters


@dataclass(frozen=True)
class TrialOutcome:
    """What the summary needs of one finished trial (an Optuna FrozenTrial reduced to plain data)."""

    number: int
    params: dict[str, str]
    state: str  # COMPLETE, FAIL, PRUNED, ...
    value: float | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PointSummary:
    """One grid point: its non-seed params, the seeds and trials behind it, an Estimate per metric
    (objective first), and the comparison of its objective with the best point's."""

    params: dict[str, str]
    seeds: list[str]
    trials: list[int]
    estimates: dict[str, Estimate]
    values: dict[str, list[float]]
    is_best: bool
    p_vs_best: float | None
    resolved_vs_best: bool | None
    test: str | None = None  # WELCH or PAIRED for the other points; None for the best one

    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.params.items())) or "all"


def outcomes_from_optuna(trials: Iterable[Any]) -> list[TrialOutcome]:
    """Optuna FrozenTrials -> TrialOutcome (params as strings, the metrics the trial recorded)."""
    return [
        TrialOutcome(
            number=t.number,
            params={k: str(v) for k, v in t.params.items()},
            state=t.state.name,
            value=t.value,
            metrics=dict(t.user_attrs.get("metrics") or {}),
        )
        for t in trials
        if t.state.name != "WAITING"
    ]


def summarize(
    outcomes: Sequence[TrialOutcome],
    objective: str,
    direction: str,
    metrics: Sequence[str] = REPORTED_METRICS,
    alpha: float = ALPHA,
    inference_only: Callable[[str], bool] | None = None,
) -> list[PointSummary]:
    """Pool the COMPLETE trials by grid point (params without `seed`), best point first.

    Per point: an Estimate of the objective (the trial's recorded metric of that name, else its Optuna
    value) and of every metric in `metrics` that its trials report;
    the best point has the best mean objective (`direction`); every other point gets the p-value of
    its objective values against the best point's and whether the difference is resolved at `alpha`
    (None when not testable). The test is the paired t-test over the seeds both points have when
    they differ only in keys `inference_only(key)` says are inference-only (the same trained models,
    evaluated two ways) and share >= 2 seeds; Welch's t-test otherwise (None below 2 seeds a side).
    """
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be minimize or maximize, got {direction!r}")
    groups: dict[tuple, list[TrialOutcome]] = {}
    for outcome in outcomes:
        if outcome.state != "COMPLETE" or outcome.value is None or not math.isfinite(outcome.value):
            continue
        point = {k: v for k, v in outcome.params.items() if k != SEED_KEY}
        groups.setdefault(tuple(sorted(point.items())), []).append(outcome)
    if not groups:
        return []
    names = [objective, *(m for m in metrics if m != objective)]
    pooled = []
    for key, members in groups.items():
        values: dict[str, list[float]] = {objective: [float(o.metrics.get(objective, o.value)) for o in members]}
        by_seed = dict(zip((o.params.get(SEED_KEY, "") for o in members), values[objective]))  # for paired tests
        for name in names[1:]:
            got = [float(o.metrics[name]) for o in members if name in o.metrics and math.isfinite(o.metrics[name])]
            if got:
                values[name] = got
        pooled.append((dict(key), members, values, {n: mean_interval(v) for n, v in values.items()}, by_seed))
    sign = 1 if direction == "minimize" else -1
    pooled.sort(key=lambda p: (sign * p[3][objective].mean, str(sorted(p[0].items()))))
    best_params, _, best, _, best_by_seed = pooled[0]
    summaries = []
    for index, (params, members, values, estimates, by_seed) in enumerate(pooled):
        p, test = None, None
        if index > 0:
            common = sorted(set(by_seed) & set(best_by_seed))
            if _same_models(params, best_params, inference_only) and len(common) >= 2:
                p, test = paired_p_value([by_seed[s] for s in common], [best_by_seed[s] for s in common]), PAIRED
            else:
                p, test = welch_p_value(values[objective], best[objective]), WELCH
        summaries.append(
            PointSummary(
                params=params,
                seeds=sorted({o.params.get(SEED_KEY, "") for o in members}),
                trials=sorted(o.number for o in members),
                estimates=estimates,
                values=values,
                is_best=index == 0,
                p_vs_best=p,
                resolved_vs_best=None if index == 0 else resolved(p, alpha),
                test=test,
            )
        )
    return summaries


def _same_models(a: Mapping[str, str], b: Mapping[str, str], inference_only: Callable[[str], bool] | None) -> bool:
    """Whether two points evaluate the same trained models: every key on which they differ is inference-only."""
    if inference_only is None:
        return False
    differing = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    return bool(differing) and all(inference_only(k) for k in differing)


def comparison_legend(summaries: Sequence[PointSummary], alpha: float = ALPHA) -> str:
    """How the "vs best" column was tested, for the table's title: Welch's test, and the paired one where used."""
    legend = f"Welch t-test at α = {alpha}"
    if any(p.test == PAIRED for p in summaries):
        legend += " (paired t-test by seed where the points share their trained models)"
    return legend


def format_estimate(estimate: Estimate | None, digits: int = 4) -> str:
    """`3.1042 ± 0.4210` (95 % interval half-width), or `3.1042 (n=1)` when no interval exists."""
    if estimate is None:
        return ""
    if estimate.half_width is None:
        return f"{estimate.mean:.{digits}f} (n={estimate.n})"
    return f"{estimate.mean:.{digits}f} ± {estimate.half_width:.{digits}f}"


def format_comparison(point: PointSummary) -> str:
    """`best`, `p=0.003 resolved`, `p=0.41 not resolved`, `p=0.024 resolved (paired)`, or `n/a (needs 2+ seeds)`."""
    if point.is_best:
        return "best"
    if point.p_vs_best is None:
        return "n/a (needs 2+ seeds)"
    paired = " (paired)" if point.test == PAIRED else ""
    return f"p={point.p_vs_best:.2g} {'resolved' if point.resolved_vs_best else 'not resolved'}{paired}"


def table_rows(summaries: Sequence[PointSummary], objective: str) -> list[dict[str, Any]]:
    """One plain row per point (the MLflow table artifact and the notebook read these columns):
    the params, `n_seeds`, `<metric> mean / ci_low / ci_high` for every estimate, `p_vs_best`, `test`
    (welch / paired; None for the best point), `resolved`."""
    rows = []
    for point in summaries:
        row: dict[str, Any] = {**point.params, "point": point.label(), "n_seeds": len(point.values[objective])}
        for name, estimate in point.estimates.items():
            row[f"{name} mean"] = estimate.mean
            row[f"{name} ci_low"] = estimate.low
            row[f"{name} ci_high"] = estimate.high
        row["p_vs_best"] = point.p_vs_best
        row["test"] = point.test
        row["resolved"] = "best" if point.is_best else point.resolved_vs_best
        rows.append(row)
    return rows


def metric_key(*parts: str) -> str:
    """An MLflow-safe metric name from parts (`point/schedule_cosine/val/fid_domain/mean`)."""
    return "/".join(_UNSAFE.sub("_", p) for p in parts)


def parent_metrics(summaries: Sequence[PointSummary]) -> dict[str, float]:
    """Per-point aggregates as flat MLflow metrics: mean, ci_low, ci_high, n, p_vs_best."""
    out: dict[str, float] = {}
    for point in summaries:
        label = "_".join(f"{k}_{v}" for k, v in sorted(point.params.items())) or "all"
        for name, estimate in point.estimates.items():
            out[metric_key("point", label, name, "mean")] = estimate.mean
            if estimate.low is not None:
                out[metric_key("point", label, name, "ci_low")] = estimate.low
                out[metric_key("point", label, name, "ci_high")] = estimate.high
        out[metric_key("point", label, "n_seeds")] = float(len(next(iter(point.values.values()))))
        if point.p_vs_best is not None:
            out[metric_key("point", label, "p_vs_best")] = point.p_vs_best
    return out


def table_json(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rows -> MLflow's table layout `{"columns": [...], "data": [[...], ...]}` (pandas' orient="split")."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return {"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]}


def log_to_parent(client, run_id: str, summaries: Sequence[PointSummary], objective: str) -> None:
    """The per-point aggregates on the sweep's MLflow parent run: flat metrics and the table artifact
    `points.json`, which `mlflow.load_table` and the run's artifact view read.

    Written with `log_dict` in MLflow's table layout and registered as a table in the run's
    `mlflow.loggedArtifacts` tag, as `MlflowClient.log_table` does, because `log_table` APPENDS to an
    existing file: a rerun or resumed sweep would repeat every row. This way the table is replaced."""
    import json

    from mlflow.entities import Metric
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    items = list(parent_metrics(summaries).items())
    for start in range(0, len(items), 500):
        client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in items[start : start + 500]])
    rows = table_rows(summaries, objective)
    if not rows:
        return
    client.log_dict(run_id, table_json(rows), TABLE_ARTIFACT)
    logged = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": TABLE_ARTIFACT, "type": "table"}
    if entry not in logged:
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))


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
