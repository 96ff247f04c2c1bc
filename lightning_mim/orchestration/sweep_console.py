"""What a sweep prints: while trials run, a bar with each running trial's phase, step and loss and
the sweep's ETA (`TrialsBar`); at the end, the per-point table, the trials that did not complete and
where to look next (`print_summary`), and the report (`write_sweep_report`).

The trial side is `trial_progress.TrialProgress`, a Lightning callback that keeps the trial's
progress file current. This module is the driver side: `describe` (one progress record -> a few words),
`running_trials` (every fresh progress file of a sweep -> one line) and `SweepClock` (an ETA from the
trials finished so far). Lightning's own progress bar is per process and goes to the trial's log; this is
the one line per running trial that the sweep's console needs. The driver side imports no Lightning (nor
torch): a sweep driver or worker that only schedules trials starts in about half the time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from lightning_mim.orchestration.protocol import PROGRESS_FILE, read_progress
from lightning_mim.orchestration.summary import (
    REPORTED_METRICS,
    SEED_KEY,
    ProtocolMismatch,
    SweepSummary,
    comparison_cells,
    comparison_columns,
    outcomes_from_optuna,
    point_cells,
    point_columns,
    shown_comparisons,
    summarize,
)
from lightning_mim.orchestration.sweep_spec import SweepSpec
from lightning_mim.sequential import RoundState
from lightning_mim.orchestration.tracking import compare_runs_url, redacted, runs_table_url, ui_command

PROGRESS_STALE_S = 120  # a progress file untouched this long belongs to a trial that is gone


def describe(record: dict[str, Any] | None) -> str:
    """A progress record -> "training 450/600 loss 3.91", "evaluation at step 600", "tokenizer 80/1500"."""
    if not record:
        return "starting"
    phase, step, total, loss = record.get("phase", "?"), record.get("step"), record.get("max_steps"), record.get("loss")
    if phase in ("training", "tokenizer") and step is not None:
        text = f"{phase} {step}/{total}" if total else f"{phase} step {step}"
        return text + (f" loss {loss:.3f}" if loss is not None else "")
    if phase == "evaluation" and step is not None:
        return f"evaluation at step {step}"
    return str(phase)


class SweepClock:
    """ETA of a sweep from the wall time of the trials this driver finished (median, so one trial that
    also trained the shared tokenizer does not dominate), the trials left and the workers running them."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, int(workers))
        self.durations: list[float] = []

    def finished(self, seconds: float) -> None:
        self.durations.append(float(seconds))

    def eta(self, remaining: int, running_elapsed: float = 0.0) -> float | None:
        """Seconds left for `remaining` trials (the running one included, `running_elapsed` into it);
        None before any trial has finished."""
        if not self.durations:
            return None
        typical = sorted(self.durations)[len(self.durations) // 2]
        left = max(0.0, typical - running_elapsed) + typical * max(0, remaining - 1)
        return left / self.workers


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "ETA after the first trial"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"ETA {hours}h{minutes:02d}m" if hours else f"ETA {minutes}m{secs:02d}s"


def point_name(params: dict[str, Any]) -> str:
    """A grid point as people write it: `schedule=cosine seed=1` (the seed last)."""
    def shown(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return " ".join(f"{k}={shown(v)}" for k, v in sorted(params.items(), key=lambda kv: (kv[0] == SEED_KEY, kv[0])))


def running_trials(sweep_dir: Path, eta: str) -> str:
    """ "trial 3: training 450/600 loss 3.912 | trial 4: evaluation at step 600 | ETA 4m10s": every
    trial of the sweep in `sweep_dir` whose progress file is fresh (this worker's and the others')."""
    now, parts = time.time(), []
    for path in sorted(Path(sweep_dir).glob(f"trial-*/{PROGRESS_FILE}")):
        record = read_progress(path)
        if record and record.get("phase") != "done" and now - record.get("time", 0) < PROGRESS_STALE_S:
            parts.append(f"trial {int(path.parent.name.split('-')[1])}: {describe(record)}")
    return " | ".join(parts + [eta])


class TrialsBar:
    """The sweep's progress bar while this worker runs trials (`with TrialsBar(...) as bar:`): trials
    done of all workers, and a description refreshed by `refresh()` about once a second."""

    def __init__(self, sweep_dir: Path, total: int, done: int, workers: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}")]
        self.sweep_dir, self.clock = Path(sweep_dir), SweepClock(workers=workers)
        self.progress = Progress(*columns, transient=False)
        self.task = self.progress.add_task("", total=total, completed=done)
        self._remaining, self._started = 0, time.monotonic()

    def __enter__(self) -> "TrialsBar":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def trial_started(self, remaining: int) -> None:
        self._remaining, self._started = remaining, time.monotonic()
        self.refresh()

    def refresh(self) -> None:
        eta = self.clock.eta(self._remaining, time.monotonic() - self._started)
        self.progress.update(self.task, description=running_trials(self.sweep_dir, format_duration(eta)))

    def trial_ended(self, line: str, done: int) -> None:
        """A trial of this worker ended (`line` says how); `done`: trials of every worker finished."""
        self.clock.finished(time.monotonic() - self._started)
        self.progress.console.print(f"{line} ({time.monotonic() - self._started:.0f} s)")
        self.progress.update(self.task, completed=done)


def print_summary(spec: SweepSpec, study_name: str, storage_url: str, trials: Sequence[Any], runs: Any,
                  rounds: RoundState | None = None) -> None:
    """The per-point table (`orchestration.summary`: mean ± 95 % interval over seeds, each point's
    verdict against the best), the comparisons table (every pair, Holm-adjusted, with what an open one
    would need), the trials that did not complete, and how to open the runs in MLflow (`runs`: the
    sweep's `SweepRuns`); `rounds`: an adaptive sweep's last decisions, which the verdicts then are."""
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)  # logs and CI: don't squash columns
    outcomes = outcomes_from_optuna(trials)
    try:
        summary = summarize(outcomes, spec.objective, spec.direction, options=spec.verdict_options(), rounds=rounds,
                            secondary=spec.secondary)
    except ProtocolMismatch as err:
        print(f"no table: {err}")
        summary = SweepSummary(spec.objective, spec.direction, spec.verdict_options(), [], [])
    points = summary.points
    axes = sorted({k for o in outcomes for k in o.params if k != SEED_KEY})
    _print_family(console, summary, axes, f"sweep {study_name} — {spec.objective} ({spec.direction}); "
                  "mean ± 95 % CI over seeds (Student t)")
    for family in summary.secondary:
        if family.missing:
            print(f"second family of tests: {family.missing}")
            continue
        _print_family(console, family, axes, f"second family of tests: {family.objective} ({family.direction}); "
                      "mean ± 95 % CI over seeds", reported=())
    if points and all(len(p.values[spec.objective]) < 2 for p in points):
        print("one seed per point: no interval and no test (run sweep.seeds=3 before reading small differences)")
    # plain prints: commands and URLs must stay on one line to be copy-pasted (rich wraps them)
    said = {"FAIL": "failed", "PRUNED": "pruned", "RUNNING": "still running"}
    redone = {json.dumps(o.params, sort_keys=True) for o in outcomes if o.state == "COMPLETE"}
    for outcome in outcomes:
        if outcome.state == "FAIL" and json.dumps(outcome.params, sort_keys=True) in redone:
            continue  # a failed try of a point that a later trial completed
        if outcome.state in said:
            trial = next(t for t in trials if t.number == outcome.number)
            why = (trial.user_attrs.get("error") or "?").splitlines()[0] if outcome.state == "FAIL" else ""
            print(f"trial {outcome.number} {said[outcome.state]} {outcome.params}" + (f": {why}" if why else ""))
    if runs.tracking_uri:
        if command := ui_command(runs.tracking_uri):
            print(f"MLflow UI:  {command}")
        print(f"runs table: {runs_table_url(runs.tracking_uri, runs.experiment_id)}")
        children = runs.finished_child_runs()
        if children:
            print(f"compare:    {compare_runs_url(runs.tracking_uri, children, [runs.experiment_id])}")
    print(f"study: {study_name} in {redacted(storage_url)} (rerun the same command to resume)")


def _print_family(console, summary: SweepSummary, axes: Sequence[str], title: str,
                  reported: Sequence[str] = REPORTED_METRICS) -> None:
    """One family's tables under `title`: a row per point (its metric and those of `reported`, its
    verdict), every pair compared (or those with the best point beyond MAX_PAIRS_SHOWN), the noise line."""
    from rich.table import Table

    columns, shown = point_columns(summary, axes, reported)
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in axes else "right")
    for point in summary.points:
        table.add_row(*point_cells(point, axes, shown))
    if summary.points:
        console.print(table)
    if summary.comparisons:
        pairs = shown_comparisons(summary)
        comparisons = Table(title=f"comparisons: {summary.legend()}"
                            + ("" if len(pairs) == len(summary.comparisons) else
                               f" (the {len(pairs)} with the best point shown; all {len(summary.comparisons)} in the report)"))
        for column in comparison_columns(summary):
            comparisons.add_column(column, justify="left" if column in ("a", "b", "verdict") else "right")
        for comparison in pairs:
            comparisons.add_row(*comparison_cells(comparison))
        console.print(comparisons)
    if summary.noise_line():
        print(summary.noise_line())


def write_sweep_report(home: Path, study_name: str, tracking_uri: str | None) -> None:
    """The sweep's report (`orchestration.report`): figures per axis, samples, table; logged to the parent run."""
    from lightning_mim.orchestration import report

    try:
        study = report.find_study(home, study_name)
        files = report.write_report(study)
        if tracking_uri:
            report.log_report(study, tracking_uri, files)
    except Exception as err:  # a report problem must not turn a finished sweep into a failure
        print(f"report: not written ({type(err).__name__}: {err})", file=sys.stderr)
        return
    print(f"report:     {study.directory / report.REPORT_DIR} ({', '.join(p.name for p in files)}); "
          f"again: python -m lightning_mim.report {study_name}")
