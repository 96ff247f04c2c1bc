"""Building run configs from `conf/` with Hydra's compose API.

We compose configs ourselves instead of using `@hydra.main` because the sweep builds one config
per trial in-process, and because a typo should produce one clear line ("unknown schedule 'cosin';
valid: ...") rather than Hydra's multi-line report with a stack trace.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterable, NoReturn, Sequence

from omegaconf import DictConfig, OmegaConf

ROOT_CONFIG = "train"
DEFAULT_HOME = "lmim"  # the home without $LIGHTNING_MIM_HOME (conf/train.yaml: paths.home), relative to where it runs
# Top-level config keys that say where and how a run is recorded, not what it computes: not logged as
# MLflow params (`choices.*`, which option of each group, is) ...
BOOKKEEPING_KEYS = (
    "paths", "run_name", "experiment_name", "ckpt_path", "logger", "overrides", "sweep_seeds", "sweep_jobs", "aliases"
)
# ... and, with the group choices (already expanded into the config) and the callbacks (what is
# measured, not what is trained), not part of a stage's cache key either.
NON_SEMANTIC_KEYS = (*BOOKKEEPING_KEYS, "choices", "callbacks")


def config_dir() -> Path:
    """The `conf/` directory (env LIGHTNING_MIM_CONF overrides; default: beside the package)."""
    env = os.environ.get("LIGHTNING_MIM_CONF")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / f"{ROOT_CONFIG}.yaml").is_file():
        raise FileNotFoundError(
            f"config directory {path} has no {ROOT_CONFIG}.yaml; install the project editable "
            "(`pip install -e .`) from its repository or set LIGHTNING_MIM_CONF"
        )
    return path


def sweeps_dir() -> Path:
    """The `sweeps/` directory of named ablation studies."""
    return config_dir().parent / "sweeps"


class ConfigError(ValueError):
    """A config problem explained in one line per problem (unknown option, bad override, bad value)."""


def report_config_error(err: Exception) -> int:
    """Print `err` as `error: ...` lines on stderr; the exit status of a config error (2)."""
    for line in str(err).splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)
    return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the commands with flags (`tokenize`, `data.prepare`): a bad argument is one
    `error: ...` line and exit status 2, like every other refusal (argparse prints its usage too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(report_config_error(ConfigError(f"{message} (see {self.prog} --help)")))


def checkpoint_file(key: str, value: Any) -> Path:
    """The checkpoint file `value` of option `key`, or ConfigError when it is missing or no PyTorch
    checkpoint (what `torch.save` writes is a zip archive; an empty or cut file is not one)."""
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{key}={path}: not a checkpoint (no PyTorch zip archive: the file is damaged or of another kind)")
    return path


def usage_status(argv: list[str], usage: str | None) -> int | None:
    """For commands whose arguments are all required `key=value` pairs (`evaluate`, `edit`): with
    `-h`/`--help`, print `usage` and return 0; with no arguments, print it and return 2 (nothing to
    do); otherwise None: go on."""
    if argv and not any(a in ("-h", "--help") for a in argv):
        return None
    print(usage or "")
    return 0 if argv else 2


def group_options(group: str) -> list[str]:
    """Option names of a config group (`schedule` -> ['arccos', 'cosine', ...])."""
    folder = config_dir() / group
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml"))


def config_groups() -> list[str]:
    return sorted(p.name for p in config_dir().iterdir() if p.is_dir())


def _check_group_choices(overrides: Sequence[str]) -> None:
    """Fail early, in one line, on `group=unknown` (Hydra's own message spans many lines)."""
    groups = set(config_groups())
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or key not in groups or value in ("null", ""):
            continue
        valid = group_options(key)
        for choice in value.split(","):
            if choice not in valid:
                extra = " or powX (X > 0, e.g. pow1.5)" if key == "schedule" else ""
                raise ConfigError(f"unknown {key} '{choice}'; valid: {', '.join(valid)}{extra}")


def _pow_schedule_choice(override: str) -> str:
    """`schedule=pow1.5` (any exponent `masking` accepts, not only the group's files) ->
    `schedule.name=pow1.5` on the default schedule group."""
    key, sep, value = override.partition("=")
    if key != "schedule" or not sep or value in group_options("schedule") or not value.startswith("pow"):
        return override
    from lightning_mim.masking import canonical_schedule_name

    try:
        canonical_schedule_name(value)
    except ValueError:
        return override  # left to the group check: "unknown schedule 'powx'; valid: ..."
    return f"schedule.name={value}"


def compose(overrides: Sequence[str] = (), *, with_hydra: bool = False) -> DictConfig:
    """Compose `conf/train.yaml` with Hydra overrides (`schedule=sqrt`, `decode.steps=12`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [_pow_schedule_choice(o) for o in overrides]
    _check_group_choices(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
            cfg = hydra_compose(ROOT_CONFIG, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        message = " ".join(str(err).split())
        raise ConfigError(message) from err
    finally:
        GlobalHydra.instance().clear()
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    OmegaConf.set_struct(cfg, False)
    if not with_hydra:
        del cfg["hydra"]
    cfg["overrides"] = overrides
    cfg["choices"] = {k: v for k, v in choices.items() if not k.startswith("hydra")}
    return cfg


def parse_overrides(lines: Sequence[str]) -> list:
    """Command-line overrides in Hydra's own grammar (`key=value`, `key=a,b`, `key=interval(0,1)`,
    `+key=value`): the one parser of the sweep and the evaluation CLIs. A grammar error is one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(list(lines))
    except Exception as err:  # Hydra's grammar errors are long; keep the first line
        raise ConfigError(str(err).splitlines()[0]) from err


def absolutize_paths(cfg: DictConfig) -> None:
    """Turn `paths.home` into an absolute path so every interpolation below it is absolute."""
    cfg.paths.home = str(Path(cfg.paths.home).expanduser().resolve())


def section_hash(*sections: Any, length: int = 12) -> str:
    """A stable short hash of resolved config sections (the cache key of a trained stage)."""
    plain = [OmegaConf.to_container(s, resolve=True) if isinstance(s, DictConfig) else s for s in sections]
    blob = json.dumps(plain, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """`{'a': {'b': 1}}` -> `{'a.b': 1}` (for MLflow params and sweep tables)."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def without(cfg: DictConfig, keys: Iterable[str]) -> DictConfig:
    """A copy of `cfg` without some top-level keys."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key in keys:
        copy.pop(key, None)
    return copy
