"""Sweep specs from Hydra override syntax: grids, search spaces, named studies."""

import re

import optuna
import pytest

from lightning_mim.orchestration.config import ConfigError
from lightning_mim.orchestration.sweep_spec import parse


def test_grid_is_cartesian_product():
    spec = parse(["schedule=cosine,linear,sqrt", "decode.steps=4,8", "trainer.max_steps=10"])
    assert spec.is_grid
    points = spec.grid_points()
    assert len(points) == 6
    assert {p["schedule"] for p in points} == {"cosine", "linear", "sqrt"}
    assert {p["decode.steps"] for p in points} == {"4", "8"}
    assert spec.fixed == ["trainer.max_steps=10"]
    assert len({tuple(sorted(p.items())) for p in points}) == 6


def test_seeds_add_a_grid_axis():
    spec = parse(["schedule=cosine,linear", "sweep.seeds=3"])
    assert len(spec.grid_points()) == 6
    assert {p["seed"] for p in spec.grid_points()} == {"0", "1", "2"}


def test_seeds_default_to_the_presets_sweep_seeds():
    from lightning_mim.orchestration.config import compose

    assert compose([]).sweep_seeds == 3  # digits_maskgit (the default experiment)
    assert compose(["experiment=digits_mage_c"]).sweep_seeds == 3
    for preset in ("imagenet256_maskgit", "imagenet256_mage_b"):
        assert compose([f"experiment={preset}"]).sweep_seeds == 1  # no silent tripling of GPU-weeks
    grid = parse(["schedule=cosine,linear"])
    grid.resolve_seeds(3)
    assert grid.seeds == 3 and len(grid.grid_points()) == 6
    explicit = parse(["schedule=cosine,linear", "sweep.seeds=2"])
    explicit.resolve_seeds(3)
    assert explicit.seeds == 2
    own_axis = parse(["schedule=cosine,linear", "seed=0,1"])
    own_axis.resolve_seeds(3)
    assert own_axis.seeds == 1 and len(own_axis.grid_points()) == 4  # the user's seed axis, not ours on top
    search = parse(["model.optim.lr=interval(1e-4,1e-2)", "sweep.n_trials=4"])
    search.resolve_seeds(3)
    assert search.seeds == 1
    with pytest.raises(ConfigError, match="seed override both"):
        parse(["schedule=cosine", "seed=0,1", "sweep.seeds=3"]).resolve_seeds(3)
    with pytest.raises(ConfigError, match="sweep.seeds must be >= 1"):
        parse(["sweep.seeds=0"])
    with pytest.raises(ConfigError, match="expected an integer"):
        parse(["sweep.seeds=abc"])


def test_seeds_change_init_masks_data_order_and_samples_but_not_split_or_tokenizer(tmp_path):
    """Two seeds of one point: different weights, masks, batch order and evaluation seed; the same
    val split and the same tokenizer stage (one cache key)."""
    import lightning.pytorch as pl
    import torch
    from hydra.utils import instantiate

    from lightning_mim.orchestration.config import compose
    from lightning_mim.orchestration.stages import stage_key, tokenizer_run_config

    tiny = ["transformer.width=32", "transformer.depth=1", "transformer.heads=2", "transformer.mlp_dim=64",
            f"paths.home={tmp_path}"]
    cfgs = [compose([*tiny, f"seed={seed}"]) for seed in (0, 1)]
    assert stage_key(tokenizer_run_config(cfgs[0])) == stage_key(tokenizer_run_config(cfgs[1]))  # one tokenizer
    assert stage_key(cfgs[0]) != stage_key(cfgs[1])  # each seed trains its own stage-2 model
    assert cfgs[0].evaluation.seed == 0 and cfgs[1].evaluation.seed == 1  # new samples for the metrics
    weights, ratios, first_batches, val_sets = [], [], [], []
    for cfg in cfgs:
        pl.seed_everything(int(cfg.seed), verbose=False)
        module = instantiate(cfg.model, _recursive_=False, _convert_="all")
        weights.append(torch.cat([p.flatten() for p in module.transformer.parameters()]))
        ratios.append(module.ratio_sampler(16, None, "cpu"))
        data = instantiate(cfg.data, _convert_="all")
        data.prepare_data()
        data.setup("fit")
        first_batches.append(next(iter(data.train_dataloader()))[1])
        val_sets.append(torch.cat([images.flatten(1) for images, _ in data.val_dataloader()]))
    assert not torch.equal(weights[0], weights[1])
    assert not torch.equal(ratios[0], ratios[1])
    assert not torch.equal(first_batches[0], first_batches[1])  # data order
    assert torch.equal(val_sets[0], val_sets[1])  # the split


