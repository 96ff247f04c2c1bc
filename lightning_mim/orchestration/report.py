"""`python -m lightning_mim.report [STUDY]`: a sweep's figures and table, shaped by its own axes.

Written at the end of every sweep (and on demand for any finished study; the latest one when no study
is named) under `<home>/sweeps/<study>/report/`, and logged to the sweep's MLflow parent run under
`report/`:

- `axis-<key>.png`, one per swept axis of a grid: the objective (and CAS or FID beside it; with
  `sweep.secondary`, each secondary family's metric with that family's verdicts) against that axis,
  one series per value of the other axes: every seed's value as a dot, the dots of one seed joined
  across the axis (the blocked design: seed i of every point shares its initial weights, data
  order and evaluation draws), the mean with its 95 % interval over seeds (a line and a band for
  numeric axes such as `decode.steps`, a bar and whiskers for categorical ones such as `schedule`),
  each point's verdict written beside it; the objective's axis is not forced to start at zero;
- `samples.png`: the class grid each grid point's model drew at the end of its training, side by side;
- for search-space sweeps, Optuna's own matplotlib plots: `history.png`, `slice.png`, `importances.png`;
- `summary.md`: the sweep's tables (mean ± 95 % interval and a verdict per point; every pair of points
  compared, Holm-adjusted, with what an open comparison would need: `orchestration.summary`).

The numbers come from the study itself (`summary.summarize` of its trials), so they are the console
table's. The notebook `notebooks/ablations.ipynb` calls these same functions.

Why hand-written axis plots: MLflow's compare view and Optuna's plots know nothing of seeds or of
which params are the ablation's axes; a grid ablation wants its objective against each axis with
intervals, which neither draws.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import optuna
import yaml

from lightning_mim.orchestration.config import DEFAULT_HOME
from lightning_mim.orchestration.sweep_spec import DEFAULT_INFERENCE_ONLY, SweepSpec
from lightning_mim.sequential import RoundState
from lightning_mim.statistics import Estimate
from lightning_mim.orchestration.summary import (
    PARENT_ATTR,
    REPORTED_METRICS,
    TRACKING_ATTR,
    comparison_columns,
    SEED_KEY,
    MetricFamily,
    PointSummary,
    ProtocolMismatch,
    SweepSummary,
    VerdictOptions,
    comparison_cells,
    all_rounds,
    outcomes_from_optuna,
    round_line,
    point_cells,
    point_columns,
    summarize,
)

REPORT_DIR = "report"
SPEC_FILE = "spec.yaml"


@dataclass
class Study:
    """A finished (or running) sweep as the report reads it."""

    name: str
    directory: Path  # <home>/sweeps/<study>
    spec: dict[str, Any]  # spec.yaml
    trials: list[optuna.trial.FrozenTrial]

    @property
    def objective(self) -> str:
        return str(self.spec["objective"])

    @property
    def direction(self) -> str:
        return str(self.spec["direction"])

    @property
    def axes(self) -> list[str]:
        """The grid's swept keys (seed excluded), in the order the spec lists them."""
        return [k for k in (self.spec.get("grid") or {}) if k != SEED_KEY]

    @property
    def is_search(self) -> bool:
        return bool(self.spec.get("search"))

    @property
    def inference_only_spec(self) -> SweepSpec:
        """A SweepSpec holding only the study's inference-only patterns (what `is_inference_only` needs)."""
        return SweepSpec(inference_only=list(self.spec.get("inference_only") or DEFAULT_INFERENCE_ONLY))

    @property
    def verdict_options(self) -> VerdictOptions:
        """How the sweep read its comparisons (`sweep.alpha`, `sweep.equivalence`, `sweep.effect`)."""
        return VerdictOptions(**(self.spec.get("verdicts") or {}))

    @property
    def secondary(self) -> list[MetricFamily]:
        """The metrics whose comparisons are families of their own (`sweep.secondary`)."""
        return [MetricFamily(**family) for family in self.spec.get("secondary") or []]

    def summary(self) -> SweepSummary:
        """The sweep's table and verdicts (an adaptive sweep's: its rounds' last decisions), with a
        summary per secondary family in `.secondary`."""
        rounds = self.rounds()
        return summarize(outcomes_from_optuna(self.trials), self.objective, self.direction, options=self.verdict_options,
                         rounds=rounds[-1] if rounds else None, secondary=self.secondary)

    def rounds(self) -> list[RoundState]:
        """An adaptive sweep's decisions, round by round (empty when its seeds were fixed)."""
        return all_rounds(self.user_attrs())

    def user_attrs(self) -> dict[str, Any]:
        """The study's attributes as stored now (the sweep adds to them while it runs)."""
        return optuna.load_study(study_name=self.name, storage=self.storage).user_attrs

    def points(self) -> list[PointSummary]:
        return self.summary().points

    @property
    def parent_run_id(self) -> str | None:
        """The sweep's MLflow parent run (None before the sweep created it)."""
        return self.user_attrs().get(PARENT_ATTR)

    @property
    def tracking_uri(self) -> str | None:
        """The MLflow tracking URI the sweep logged to, as the sweep recorded it with the study (a SQLite
        file, a database, a tracking server); None without MLflow (`logger=csv`)."""
        return self.user_attrs().get(TRACKING_ATTR)

    @property
    def storage(self) -> str:
        return self.spec.get("storage") or f"sqlite:///{self.directory.parent.parent}/optuna.db"

    def axis_values(self, axis: str) -> list[str]:
        return [str(v) for v in (self.spec.get("grid") or {}).get(axis, [])]


