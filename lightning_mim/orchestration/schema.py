"""The config's schema: types, ranges, cross-field rules and files, checked before any work starts.

`check_config(cfg)` raises `ConfigError` with one line per problem — the key, the value, what is
allowed (`decode.steps=-3: must be >= 1`) — and `train`, `evaluate`, `tokenize` and the sweep (every
grid point, every combination of a search space) call it right after composing, so a bad value costs
a second, not a tokenizer training. Hydra rejects unknown keys and group choices; this checks values.

The sections the library takes are the library's own typed settings (`lightning_mim.settings`:
DecodeSettings, OptimSettings, TransformerSettings, RatioSettings, EvaluationSettings,
TrainerSettings), so each rule is written once, there; this module adds the config's shape around
them (root, model, data), the rules that span sections (image size and the tokenizer's downsampling,
the MAGE encoder's widths) and files that must exist. Torch-free, like the settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lightning_mim.orchestration.config import ConfigError
from lightning_mim.settings import (
    PRECISIONS,
    SCHEDULE_ALIASES,
    SCHEDULE_NAMES,
    DecodeSettings,
    EvaluationSettings,
    OptimSettings,
    Problem,
    RatioSettings,
    TrainerSettings,
    TransformerSettings,
    canonical_schedule_name,
    format_problem,
    probability,
    problems_of,
)
from lightning_mim.tokens import downsample_factor

__all__ = ["PRECISIONS", "Problem", "check_config", "config_problems", "format_problem"]


class _Section(BaseModel):
    # the config's own sections: their unknown keys are Hydra's job (struct mode); strict and finite
    # like the settings
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class Model(_Section):
    optim: OptimSettings
    label_smoothing: Optional[float] = Field(default=None, ge=0.0, lt=1.0)
    class_dropout: Optional[float] = Field(default=None, ge=0.0, lt=1.0)
    drop_ratio: Optional[float] = probability(None)
    masking: Optional[Literal["exact", "bernoulli"]] = None


class Data(_Section):
    batch_size: int = Field(ge=1)
    val_batch_size: Optional[int] = Field(default=None, ge=1)
    num_workers: int = Field(default=0, ge=0)
    image_size: int = Field(ge=1)
    num_classes: int = Field(ge=0)
    batches_per_epoch: Optional[int] = Field(default=None, ge=1)
    val_batches: Optional[int] = Field(default=None, ge=1)
    shuffle_buffer: int = Field(default=1, ge=1)


class Root(_Section):
    seed: int = Field(ge=0)
    sweep_seeds: int = Field(default=1, ge=1)
    sweep_jobs: int = Field(default=1, ge=1)
    checkpoint_every_n_steps: Optional[int] = Field(default=None, ge=0)  # 0 / null: at the end only
    decode: Optional[DecodeSettings] = None
    model: Model
    transformer: Optional[TransformerSettings] = None
    data: Data
    ratio: Optional[RatioSettings] = None
    trainer: TrainerSettings
    evaluation: Optional[EvaluationSettings] = None


def _type_problems(plain: dict[str, Any]) -> list[Problem]:
    try:
        Root.model_validate(plain)
    except ValidationError as err:
        return problems_of(err, plain)
    return []


def _lookup(plain: dict[str, Any], keys: list[str]) -> Any:
    node: Any = plain
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


# -- rules across sections ---------------------------------------------------------------------------
def _schedule_problems(plain: dict[str, Any], problems: list[Problem]) -> list[Problem]:
    """The mask schedule group's name (`schedule.name`); `decode.schedule` and `ratio.schedule`
    interpolate it, so a bad name is reported once, under the first key that holds it."""
    name = _lookup(plain, ["schedule", "name"])
    if name is not None:
        try:
            canonical_schedule_name(name)
        except ValueError:
            valid = ", ".join([*SCHEDULE_NAMES, *SCHEDULE_ALIASES])
            problems = [("schedule.name", name, f"must be a mask schedule: {valid} or powX (X > 0)"), *problems]
    seen: set[Any] = set()
    kept = []
    for key, value, what in problems:
        if key in ("schedule.name", "decode.schedule", "ratio.schedule"):
            if repr(value) in seen:
                continue
            seen.add(repr(value))
        kept.append((key, value, what))
    return kept


def _shape_problems(plain: dict[str, Any]) -> list[Problem]:
    """The MAGE encoder-decoder's widths by their heads, the image size by the tokenizer's downsampling."""
    problems = []
    arch = (plain.get("model") or {}).get("arch") or {}
    for prefix in ("enc", "dec"):
        width, heads = arch.get(f"{prefix}_width"), arch.get(f"{prefix}_heads")
        if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
            problems.append((f"model.arch.{prefix}_width", width, f"must be divisible by model.arch.{prefix}_heads={heads}"))
    tok_arch = (plain.get("tokenizer") or {}).get("arch") or {}
    multipliers = tok_arch.get("channel_multipliers")
    size = (plain.get("data") or {}).get("image_size")
    if isinstance(multipliers, list) and multipliers and isinstance(size, int) and size > 0:
        factor = downsample_factor(multipliers)
        if size % factor:
            problems.append(("data.image_size", size, f"must be a multiple of the tokenizer's downsampling {factor}"))
    return problems


def _file_problems(plain: dict[str, Any]) -> list[Problem]:
    problems = []

    def must_exist(key: str, value: Any, what: str) -> None:
        if value not in (None, "") and not Path(str(value)).expanduser().exists():
            problems.append((key, value, f"must be an existing {what}"))

    must_exist("tokenizer.ckpt", _lookup(plain, ["tokenizer", "ckpt"]), "checkpoint file")
    ckpt_path = plain.get("ckpt_path")
    if ckpt_path not in (None, "last"):
        must_exist("ckpt_path", ckpt_path, "checkpoint file (or 'last')")
    evaluation = plain.get("evaluation") or {}
    if "inception" in (evaluation.get("extractor") or []):
        weights = evaluation.get("inception_weights")
        if weights in (None, ""):
            problems.append(("evaluation.inception_weights", weights,
                             "must name the local InceptionV3 weights file when evaluation.extractor has inception"))
        else:
            must_exist("evaluation.inception_weights", weights, "file")
    data = plain.get("data") or {}
    must_exist("data.root", data.get("root"), "image folder")
    if data.get("data_dir") and not data.get("train_shards"):
        must_exist("data.data_dir", data.get("data_dir"), "shard directory")
    return problems


def config_problems(cfg: DictConfig) -> list[Problem]:
    """Every problem of a composed config, as (key, value, what is allowed); [] when it is valid."""
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    problems = _schedule_problems(plain, _type_problems(plain))
    return problems + _shape_problems(plain) + _file_problems(plain)


def check_config(cfg: DictConfig, *, where: str = "") -> None:
    """Raise ConfigError naming every problem of `cfg` (one line each; `where` prefixes them, e.g. a
    sweep's grid point)."""
    problems = config_problems(cfg)
    if problems:
        prefix = f"{where}: " if where else ""
        raise ConfigError("\n".join(prefix + format_problem(p) for p in problems))
