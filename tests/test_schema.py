"""The config schema: a bad value is one line naming key, value and what is allowed, exit 2, before any work."""

from __future__ import annotations

import pytest

from lightning_mim.orchestration import sweep as sweep_cli
from lightning_mim.orchestration import train as train_cli
from lightning_mim.orchestration.config import ConfigError, compose
from lightning_mim.orchestration.schema import check_config, config_problems
from conftest import run_module

# (override(s), the key the one error line must name, words of what is allowed)
MALFORMED = [
    (["decode.steps=abc"], "decode.steps=abc", "must be an integer"),
    (["decode.steps=-3"], "decode.steps=-3", "must be >= 1"),
    (["decode.steps=2.5"], "decode.steps=2.5", "must be an integer"),
    (["decode.choice_temperature=-1"], "decode.choice_temperature=-1", "must be >= 0"),
    (["decode.temperature=-1"], "decode.temperature=-1", "must be >= 0"),
    (["decode.guidance_ramp=cubic"], "decode.guidance_ramp=cubic", "must be one of constant, linear"),
    (["model.optim.lr=-1"], "model.optim.lr=-1", "must be > 0"),
    (["model.optim.lr="], "model.optim.lr=''", "must be a number"),
    (["model.optim.weight_decay=-0.1"], "model.optim.weight_decay=-0.1", "must be >= 0"),
    (["model.label_smoothing=1.0"], "model.label_smoothing=1.0", "must be < 1"),
    (["model.masking=random"], "model.masking=random", "'exact' or 'bernoulli'"),
    (["data.batch_size=0"], "data.batch_size=0", "must be >= 1"),
    (["data.num_workers=-1"], "data.num_workers=-1", "must be >= 0"),
    (["transformer.dropout=1.5"], "transformer.dropout=1.5", "must be <= 1"),
    (["transformer.width=100", "transformer.heads=3"], "transformer.width=100", "divisible by transformer.heads=3"),
    (["data.resolution=30"], "data.image_size=30", "multiple of the tokenizer's downsampling 4"),
    (["schedule.name=powx"], "schedule.name=powx", "powX"),
    (["trainer.max_steps=0"], "trainer.max_steps=0", "-1 (no step limit) or >= 1"),
    (["evaluation.num_samples=0"], "evaluation.num_samples=0", "must be >= 1"),
    (["evaluation.extractor=[inception]"], "evaluation.inception_weights=None", "InceptionV3 weights file"),
    (["evaluation.extractor=[inception]", "evaluation.inception_weights=/nowhere/w.pth"],
     "evaluation.inception_weights=/nowhere/w.pth", "must be an existing file"),
    (["tokenizer.ckpt=/nowhere/tok.ckpt"], "tokenizer.ckpt=/nowhere/tok.ckpt", "existing checkpoint file"),
    (["ckpt_path=/nowhere/last.ckpt"], "ckpt_path=/nowhere/last.ckpt", "existing checkpoint file (or 'last')"),
    (["data=imagefolder", "data.root=/nowhere/images", "data.num_classes=3"], "data.root=/nowhere/images", "existing image folder"),
    (["experiment=digits_mage", "ratio.mean=1.5"], "ratio.mean=1.5", "must be <= 1"),
    (["seed=-1"], "seed=-1", "must be >= 0"),
    # strict types, finite numbers, names the library owns, settings that must agree
    (["decode.steps=true"], "decode.steps=True", "must be an integer"),
    (["decode.steps='8'"], "decode.steps=8", "must be an integer"),
    (["model.optim.lr=inf"], "model.optim.lr=inf", "must be a finite number"),
    (["model.optim.lr=nan"], "model.optim.lr=nan", "must be a finite number"),
    (["model.optim.name=nope"], "model.optim.name=nope", "must be one of adam, adamw"),
    (["model.optim.schedule=nope"], "model.optim.schedule=nope", "must be one of constant, cosine"),
    (["experiment=digits_mage", "ratio=uniform", "ratio.low=0.9", "ratio.high=0.1"], "ratio.low=0.9", "must be <= ratio.high=0.1"),
    (["trainer.precision=abc"], "trainer.precision=abc", "must be one of"),
    (["trainer.devices=0"], "trainer.devices=0", "must be >= 1, -1 (all), 'auto'"),
    (["evaluation.split=nope"], "evaluation.split=nope", "must be one of train, val, test"),
]


@pytest.mark.parametrize("overrides, key, allowed", MALFORMED, ids=[" ".join(m[0]) for m in MALFORMED])
def test_train_rejects_a_bad_value_in_one_line_before_any_work(overrides, key, allowed, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIGHTNING_MIM_HOME", str(tmp_path / "home"))
    assert train_cli.main(overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {key}: ") and allowed in err[0], err[0]
    assert not (tmp_path / "home").exists()  # nothing was written: no data, no tokenizer, no MLflow store


def test_unknown_keys_and_choices_are_one_line_too(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIGHTNING_MIM_HOME", str(tmp_path / "home"))
    for overrides, words in ((["foo.bar=1"], "foo"), (["schedule=cosin"], "unknown schedule 'cosin'"),
                             (["ratio=gauss"], "unknown ratio 'gauss'"), (["experiment=nope"], "unknown experiment")):
        assert train_cli.main(overrides) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_every_preset_and_pow_schedules_pass():
    for experiment in ("digits_maskgit", "digits_mage", "digits_mage_c", "digits_tokenizer", "digits_mage_finetune"):
        assert config_problems(compose([f"experiment={experiment}"])) == [], experiment
    cfg = compose(["schedule=pow1.5"])  # any exponent masking accepts, not only the group's files
    check_config(cfg)
    assert cfg.ratio.schedule == cfg.decode.schedule == "pow1.5"
    with pytest.raises(ConfigError, match=r"unknown schedule 'powx'.*powX"):
        compose(["schedule=powx"])


def test_several_problems_are_one_line_each():
    with pytest.raises(ConfigError) as err:
        check_config(compose(["decode.steps=0", "data.batch_size=0"]))
    assert sorted(str(err.value).splitlines()) == ["data.batch_size=0: must be >= 1", "decode.steps=0: must be >= 1"]


def test_sweep_with_one_bad_grid_point_starts_no_trial(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("LIGHTNING_MIM_HOME", str(home))
    assert sweep_cli.main(["transformer.heads=4,2,3"]) == 2  # the third point alone is invalid (128 % 3)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: grid point transformer.heads=3: transformer.width=128: must be divisible by transformer.heads=3"]
    assert not home.exists()  # no study, no MLflow store, no trial


def test_sweep_checks_both_bounds_of_a_search_space(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIGHTNING_MIM_HOME", str(tmp_path / "home"))
    assert sweep_cli.main(["model.optim.lr=interval(-1,0.1)", "sweep.n_trials=3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: model.optim.lr=-1.0: must be > 0.0"]
    assert sweep_cli.main(["decode.steps=range(0,4)", "sweep.n_trials=3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: decode.steps=0: must be >= 1"]


def test_the_real_command_exits_2_with_one_line(tmp_path):
    proc = run_module("lightning_mim.train", ["decode.steps=-3"], tmp_path / "home", check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: decode.steps=-3: must be >= 1"
    assert not (tmp_path / "home").exists()


def test_the_precisions_the_check_allows_are_lightnings_own():
    from typing import get_args

    from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    from lightning_mim.orchestration.schema import PRECISIONS

    assert set(PRECISIONS) == {*get_args(_PRECISION_INPUT_STR), *get_args(_PRECISION_INPUT_STR_ALIAS)}