def home_dir(home: str | os.PathLike | None = None) -> Path:
    """The home to read: `home`, else $LIGHTNING_MIM_HOME, else the nearest `lmim/` in the working
    directory or above it (a notebook's kernel runs in `notebooks/`, beside the clone's `lmim/`), else
    `./lmim`."""
    if home or os.environ.get("LIGHTNING_MIM_HOME"):
        return Path(home or os.environ["LIGHTNING_MIM_HOME"]).expanduser().resolve()
    here = Path.cwd().resolve()
    return next((d / DEFAULT_HOME for d in (here, *here.parents) if (d / DEFAULT_HOME).is_dir()), here / DEFAULT_HOME)


def find_study(home: str | os.PathLike | None = None, name: str | None = None) -> Study:
    """The study `name` of `home` (default: the sweep whose spec was written last)."""
    sweeps = home_dir(home) / "sweeps"
    if name:
        directory = sweeps / name
        if not (directory / SPEC_FILE).is_file():
            known = sorted(p.parent.name for p in sweeps.glob(f"*/{SPEC_FILE}"))
            raise FileNotFoundError(f"no sweep '{name}' in {sweeps}; known: {', '.join(known) or 'none'}")
    else:
        specs = sorted(sweeps.glob(f"*/{SPEC_FILE}"), key=lambda p: p.stat().st_mtime)
        if not specs:
            raise FileNotFoundError(f"no sweep in {sweeps} (run `python -m lightning_mim.sweep ...` first)")
        directory = specs[-1].parent
    spec = yaml.safe_load((directory / SPEC_FILE).read_text()) or {}
    found = Study(directory.name, directory, spec, [])
    found.trials = optuna.load_study(study_name=found.name, storage=found.storage).get_trials(deepcopy=False)
    return found


# -- one figure per swept axis --------------------------------------------------------------------------
def _numeric(values: Sequence[str]) -> bool:
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class AxisCell:
    """One point of an axis figure's series: the axis `value`, the metric's `estimate` (mean ± 95 %
    interval over seeds), the metric per seed (`by_seed`) and the point's verdict on the objective."""

    value: str
    estimate: Estimate
    by_seed: dict[str, float]
    verdict: str


def axis_series(study: Study, points: Sequence[PointSummary], axis: str, metric: str) -> dict[str, list[AxisCell]]:
    """{series label: [AxisCell, ...]} of `metric` against `axis`, one series per combination of the
    other axes' values (label "all" when there is none); series and axis values in the spec's order."""
    others = [a for a in study.axes if a != axis]

    def rank(key: str, value: str) -> int:
        values = study.axis_values(key)
        return values.index(value) if value in values else len(values)

    series: dict[str, list[AxisCell]] = {}
    ranks: dict[str, tuple[int, ...]] = {}
    for point in points:
        estimate = point.estimates.get(metric)
        if estimate is None or axis not in point.params:
            continue
        label = ", ".join(f"{k}={point.params[k]}" for k in others) or "all"
        ranks[label] = tuple(rank(k, point.params[k]) for k in others)
        by_seed = point.seed_values.get(metric, {})
        series.setdefault(label, []).append(AxisCell(point.params[axis], estimate, by_seed, point.verdict))
    for label in series:
        series[label].sort(key=lambda cell: rank(axis, cell.value))
    return {label: series[label] for label in sorted(series, key=lambda label: (ranks[label], label))}


