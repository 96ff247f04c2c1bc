"""Writes `notebooks/ablations.ipynb` (run it after editing the cells below; the .ipynb is committed).

Keeping the cells in a Python file makes the notebook reviewable as code and diffable.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell(
        "# A sweep's report\n\n"
        "Opens the latest sweep of the lightning-mim home (or the study named below) and draws what\n"
        "`python -m lightning_mim.report` writes: the per-point table (mean ± 95 % interval over seeds, the\n"
        "verdicts of every pair with the family-wise error controlled, paired by seed), one figure per swept\n"
        "axis, the points' samples, Optuna's plots for search spaces. Every number and figure comes from\n"
        "`lightning_mim.orchestration.report` (the sweep writes the same files at its end); the MLflow cell\n"
        "reads the parent run's tables back through the tracking URI the sweep logged to.\n\n"
        "The home: `LIGHTNING_MIM_HOME`, else the nearest `lmim/` in the kernel's directory or above it (the\n"
        "clone's `lmim/` when the notebook runs from `notebooks/`). Headless, from the clone:\n"
        "`jupyter execute --output=ablations-run notebooks/ablations.ipynb` writes `notebooks/ablations-run.ipynb`."
    ),
    new_code_cell(
        "# parameters: the home (None: LIGHTNING_MIM_HOME, else the nearest lmim/) and a study name ('' = the latest sweep)\n"
        "HOME = None\n"
        "STUDY = ''",
        metadata={"tags": ["parameters"]},
    ),
    new_code_cell(
        "from IPython.display import Image, Markdown, display\n\n"
        "from lightning_mim.orchestration import report\n"
        "from lightning_mim.orchestration.summary import format_estimate\n\n"
        "study = report.find_study(HOME, STUDY or None)\n"
        "summary = study.summary()  # refuses, in one line, trials scored under two evaluation protocols\n"
        "points = summary.points\n"
        "figures = study.directory / report.REPORT_DIR\n"
        "print(f'study {study.name}: {len(study.trials)} trials, {len(points)} grid points, axes {study.axes or list(study.spec.get(\"search\") or {})}')\n"
        "display(Markdown(report.summary_markdown(study, summary)))  # points, verdicts, every pair"
    ),
    new_markdown_cell("## The objective (and each secondary family's metric) against each swept axis"),
    new_code_cell(
        "for axis in ([] if study.is_search else study.axes):\n"
        "    path = figures / f'axis-{axis}.png'\n"
        "    report.draw_axis_figure(study, points, axis, path, summary.secondary)  # a panel per secondary family\n"
        "    display(Image(filename=str(path)))"
    ),
    new_markdown_cell("## Samples of every grid point (seed 0, end of training)"),
    new_code_cell(
        "grids = report.sample_grids(study)\n"
        "if grids:\n"
        "    report.draw_samples(grids, figures / 'samples.png')\n"
        "    display(Image(filename=str(figures / 'samples.png')))\n"
        "else:\n"
        "    print('no sample pictures recorded for this study')"
    ),
    new_markdown_cell("## Search spaces: Optuna's own plots (history, slice, importances)"),
    new_code_cell(
        "if study.is_search:\n"
        "    for path in report.draw_optuna_plots(study, figures):\n"
        "        display(Image(filename=str(path)))\n"
        "else:\n"
        "    print('a grid sweep: see the axis figures above')"
    ),
    new_markdown_cell(
        "## The same tables, read back from the MLflow parent run\n\n"
        "The sweep logs its per-point aggregates and verdicts to its parent run as the table `points.json`,\n"
        "and every pairwise comparison as `comparisons.json`; these lines are the console tables' cells."
    ),
    new_code_cell(
        "import mlflow\n\n"
        "from lightning_mim.orchestration.summary import COMPARISONS_ARTIFACT, TABLE_ARTIFACT, estimates_from_row\n\n"
        "parent_id = study.parent_run_id\n"
        "mlflow.set_tracking_uri(study.tracking_uri)  # the store the sweep logged to (load_table searches through it)\n"
        "client = mlflow.MlflowClient()\n"
        "parent = client.get_run(parent_id)\n"
        "table = client.load_table(parent.info.experiment_id, TABLE_ARTIFACT, run_ids=[parent_id])\n"
        "for _, row in table.iterrows():  # mean ± half-width of the 95 % interval\n"
        "    shown = [f'{name} {format_estimate(est)}' for name, est in estimates_from_row(row.to_dict()).items()]\n"
        "    families = [f'| {k[len(\"verdict \"):]}: {row[k]}' for k in table.columns if k.startswith('verdict ')]  # sweep.secondary\n"
        "    print(f\"{row['point']} (n={row['n_seeds']}):\", '; '.join(shown), '|', row['verdict'], *families)\n"
        "if len(table) > 1:\n"
        "    pairs = client.load_table(parent.info.experiment_id, COMPARISONS_ARTIFACT, run_ids=[parent_id])\n"
        "    display(pairs[['metric', 'a', 'b', 'test', 'difference', 'correlation', 'p_adjusted', 'verdict', 'detectable', 'seeds_needed']])\n"
        "print('compare the runs in MLflow:', parent.data.tags.get('lightning_mim.compare_url', '(no finished child yet)'))"
    ),
    new_markdown_cell("## The schedules γ(r)"),
    new_code_cell(
        "import matplotlib\n"
        "matplotlib.use('Agg')\n"
        "import matplotlib.pyplot as plt\n"
        "import torch\n\n"
        "from lightning_mim.masking import SCHEDULE_NAMES, gamma\n\n"
        "r = torch.linspace(0, 1 - 1e-6, 200)\n"
        "fig, ax = plt.subplots(figsize=(5, 4))\n"
        "for name in SCHEDULE_NAMES:\n"
        "    ax.plot(r, gamma(name, r, n_tokens=256), label=name)\n"
        "ax.set_xlabel('r'); ax.set_ylabel('mask ratio γ(r)'); ax.legend(fontsize=8)\n"
        "fig.tight_layout(); display(fig)  # shown, not written: the report directory holds the sweep's files only"
    ),
]


def build() -> nbformat.NotebookNode:
    notebook = new_notebook(cells=CELLS)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return notebook


if __name__ == "__main__":
    path = Path(__file__).with_name("ablations.ipynb")
    nbformat.write(build(), path)
    print(f"wrote {path}")