def test_search_spaces_map_to_optuna_distributions():
    spec = parse(["model.optim.lr=tag(log,interval(1e-4,1e-2))", "decode.steps=range(4,13,4)",
                  "schedule=choice(cosine,sqrt)", "sweep.n_trials=5"])
    assert not spec.is_grid
    lr = spec.search["model.optim.lr"]
    assert isinstance(lr, optuna.distributions.FloatDistribution) and lr.log and lr.low == 1e-4
    steps = spec.search["decode.steps"]
    assert isinstance(steps, optuna.distributions.IntDistribution) and (steps.low, steps.high, steps.step) == (4, 12, 4)
    assert spec.search["schedule"].choices == ("cosine", "sqrt")
    assert spec.total_trials() == 5


def test_search_space_without_budget_is_an_error():
    with pytest.raises(ConfigError):
        parse(["model.optim.lr=interval(1e-4,1e-2)"]).total_trials()


def test_study_name_is_stable_and_spec_dependent():
    a = parse(["schedule=cosine,linear"]).study_name()
    assert a == parse(["schedule=cosine,linear"]).study_name()
    assert a != parse(["schedule=cosine,sqrt"]).study_name()


def test_named_sweep_and_inference_only_axes():
    spec = parse(["sweep=steps"])
    assert spec.grid["decode.steps"] == ["4", "6", "8", "10", "12", "16", "20", "32"]
    assert spec.is_inference_only("decode.steps")
    assert not spec.is_inference_only("schedule")
    assert "experiment=digits_maskgit" in spec.fixed


def test_unknown_named_sweep_and_option():
    with pytest.raises(ConfigError, match="valid: .*schedules"):
        parse(["sweep=nope"])
    with pytest.raises(ConfigError, match="unknown sweep option"):
        parse(["sweep.bogus=1"])


def test_pruner_option_defaults_by_sweep_kind_and_rejects_unknown_names():
    assert parse(["schedule=cosine,linear"]).effective_pruner() == "none"  # a grid ablation keeps every point
    assert parse(["model.optim.lr=interval(1e-4,1e-2)", "sweep.n_trials=4"]).effective_pruner() == "median"
    assert parse(["schedule=cosine,linear", "sweep.pruner=hyperband"]).effective_pruner() == "hyperband"
    with pytest.raises(ConfigError, match="unknown sweep.pruner 'medain'; valid: auto, none, median"):
        parse(["schedule=cosine", "sweep.pruner=medain"])


def test_pruning_callback_comes_from_the_trial_environment(monkeypatch):
    from lightning_mim.orchestration.protocol import TRIAL_ENV, TrialContext
    from lightning_mim.orchestration.pruning import build_pruner
    from lightning_mim.orchestration.pruning_callback import OptunaPruning, from_env

    def trial_env(storage, study, trial_id, monitor, pruner):
        target = dict(storage=storage, study=study, trial_id=trial_id, monitor=monitor, pruner=pruner)
        return TrialContext(pruning=target).environment()

    monkeypatch.delenv(TRIAL_ENV, raising=False)
    assert from_env() is None  # outside a sweep
    monkeypatch.setenv(TRIAL_ENV, trial_env("sqlite:///x.db", "s", 3, "val/fid_domain", "none")[TRIAL_ENV])
    assert from_env() is None  # pruner none: no reporting at all
    monkeypatch.setenv(TRIAL_ENV, trial_env("sqlite:///x.db", "s", 3, "val/fid_domain", "median")[TRIAL_ENV])
    callback = from_env()
    assert isinstance(callback, OptunaPruning) and callback.trial_id == 3 and callback.monitor == "val/fid_domain"
    assert isinstance(callback.pruner, optuna.pruners.MedianPruner)
    with pytest.raises(ValueError, match="unknown pruner 'x'"):
        build_pruner("x")