COMPANIONS = (("val/cas", "maximize"), ("val/fid_domain", "minimize"))
"""(metric, direction that is better) drawn beside the objective when no secondary family is named: the
first that is not the objective."""


@dataclass(frozen=True)
class Panel:
    """One panel of an axis figure: `metric` drawn from `points`, better when it goes `direction`;
    `verdicts`: whether the points' verdicts (their family's) are written beside them."""

    metric: str
    points: Sequence[PointSummary]
    direction: str
    verdicts: bool


def _panels(study: Study, points: Sequence[PointSummary], secondary: Sequence[SweepSummary]) -> list[Panel]:
    """The objective with its verdicts, then each secondary family's metric with that family's verdicts;
    without secondary families, CAS (or FID when CAS is the objective) beside it when the trials report it."""
    verdicts = len(points) > 1
    panels = [Panel(study.objective, points, study.direction, verdicts)]
    if secondary:
        return panels + [Panel(f.objective, f.points, f.direction, len(f.points) > 1) for f in secondary]
    metric, direction = next((m, d) for m, d in COMPANIONS if m != study.objective)
    if any(metric in p.estimates for p in points):
        panels.append(Panel(metric, points, direction, False))
    return panels


def _fit_title(fig, title: str, fontsize: float = 9) -> None:
    """Set `title` as `fig`'s suptitle, wrapped into lines whose rendered width fits the figure (a line
    wider than the figure is clipped at both edges)."""
    import textwrap

    width = int(16 * fig.get_figwidth())  # characters a line; narrowed until the widest line fits
    text = fig.suptitle(textwrap.fill(title, width), fontsize=fontsize)
    renderer = fig.canvas.get_renderer()
    while width > 20 and text.get_window_extent(renderer).width > 0.97 * fig.bbox.width:
        width = int(width * 0.9)
        text.set_text(textwrap.fill(title, width))


VERDICT_LINE_CHARS = 17
"""A verdict beside its bar is wrapped to lines this long ("not distinguished" / "from best"): at 7 pt
about 70 pt wide, less than the space between two categorical values (`PANEL_INCHES_PER_VALUE`)."""

PANEL_INCHES_PER_VALUE = 1.5
"""A categorical panel is at least this many inches wide per axis value (5.5 inches at the least), so
that a wrapped verdict ends before the next value's bar."""


def verdict_label(verdict: str) -> str:
    """`verdict` as the figure writes it beside its point: wrapped to `VERDICT_LINE_CHARS` a line."""
    import textwrap

    return textwrap.fill(verdict, VERDICT_LINE_CHARS)


