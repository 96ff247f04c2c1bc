"""The sweep report: one figure per swept axis with one series per value of the other axes, the table,
Optuna's plots for search spaces; read from a real Optuna storage of a 2-axis x 2-seed study."""

from __future__ import annotations

import optuna
import pytest
import yaml

from lightning_mim.orchestration import report

GRID = {"decode.steps": ["4", "8", "12"], "schedule": ["cosine", "linear"], "seed": ["0", "1"]}


def _fid(steps: str, schedule: str, seed: str) -> float:
    return 10.0 - 0.3 * int(steps) + (1.0 if schedule == "linear" else 0.0) + 0.1 * int(seed)


@pytest.fixture
def grid_study(tmp_path):
    """A finished 3 x 2 grid with 2 seeds, as a sweep leaves it: spec.yaml + trials in optuna.db."""
    return write_grid_study(tmp_path / "home")


def write_grid_study(home, protocol_of=None):
    """The study of `grid_study`; `protocol_of(number)`: the evaluation protocol trial `number` records."""
    directory = home / "sweeps" / "adhoc-0123456789"
    directory.mkdir(parents=True)
    spec = {"name": "adhoc", "grid": GRID, "search": {}, "fixed": [], "objective": "val/fid_domain",
            "direction": "minimize", "seeds": 2, "storage": None}
    (directory / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    study = optuna.create_study(study_name=directory.name, storage=f"sqlite:///{home}/optuna.db")
    for steps in GRID["decode.steps"]:
        for schedule in GRID["schedule"]:
            for seed in GRID["seed"]:
                fid = _fid(steps, schedule, seed)
                trial = optuna.trial.create_trial(
                    params={"decode.steps": steps, "schedule": schedule, "seed": seed},
                    distributions={k: optuna.distributions.CategoricalDistribution(v) for k, v in GRID.items()},
                    value=fid,
                    user_attrs={"metrics": {"val/fid_domain": fid, "val/cas": 0.5 + 0.01 * int(steps)},
                                **({"evaluation_protocol": protocol_of(len(study.trials))} if protocol_of else {})},
                )
                study.add_trial(trial)
    return home, directory


def test_the_latest_study_is_found_and_summarised(grid_study):
    home, directory = grid_study
    study = report.find_study(home)
    assert study.name == directory.name and study.axes == ["decode.steps", "schedule"]
    points = study.points()
    assert len(points) == 6 and all(len(p.seeds) == 2 for p in points)
    assert points[0].params == {"decode.steps": "12", "schedule": "cosine"}  # the lowest FID
    with pytest.raises(FileNotFoundError, match="no sweep 'nope'"):
        report.find_study(home, "nope")


def test_one_series_per_value_of_the_other_axes(grid_study):
    home, _ = grid_study
    study = report.find_study(home)
    points = study.points()
    by_steps = report.axis_series(study, points, "decode.steps", "val/fid_domain")
    assert list(by_steps) == ["schedule=cosine", "schedule=linear"]
    cosine = by_steps["schedule=cosine"]
    assert [c.value for c in cosine] == ["4", "8", "12"]  # the spec's order, not the string order
    assert cosine[0].by_seed == {"0": _fid("4", "cosine", "0"), "1": _fid("4", "cosine", "1")}  # every seed drawn
    assert cosine[0].estimate.mean == pytest.approx((_fid("4", "cosine", "0") + _fid("4", "cosine", "1")) / 2)
    assert cosine[0].estimate.half_width is not None and cosine[0].estimate.half_width > 0  # two seeds: an interval
    assert {c.verdict for c in cosine} <= {p.verdict for p in points}
    by_schedule = report.axis_series(study, points, "schedule", "val/fid_domain")
    assert list(by_schedule) == ["decode.steps=4", "decode.steps=8", "decode.steps=12"]
    assert [c.value for c in by_schedule["decode.steps=4"]] == ["cosine", "linear"]
    cas = report.axis_series(study, points, "decode.steps", "val/cas")["schedule=cosine"]
    assert cas[0].by_seed == {"0": 0.54, "1": 0.54}  # another metric's seeds too


def test_the_report_draws_one_figure_per_axis_with_its_legend(grid_study):
    home, directory = grid_study
    study = report.find_study(home)
    files = report.write_report(study)
    names = sorted(p.name for p in files)
    assert names == ["axis-decode.steps.png", "axis-schedule.png", "summary.md"]
    for path in files:
        assert path.parent == directory / "report" and path.stat().st_size > 100
    points = study.points()
    steps_figure = report.draw_axis_figure(study, points, "decode.steps", directory / "check.png")
    fid_panel, cas_panel = steps_figure.axes  # the objective, then CAS beside it
    assert [t.get_text() for t in fid_panel.get_legend().get_texts()] == ["schedule=cosine", "schedule=linear"]
    assert fid_panel.get_xlabel() == "decode.steps" and "val/fid_domain" in fid_panel.get_ylabel()
    assert "val/cas" in cas_panel.get_ylabel()
    seed_lines = [line for line in fid_panel.get_lines() if line.get_alpha() == 0.35]
    assert len(seed_lines) == 2 * 2 and all(len(line.get_xdata()) == 3 for line in seed_lines)  # a seed across T
    assert fid_panel.get_ylim()[0] > 0  # not forced to start at zero
    verdicts = {" ".join(t.get_text().split()) for t in fid_panel.texts}  # wrapped: report.verdict_label
    assert verdicts == {p.verdict for p in points}  # every point's verdict written beside it
    schedule_figure = report.draw_axis_figure(study, points, "schedule", directory / "check2.png")
    legend = [t.get_text() for t in schedule_figure.axes[0].get_legend().get_texts()]
    assert legend == ["decode.steps=4", "decode.steps=8", "decode.steps=12"]
    assert [t.get_text() for t in schedule_figure.axes[0].get_xticklabels()] == ["cosine", "linear"]
    title = schedule_figure.texts[0]  # the suptitle, wrapped to the figure's width: nothing clipped
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    extent = title.get_window_extent(FigureCanvasAgg(schedule_figure).get_renderer())  # closed: a canvas again
    assert "\n" in title.get_text() and 0 <= extent.x0 and extent.x1 <= schedule_figure.bbox.width
    table = (directory / "report" / "summary.md").read_text()
    points, comparisons = table.split("## Comparisons")
    assert points.count("\n| ") == 1 + 6 and "| 12 | cosine | 2 |" in points and "best" in points
    assert comparisons.count("\n| ") == 1 + 15 and "Holm" in comparisons  # every pair of the 6 points


def test_search_space_studies_get_optunas_own_plots(tmp_path):
    home = tmp_path / "home"
    directory = home / "sweeps" / "adhoc-search"
    directory.mkdir(parents=True)
    spec = {"name": "adhoc", "grid": {}, "search": {"model.optim.lr": "FloatDistribution(...)"}, "objective": "val/fid_domain",
            "direction": "minimize", "seeds": 1, "storage": None}
    (directory / "spec.yaml").write_text(yaml.safe_dump(spec))
    study = optuna.create_study(study_name=directory.name, storage=f"sqlite:///{home}/optuna.db")
    dists = {"model.optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
             "transformer.depth": optuna.distributions.IntDistribution(1, 4)}
    for i, lr in enumerate((1e-4, 3e-4, 1e-3, 3e-3, 1e-2)):
        study.add_trial(optuna.trial.create_trial(params={"model.optim.lr": lr, "transformer.depth": 1 + i % 4},
                                                  distributions=dists, value=5.0 - i * 0.5 + (i % 2)))
    files = report.write_report(report.find_study(home, directory.name))
    assert sorted(p.name for p in files) == ["history.png", "importances.png", "slice.png", "summary.md"]


def test_the_report_and_the_notebook_refuse_to_pool_two_evaluation_protocols(tmp_path):
    """A trial scored on 1 000 samples among trials scored on 500: the summary names the difference
    in one line; the report writes that line instead of a table, and the notebook's reader raises it."""
    protocol = {"evaluation.num_samples": 500, "evaluation.extractor": ["domain"], "evaluation.split": "val"}
    home, _ = write_grid_study(tmp_path / "home",
                               lambda number: {**protocol, "evaluation.num_samples": 1000 if number == 3 else 500})
    loaded = report.find_study(home)
    with pytest.raises(report.ProtocolMismatch) as refused:
        loaded.points()  # what the notebook reads
    line = str(refused.value)
    assert "\n" not in line and "evaluation.num_samples: 500 vs 1000" in line and "trials 0 and 3" in line
    files = report.write_report(loaded)
    assert [p.name for p in files] == ["summary.md"]
    assert line in files[0].read_text() and "|" not in files[0].read_text()


def test_the_home_read_is_the_nearest_lmim_at_or_above_the_working_directory(tmp_path, monkeypatch):
    from lightning_mim.orchestration.config import DEFAULT_HOME, compose

    monkeypatch.delenv("LIGHTNING_MIM_HOME", raising=False)
    (tmp_path / DEFAULT_HOME).mkdir()
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # where a notebook's kernel runs
    assert report.home_dir() == tmp_path / DEFAULT_HOME
    assert report.home_dir("elsewhere") == tmp_path / "notebooks" / "elsewhere"  # given: as given
    monkeypatch.setenv("LIGHTNING_MIM_HOME", str(tmp_path / "h"))
    assert report.home_dir() == tmp_path / "h"
    monkeypatch.delenv("LIGHTNING_MIM_HOME")
    assert compose([]).paths.home == DEFAULT_HOME  # the name the commands write to, unset
