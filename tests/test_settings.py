"""The library's typed settings are the one definition of each rule: the library parts and the config
check refuse the same value with the same line, and checking a config loads no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lightning_mim import settings
from lightning_mim.decoding import decode
from lightning_mim.masking import FixedRatio, UniformRatio, canonical_schedule_name
from lightning_mim.optim import OPTIMIZERS, build_optimizer
from lightning_mim.orchestration import schema
from lightning_mim.orchestration.config import compose
from lightning_mim.orchestration.schema import config_problems, format_problem


def test_the_schema_is_made_of_the_library_settings():
    fields = schema.Root.model_fields
    assert fields["decode"].annotation == settings.DecodeSettings | None
    assert fields["transformer"].annotation == settings.TransformerSettings | None
    assert fields["ratio"].annotation == settings.RatioSettings | None
    assert fields["evaluation"].annotation == settings.EvaluationSettings | None
    assert fields["trainer"].annotation is settings.TrainerSettings
    assert schema.Model.model_fields["optim"].annotation is settings.OptimSettings
    assert tuple(OPTIMIZERS) == settings.OPTIMIZER_NAMES


def _config_line(override: str) -> str:
    (problem,) = config_problems(compose([override]))
    return format_problem(problem)


@pytest.mark.parametrize(
    "override, library_call",
    [
        ("decode.steps=0", lambda: decode(lambda t: torch.zeros(1, 4, 8), torch.full((1, 4), 8), mask_id=8, steps=0)),
        ("decode.temperature=-1.0", lambda: decode(lambda t: torch.zeros(1, 4, 8), torch.full((1, 4), 8), mask_id=8, steps=2,
                                                   temperature=-1.0)),
        ("decode.guidance_ramp=cubic", lambda: settings.DecodeSettings.from_mapping(
            dict(steps=2, schedule="cosine", choice_temperature=1.0, temperature=1.0, guidance_scale=0.0, guidance_ramp="cubic"))),
        ("model.optim.name=sgd", lambda: build_optimizer(torch.nn.Linear(2, 2), name="sgd")),
        ("transformer.width=130", lambda: settings.validated(settings.TransformerSettings,
                                                             dict(width=130, depth=1, heads=4, mlp_dim=8), "transformer")),
    ],
)
def test_library_and_config_check_refuse_a_value_with_the_same_rule(override, library_call):
    config_line = _config_line(override)
    with pytest.raises(ValueError) as library:
        library_call()
    key, _, value = override.partition("=")
    what = config_line.split(": ", 1)[1]
    library_line = str(library.value)
    assert library_line.split("=", 1)[0].endswith(key.split(".", 1)[-1] if key.startswith("model.") else key), library_line
    assert library_line.endswith(what), (library_line, config_line)


def test_ratio_rules_hold_in_the_library_and_the_config():
    with pytest.raises(ValueError, match=r"^ratio.low=0.9: must be <= ratio.high=0.1$"):
        UniformRatio(0.9, 0.1)
    with pytest.raises(ValueError, match=r"^ratio.value=2.0: must be <= 1.0$"):
        FixedRatio(2.0)
    lines = [format_problem(p) for p in config_problems(compose(["experiment=digits_mage", "ratio=uniform", "ratio.low=0.9",
                                                                  "ratio.high=0.1"]))]
    assert lines == ["ratio.low=0.9: must be <= ratio.high=0.1"]


@pytest.mark.parametrize("value", [True, "8", 8.0])
def test_strict_types(value):
    with pytest.raises(settings.SettingsError, match="decode.steps=.*: must be an integer"):
        settings.validated(settings.DecodeSettings, dict(steps=value, schedule="cosine", choice_temperature=1, temperature=1,
                                                         guidance_scale=0, guidance_ramp="constant"), "decode")


def test_schedule_names_torch_free_match_the_paper_names():
    assert canonical_schedule_name("uniform") == "linear"
    assert settings.canonical_schedule_name("pow2.0") == "square"
    assert settings.canonical_schedule_name("pow1.50") == "pow1.5"
    with pytest.raises(ValueError, match="exponent"):
        settings.canonical_schedule_name("pow0")


def test_checking_a_config_loads_no_torch():
    code = (
        "import sys\n"
        "from lightning_mim.orchestration import train\n"
        "from lightning_mim.orchestration.config import compose\n"
        "from lightning_mim.orchestration.schema import config_problems\n"
        "assert config_problems(compose(['decode.steps=0']))\n"
        "assert train.main(['model.optim.name=nope']) == 2\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