def draw_axis_figure(study: Study, points: Sequence[PointSummary], axis: str, path: Path,
                     secondary: Sequence[SweepSummary] = ()):
    """The figure of `axis` (see the module docstring), saved to `path`; returns the matplotlib figure.
    `secondary`: the summaries of the sweep's secondary families (`SweepSummary.secondary`), a panel
    each with that family's verdicts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(study, points, secondary)
    metrics = [panel.metric for panel in panels]
    values = study.axis_values(axis)
    numeric = _numeric(values)
    width = 5.5 if numeric else max(5.5, PANEL_INCHES_PER_VALUE * len(values))  # room for each value's label
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.6), squeeze=False, layout="constrained")
    counts = sorted({len(p.seeds) for p in points}) or [1]
    seeds = counts[-1]
    seeds_text = f"{counts[0]}–{counts[-1]}" if len(counts) > 1 else str(seeds)  # seeds=auto: points differ
    for ax, panel in zip(axes[0], panels):
        metric = panel.metric
        series = axis_series(study, panel.points, axis, metric)
        shift = 0.0 if numeric else 0.8 / max(1, len(series))
        for index, (label, cells) in enumerate(series.items()):
            color = f"C{index % 10}"
            xs = [float(c.value) if numeric else values.index(c.value) + (index - (len(series) - 1) / 2) * shift for c in cells]
            for seed in sorted({s for c in cells for s in c.by_seed}, key=lambda s: (len(s), s)):  # one line per seed
                line = [(x, c.by_seed[seed]) for x, c in zip(xs, cells) if seed in c.by_seed]
                ax.plot(*zip(*line), color=color, alpha=0.35, linewidth=0.8, marker="o", markersize=3)
            means = [c.estimate.mean for c in cells]
            half = [c.estimate.half_width or 0.0 for c in cells]
            shown = label if label != "all" else f"mean ± 95 % CI ({seeds_text} seeds)" if seeds > 1 else "one seed"
            if numeric:
                ax.plot(xs, means, color=color, linewidth=2, marker="s", label=shown)
                ax.fill_between(xs, [m - h for m, h in zip(means, half)], [m + h for m, h in zip(means, half)], color=color, alpha=0.15)
            else:
                ax.errorbar(xs, means, yerr=half, fmt="_", markersize=16, color=color, capsize=4, linewidth=2, label=shown)
            if panel.verdicts:  # each family's own verdicts
                for x, cell in zip(xs, cells):
                    ax.annotate(verdict_label(cell.verdict), (x, cell.estimate.mean), textcoords="offset points",
                                xytext=(10, 0), va="center", fontsize=7, color=color)  # clear of the 16-pt mean mark
        if not numeric:
            ax.set_xticks(range(len(values)), values)
            ax.set_xlim(-0.6, len(values) + 0.2)  # room right of the last value for its verdict
        ax.set_xlabel(axis)
        ax.set_ylabel(f"{metric} {'↓' if panel.direction == 'minimize' else '↑'}")
        ax.legend(fontsize=8, title=", ".join(a for a in study.axes if a != axis) or None)
    title = f"{study.name}: {', '.join(metrics)} vs {axis}"
    if seeds > 1:
        title += (f" — mean and 95 % interval over {seeds_text} seeds; faint lines join each seed's values (seed i of every "
                  "point shares its initial weights, data order and evaluation draws)")
    _fit_title(fig, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


# -- the points' samples, side by side ---------------------------------------------------------------------
def sample_grids(study: Study) -> dict[str, Path]:
    """{trained point: the last class-grid picture its model drew}, one per trained model of seed 0.
    Inference-only axes (`decode.*`) are not part of the label: the pictures were drawn during training,
    with the training run's decode settings."""
    found: dict[str, Path] = {}
    inference_only = study.inference_only_spec.is_inference_only
    for trial in study.trials:
        checkpoint = trial.user_attrs.get("checkpoint")
        if trial.state.name != "COMPLETE" or not checkpoint or str(trial.params.get(SEED_KEY, "0")) != "0":
            continue
        pictures = sorted((Path(checkpoint).parents[1] / "pictures" / "class_grid").glob("step_*.png"))
        trained = {k: v for k, v in sorted(trial.params.items()) if k != SEED_KEY and not inference_only(k)}
        label = " ".join(f"{k}={v}" for k, v in trained.items()) or "all"
        if pictures:
            found.setdefault(label, pictures[-1])
    return dict(sorted(found.items()))