def test_verdict_options_are_read_but_do_not_name_a_new_study():
    plain = parse(["schedule=cosine,linear"])
    spec = parse(["schedule=cosine,linear", "sweep.alpha=0.1", "sweep.equivalence=0.5", "sweep.effect=1"])
    assert (spec.alpha, spec.equivalence, spec.effect) == (0.1, 0.5, 1.0)
    assert spec.study_name() == plain.study_name()  # the same trials, read with another margin
    for bad, words in (("sweep.alpha=1.5", "sweep.alpha=1.5: must be in (0, 1)"),
                       ("sweep.equivalence=-1", "sweep.equivalence=-1.0: must be a number > 0"),
                       ("sweep.effect=abc", "sweep.effect='abc': expected a number")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            parse(["schedule=cosine,linear", bad])


def test_replicates_are_arms_of_their_own_on_disjoint_seeds():
    spec = parse(["schedule=cosine", "sweep.seeds=3", "sweep.replicates=2"])
    spec.resolve_seeds(3)
    points = spec.grid_points()
    assert len(points) == 6 and {p["replicate"] for p in points} == {"0", "1"}
    trained = {r: sorted(int(spec.trained_seed(p)) for p in points if p["replicate"] == r) for r in ("0", "1")}
    assert trained == {"0": [0, 1, 2], "1": [3, 4, 5]}
    overrides = spec.trial_overrides({"seed": "1", "replicate": "1"})
    assert overrides == ["schedule=cosine", "seed=4"]  # a replicate is no config key: it moves the seed
    for args in (["schedule=cosine", "sweep.seeds=1", "sweep.replicates=2"], ["seed=0,1", "sweep.replicates=2"]):
        bad = parse(args)
        with pytest.raises(ConfigError, match="sweep.replicates=2: needs a grid, sweep.seeds >= 2"):
            bad.resolve_seeds(3)


def test_repeats_train_each_configuration_with_seeds_and_confirm_on_fresh_ones():
    spec = parse(["model.optim.lr=interval(1e-4,1e-3)", "schedule=cosine,linear", "sweep.n_trials=4", "sweep.repeats=3"])
    spec.resolve_seeds(3)
    assert spec.seeds == 1 and spec.repeat_seeds() == ["0", "1", "2"]
    assert spec.effective_pruner() == "none"  # N trainings per trial: no single curve to prune on
    confirm = spec.confirmation_spec({"model.optim.lr": 0.00042, "schedule": "linear"})
    assert confirm.is_grid and confirm.grid == {"model.optim.lr": ["0.00042"], "schedule": ["linear"]}
    assert [p["seed"] for p in confirm.grid_points()] == ["3", "4", "5"]  # seeds the search never saw
    assert confirm.trial_overrides(confirm.grid_points()[0]) == ["model.optim.lr=0.00042", "schedule=linear", "seed=3"]
    assert confirm.repeat_seeds() == [] and confirm.name == "adhoc-confirm"
    assert confirm.study_name() != spec.study_name()
    # the study's name changes with repeats, and names without them stay as they were
    plain = parse(["model.optim.lr=interval(1e-4,1e-3)", "schedule=cosine,linear", "sweep.n_trials=4"])
    two = parse(["model.optim.lr=interval(1e-4,1e-3)", "schedule=cosine,linear", "sweep.n_trials=4", "sweep.repeats=2"])
    assert len({plain.study_name(), spec.study_name(), two.study_name()}) == 3
    default = parse(["schedule=cosine,linear,sqrt"])
    default.resolve_seeds(3)
    assert default.study_name() == "adhoc-28c720ca47"  # the default sweep's study, as the homes of docs/RESULTS.md hold it


@pytest.mark.parametrize("args", [
    ["schedule=cosine,linear", "sweep.repeats=2"],  # a grid: sweep.seeds is its way
    ["model.optim.lr=interval(1e-4,1e-3)", "sweep.n_trials=2", "sweep.repeats=2", "sweep.seeds=2"],
    ["model.optim.lr=interval(1e-4,1e-3)", "sweep.n_trials=2", "sweep.repeats=2", "seed=4"],
    ["model.optim.lr=interval(1e-4,1e-3)", "sweep.n_trials=2", "sweep.repeats=2", "sweep.pruner=median"],
])
def test_repeats_are_refused_where_they_mean_nothing(args):
    spec = parse(args)
    with pytest.raises(ConfigError, match=r"sweep.repeats=2: needs a search space .*, no seed override, no sweep.seeds > 1 and no pruner"):
        spec.resolve_seeds(3)


def test_repeats_must_be_a_positive_integer():
    with pytest.raises(ConfigError, match="sweep.repeats must be >= 1, got 0"):
        parse(["model.optim.lr=interval(1e-4,1e-3)", "sweep.repeats=0"])


def test_seeds_auto_fixes_its_design_before_the_first_trial():
    spec = parse(["schedule=cosine,linear,sqrt", "sweep.seeds=auto", "sweep.equivalence=0.5"])
    spec.resolve_seeds(3)
    design = spec.design()
    assert (design.first_round, design.round_size, design.max_seeds, design.looks) == (5, 5, 15, (5, 10, 15))
    assert (design.alpha, design.equivalence, design.spending) == (0.05, 0.5, "obrien_fleming")
    assert spec.seeds == 15 and len(spec.grid_points()) == 45  # the seed axis spans what a point may get
    assert [p["schedule"] for p in spec.axis_points()] == ["cosine", "linear", "sqrt"]
    # the rounds, α and margin decide which trials run: another design is another study; the same, the same
    names = set()
    for extra in ([], ["sweep.alpha=0.1"], ["sweep.equivalence=1"], ["sweep.max_seeds=20"], ["sweep.spending=pocock"]):
        other = parse(["schedule=cosine,linear,sqrt", "sweep.seeds=auto", "sweep.equivalence=0.5", *extra])
        other.resolve_seeds(3)
        names.add(other.study_name())
    assert len(names) == 5 and spec.study_name() in names
    fixed = parse(["schedule=cosine,linear,sqrt", "sweep.seeds=15"])
    fixed.resolve_seeds(3)
    assert fixed.study_name() not in names and fixed.design() is None


@pytest.mark.parametrize("args, message", [
    (["model.optim.lr=interval(1e-4,1e-3)", "sweep.n_trials=2", "sweep.seeds=auto"], "sweep.seeds=auto: needs a grid of 2 or more points"),
    (["schedule=cosine", "sweep.seeds=auto"], "sweep.seeds=auto: needs a grid of 2 or more points"),
    (["schedule=cosine,linear", "seed=3", "sweep.seeds=auto"], "no seed override"),
    (["schedule=cosine,linear", "sweep.seeds=auto", "sweep.replicates=2"], "no sweep.replicates"),
    (["schedule=cosine,linear", "sweep.first_round=4"], "sweep.first_round, sweep.round_size and sweep.max_seeds: only with sweep.seeds=auto"),
    (["schedule=cosine,linear", "sweep.seeds=auto", "sweep.first_round=8", "sweep.max_seeds=6"], "sweep.seeds=auto: max_seeds must be"),
    (["schedule=cosine,linear", "sweep.seeds=auto", "sweep.first_round=1"], "sweep.seeds=auto: first_round must be"),
])
def test_seeds_auto_refuses_what_it_cannot_run(args, message):
    spec = parse(args)
    with pytest.raises(ConfigError, match=re.escape(message)):
        spec.resolve_seeds(3)


def test_seeds_auto_options_are_checked_when_parsed():
    with pytest.raises(ConfigError, match="unknown sweep.spending 'linear'; valid: obrien_fleming, pocock"):
        parse(["schedule=cosine,linear", "sweep.seeds=auto", "sweep.spending=linear"])
    with pytest.raises(ConfigError, match=re.escape("sweep.seeds='some': expected an integer or auto")):
        parse(["sweep.seeds=some"])
    with pytest.raises(ConfigError, match="sweep.round_size must be >= 1, got 0"):
        parse(["schedule=cosine,linear", "sweep.seeds=auto", "sweep.round_size=0"])
    assert parse(["sweep.seeds=auto", "sweep.seeds=3"]).adaptive is False  # the last word counts
