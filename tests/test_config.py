"""Config composition: defaults, overrides and one-line errors for unknown choices."""

import subprocess
import sys

import pytest

from lightning_mim.orchestration.config import ConfigError, compose, flatten, group_options, section_hash


def test_default_config_is_digits_maskgit():
    cfg = compose([])
    assert cfg.choices["experiment"] == "digits_maskgit"
    assert cfg.choices["data"] == "digits"
    assert cfg.model._target_.endswith("MaskGITModule")
    assert cfg.schedule.name == "cosine"
    assert cfg.decode.steps == 8


def test_schedule_group_accepts_paper_and_official_names():
    options = group_options("schedule")
    for name in ["cosine", "linear", "square", "cubic", "sqrt", "log", "exp", "uniform", "pow2", "pow3", "pow0.5"]:
        assert name in options
    assert compose(["schedule=pow0.5"]).schedule.name == "pow0.5"
    # the schedule feeds both the training ratio sampler and decoding
    cfg = compose(["schedule=sqrt"])
    assert cfg.model.ratio.schedule == "sqrt"
    assert cfg.model.decode.schedule == "sqrt"


def test_unknown_choice_lists_valid_options_in_one_line():
    with pytest.raises(ConfigError) as err:
        compose(["schedule=cosin"])
    message = str(err.value)
    assert "\n" not in message
    assert "cosin" in message and "cosine" in message and "sqrt" in message


def test_cli_unknown_option_exits_nonzero_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_mim.train", "schedule=cosin"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "valid:" in lines[0]


def test_cli_help_lists_groups():
    proc = subprocess.run([sys.executable, "-m", "lightning_mim.train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for group in ("schedule", "ratio", "decode", "trainer", "logger", "experiment"):
        assert group in proc.stdout


def test_bad_key_is_a_config_error():
    with pytest.raises(ConfigError):
        compose(["decode.no_such_key=3"])


def test_flatten_and_hash_are_stable():
    cfg = compose(["decode.steps=12"])
    flat = flatten(cfg)
    assert flat["decode.steps"] == 12 and flat["schedule.name"] == "cosine"
    assert section_hash(cfg.model) == section_hash(compose(["decode.steps=12"]).model)
    assert section_hash(cfg.model) != section_hash(compose(["decode.steps=4"]).model)