def draw_samples(grids: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    columns = min(4, len(grids))
    rows = -(-len(grids) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, picture) in zip(axes.flat, grids.items()):
        ax.imshow(Image.open(picture))
        ax.set_title(label, fontsize=8)
    fig.suptitle("class grids at the end of training (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- search spaces: Optuna's own plots -----------------------------------------------------------------
def draw_optuna_plots(study: Study, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import warnings

    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    loaded = optuna.load_study(study_name=study.name, storage=study.storage)
    written = []
    complete = [t for t in loaded.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    plots = [("history", ovm.plot_optimization_history), ("slice", ovm.plot_slice)]
    if len(complete) >= 2 and len(complete[0].params) >= 1:
        plots.append(("importances", ovm.plot_param_importances))
    for name, plot in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
            try:
                axes = plot(loaded)
            except (ValueError, RuntimeError) as err:  # e.g. importances of a one-valued space
                print(f"report: no {name} plot ({err})", file=sys.stderr)
                continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        figure.set_size_inches(max(6, figure.get_size_inches()[0]), 4.5)
        figure.tight_layout()
        path = directory / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


# -- the table and the whole report --------------------------------------------------------------------
def summary_markdown(study: Study, summary: SweepSummary) -> str:
    """The per-point table and every comparison, as the console prints them (`summary.point_cells`,
    `summary.comparison_cells`); then the same for each secondary family, with its metric only."""
    axes = study.axes or sorted({k for p in summary.points for k in p.params})
    lines = [f"# {study.name}: {study.objective} ({study.direction})", "",
             "mean ± half-width of the 95 % interval over seeds (Student t)", ""]
    lines += _family_markdown(summary, axes, "## Comparisons: ")
    for family in summary.secondary:
        lines += ["", f"## Second family of tests: {family.objective} ({family.direction})", ""]
        if family.missing:
            lines.append(family.missing)
            continue
        lines += _family_markdown(family, axes, "Comparisons: ", reported=())
    rounds = study.rounds()
    if rounds:
        lines += ["", "## Rounds (sweep.seeds=auto)", "", *(f"- {round_line(r)}" for r in rounds)]
    return "\n".join(lines) + "\n"


def _family_markdown(summary: SweepSummary, axes: Sequence[str], heading: str,
                     reported: Sequence[str] = REPORTED_METRICS) -> list[str]:
    """One family's markdown: its per-point table, its comparisons under `heading` + the legend, and
    its evaluation-noise line; `reported`: the metrics shown beside the family's own."""

    def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                *("| " + " | ".join(cells) + " |" for cells in rows)]

    columns, metrics = point_columns(summary, axes, reported)
    lines = table(columns, [point_cells(p, axes, metrics) for p in summary.points])
    if summary.comparisons:
        lines += ["", f"{heading}{summary.legend()}", ""]
        lines += table(comparison_columns(summary), [comparison_cells(c) for c in summary.comparisons])
    if summary.noise_line():
        lines += ["", summary.noise_line()]
    return lines


def write_report(study: Study) -> list[Path]:
    """Write every figure and the table of `study` under its `report/` directory; returns the files."""
    directory = study.directory / REPORT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    table = directory / "summary.md"
    try:
        summary = study.summary()
    except ProtocolMismatch as err:  # neither a table nor figures pool two protocols
        table.write_text(f"# {study.name}: no table\n\n{err}\n")
        return [table]
    points = summary.points
    table.write_text(summary_markdown(study, summary))
    written.append(table)
    if points and not study.is_search:
        for axis in study.axes:
            path = directory / f"axis-{axis}.png"
            draw_axis_figure(study, points, axis, path, summary.secondary)
            written.append(path)
    grids = sample_grids(study)
    if grids:
        draw_samples(grids, directory / "samples.png")
        written.append(directory / "samples.png")
    if study.is_search:
        written += draw_optuna_plots(study, directory)
    return written


def log_report(study: Study, tracking_uri: str, files: Sequence[Path]) -> None:
    """Log the report's files to the sweep's MLflow parent run (artifact directory `report/`)."""
    from mlflow.tracking import MlflowClient

    parent = study.parent_run_id
    if not parent:
        return
    client = MlflowClient(tracking_uri=tracking_uri)
    for path in files:
        client.log_artifact(parent, str(path), artifact_path=REPORT_DIR)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_mim.report", description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", help="the study name a sweep printed (default: the latest sweep)")
    parser.add_argument("--home", help="the lightning-mim home (default: $LIGHTNING_MIM_HOME, else the nearest lmim/ here or above)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the report to the parent run")
    args = parser.parse_args(argv)
    try:
        study = find_study(args.home, args.study)
    except (FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    files = write_report(study)
    if not args.no_mlflow and study.tracking_uri:
        log_report(study, study.tracking_uri, files)
    print(f"report of {study.name}: {study.directory / REPORT_DIR}")
    for path in files:
        print(f"  {path.name}")
    return 0
