"""Writes `notebooks/ablations.ipynb` (run it after editing the cells below; the .ipynb is committed).

Keeping the cells in a Python file makes the notebook reviewable as code and diffable.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell(
        "# Ablation plots from MLflow\n\n"
        "Reads the trial runs of a sweep (`python -m lightning_mim.sweep ...`) back from MLflow and draws\n"
        "the paper's ablation figures. Set the tracking URI, experiment and (optionally) one sweep's study\n"
        "name below, or through the environment (`LMIM_TRACKING_URI`, `LMIM_EXPERIMENT`, `LMIM_STUDY`,\n"
        "`LMIM_FIGURES`) when run headless:\n\n"
        "`LMIM_TRACKING_URI=sqlite:///$PWD/lmim/mlflow.db jupyter nbconvert --execute --to notebook notebooks/ablations.ipynb`"
    ),
    new_code_cell(
        "import os\n"
        "from pathlib import Path\n\n"
        "# parameters\n"
        "TRACKING_URI = os.environ.get('LMIM_TRACKING_URI', f\"sqlite:///{Path('lmim/mlflow.db').resolve()}\")\n"
        "EXPERIMENT = os.environ.get('LMIM_EXPERIMENT', 'digits-maskgit')\n"
        "STUDY = os.environ.get('LMIM_STUDY', '')  # one sweep's study name (printed by the sweep); '' = every sweep\n"
        "FIGURES = Path(os.environ.get('LMIM_FIGURES', 'figures'))\n"
        "FIGURES.mkdir(parents=True, exist_ok=True)\n"
        "print(TRACKING_URI, EXPERIMENT, STUDY or '(all sweeps)', FIGURES)",
        metadata={"tags": ["parameters"]},
    ),
    new_code_cell(
        "import matplotlib\n"
        "matplotlib.use('Agg')\n"
        "import matplotlib.pyplot as plt\n"
        "import mlflow\n"
        "import numpy as np\n"
        "import pandas as pd\n\n"
        "mlflow.set_tracking_uri(TRACKING_URI)\n"
        "query = \"tags.`lightning_mim.role` = 'trial' and attributes.status = 'FINISHED'\"\n"
        "if STUDY:\n"
        "    query += f\" and tags.`lightning_mim.study` = '{STUDY}'\"\n"
        "runs = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=query)\n"
        "print(f'{len(runs)} finished trial runs')\n"
        "\n"
        "def column(name):\n"
        "    \"\"\"A param or metric column (params come back as strings).\"\"\"\n"
        "    for prefix in ('metrics.', 'params.'):\n"
        "        if prefix + name in runs:\n"
        "            return runs[prefix + name]\n"
        "    return pd.Series([np.nan] * len(runs), index=runs.index)\n"
        "\n"
        "table = pd.DataFrame({\n"
        "    'schedule': column('schedule.name'),\n"
        "    'steps': pd.to_numeric(column('decode.steps'), errors='coerce'),\n"
        "    'seed': column('seed'),\n"
        "    'ratio': column('choices.ratio'),\n"
        "    'fid_domain': column('val/fid_domain'),\n"
        "    'cas': column('val/cas'),\n"
        "    'val_loss': column('val/loss'),\n"
        "    'probe_top1': column('val/probe_top1'),\n"
        "})\n"
        "table"
    ),
    new_markdown_cell(
        "## Per grid point: mean ± 95 % interval over seeds, and the test against the best point\n\n"
        "The sweep computes these once (`lightning_mim.orchestration.summary`) and stores them on its MLflow\n"
        "parent run as the table `points.json`: the same numbers as the sweep's console table."
    ),
    new_code_cell(
        "sweep_query = \"tags.`lightning_mim.role` = 'sweep'\"\n"
        "if STUDY:\n"
        "    sweep_query += f\" and tags.`lightning_mim.study` = '{STUDY}'\"\n"
        "parents = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=sweep_query)\n"
        "tables = []\n"
        "client = mlflow.MlflowClient()\n"
        "for _, parent in parents.iterrows():  # load_table searches one experiment: the parent's own\n"
        "    study = parent['tags.lightning_mim.study']\n"
        "    try:\n"
        "        loaded = client.load_table(parent['experiment_id'], 'points.json', run_ids=[parent['run_id']])\n"
        "        tables.append(loaded.assign(study=study))\n"
        "    except Exception as err:  # a sweep still running, or one from before the table existed\n"
        "        print(f'sweep {study}: no points table yet ({type(err).__name__})')\n"
        "points = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()\n"
        "print(f'{len(points)} grid points from {len(tables)} sweep(s)')\n"
        "from lightning_mim.orchestration.summary import estimates_from_row, format_estimate\n"
        "for _, row in points.iterrows():  # the console table's strings: mean ± half-width of the 95 % interval\n"
        "    shown = [f'{name} {format_estimate(est)}' for name, est in estimates_from_row(row.to_dict()).items()]\n"
        "    print(f\"{row['point']} (n={row['n_seeds']}):\", '; '.join(shown))\n"
        "points"
    ),
    new_markdown_cell("## FID and CAS against decoding steps, per schedule (MaskGIT Fig. 8)"),
    new_code_cell(
        "def metric_vs_steps(metric, label, ax):\n"
        "    data = table.dropna(subset=[metric, 'steps'])\n"
        "    for schedule, group in data.groupby('schedule'):\n"
        "        stats = group.groupby('steps')[metric].agg(['mean', 'std']).reset_index()\n"
        "        ax.errorbar(stats['steps'], stats['mean'], yerr=stats['std'].fillna(0), marker='o', capsize=3, label=schedule)\n"
        "    ax.set_xlabel('decoding steps T'); ax.set_ylabel(label); ax.legend()\n"
        "\n"
        "fig, axes = plt.subplots(1, 2, figsize=(10, 4))\n"
        "metric_vs_steps('fid_domain', 'FID (domain features) ↓', axes[0])\n"
        "metric_vs_steps('cas', 'CAS ↑', axes[1])\n"
        "fig.tight_layout(); fig.savefig(FIGURES / 'steps_per_schedule.png', dpi=120)"
    ),
    new_markdown_cell("## The metric per schedule, with error bars over seeds"),
    new_code_cell(
        "def metric_per(axis, metric, label, ax):\n"
        "    data = table.dropna(subset=[metric, axis])\n"
        "    stats = data.groupby(axis)[metric].agg(['mean', 'std', 'count']).sort_values('mean')\n"
        "    ax.bar(stats.index.astype(str), stats['mean'], yerr=stats['std'].fillna(0), capsize=4)\n"
        "    ax.set_ylabel(label); ax.set_xlabel(axis)\n"
        "    return stats\n"
        "\n"
        "fig, axes = plt.subplots(1, 2, figsize=(10, 4))\n"
        "display_stats = metric_per('schedule', 'fid_domain', 'FID (domain) ↓', axes[0])\n"
        "metric_per('schedule', 'val_loss', 'val loss ↓', axes[1])\n"
        "fig.tight_layout(); fig.savefig(FIGURES / 'metric_per_schedule.png', dpi=120)\n"
        "display_stats"
    ),
    new_markdown_cell("## Linear probe and FID per masking-ratio distribution (MAGE)"),
    new_code_cell(
        "fig, axes = plt.subplots(1, 2, figsize=(10, 4))\n"
        "if table['ratio'].notna().any():\n"
        "    metric_per('ratio', 'probe_top1', 'linear probe top-1 ↑', axes[0])\n"
        "    metric_per('ratio', 'fid_domain', 'FID (domain) ↓', axes[1])\n"
        "fig.tight_layout(); fig.savefig(FIGURES / 'metric_per_ratio.png', dpi=120)"
    ),
    new_markdown_cell("## The schedules γ(r)"),
    new_code_cell(
        "import torch\n"
        "from lightning_mim.masking import SCHEDULE_NAMES, gamma\n\n"
        "r = torch.linspace(0, 1 - 1e-6, 200)\n"
        "fig, ax = plt.subplots(figsize=(5, 4))\n"
        "for name in SCHEDULE_NAMES:\n"
        "    ax.plot(r, gamma(name, r, n_tokens=256), label=name)\n"
        "ax.set_xlabel('r'); ax.set_ylabel('mask ratio γ(r)'); ax.legend(fontsize=8)\n"
        "fig.tight_layout(); fig.savefig(FIGURES / 'schedules.png', dpi=120)"
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
