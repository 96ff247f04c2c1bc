"""The config's schema: types, ranges, cross-field rules and files, checked before any work starts.

`check_config(cfg)` raises `ConfigError` with one line per problem — the key, the value, what is
allowed (`decode.steps=-3: must be >= 1`) — and `train`, `evaluate`, `tokenize` and the sweep (every
grid point, both bounds of every search space) call it right after composing, so a bad value costs
seconds, not a tokenizer training. Hydra already rejects unknown keys and group choices; this checks
the values.

Types and ranges are pydantic models of the sections (pydantic gives typed coercion with precise,
located errors; its messages are rewritten to the one-line form). Rules that span sections (width
divisible by heads, image size by the tokenizer's downsampling, schedule names including `powX`) and
files that must exist are plain functions below, each returning `(key, value, what is allowed)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lightning_mim.orchestration.config import ConfigError
from lightning_mim.tokens import downsample_factor

Problem = tuple[str, Any, str]  # (dotted key, value, what is allowed)
# `Trainer(precision=...)` values: Lightning's own list (`lightning.fabric.connector._PRECISION_INPUT_STR`
# and its aliases; tests/test_schema.py checks they are equal), written here because importing Lightning
# to read it costs a sweep driver, which otherwise imports no Lightning, seconds.
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
              "32-true", "64-true", "64", "32", "16", "bf16")


class _Section(BaseModel):
    # unknown keys are Hydra's job (struct mode); strict: no `true` or '8' for an integer, no '1e-3'
    # string for a number (an int is a number); no inf or nan where a finite number is meant
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


def probability(default: Any = ...) -> Any:
    return Field(default=default, ge=0.0, le=1.0)


class Decode(_Section):
    steps: int = Field(ge=1)
    choice_temperature: float = Field(ge=0.0)
    temperature: float = Field(ge=0.0)  # 0 = argmax (decoding.DecodeSettings)
    guidance_scale: float = Field(ge=0.0)
    guidance_ramp: Literal["constant", "linear"]
    schedule: str


class Optim(_Section):
    lr: Optional[float] = Field(default=None, gt=0.0)
    base_lr: Optional[float] = Field(default=None, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    warmup_steps: Optional[int] = Field(default=None, ge=0)
    warmup_epochs: Optional[float] = Field(default=None, ge=0.0)
    betas: Optional[list[float]] = Field(default=None, min_length=2, max_length=2)
    min_lr_ratio: Optional[float] = Field(default=None, ge=0.0, le=1.0)


class Model(_Section):
    optim: Optim
    label_smoothing: Optional[float] = Field(default=None, ge=0.0, lt=1.0)
    class_dropout: Optional[float] = Field(default=None, ge=0.0, lt=1.0)
    drop_ratio: Optional[float] = probability(None)
    masking: Optional[Literal["exact", "bernoulli"]] = None


class Transformer(_Section):
    width: int = Field(ge=1)
    depth: int = Field(ge=1)
    heads: int = Field(ge=1)
    mlp_dim: int = Field(ge=1)
    dropout: float = probability()
    attn_dropout: float = probability()


class Data(_Section):
    batch_size: int = Field(ge=1)
    val_batch_size: Optional[int] = Field(default=None, ge=1)
    num_workers: int = Field(default=0, ge=0)
    image_size: int = Field(ge=1)
    num_classes: int = Field(ge=0)
    batches_per_epoch: Optional[int] = Field(default=None, ge=1)
    val_batches: Optional[int] = Field(default=None, ge=1)
    shuffle_buffer: int = Field(default=1, ge=1)


class Ratio(_Section):
    mean: Optional[float] = probability(None)
    std: Optional[float] = Field(default=None, gt=0.0)
    low: Optional[float] = probability(None)
    high: Optional[float] = probability(None)
    value: Optional[float] = probability(None)
    schedule: Optional[str] = None


class Trainer(_Section):
    max_steps: int = Field(ge=-1)

    @field_validator("max_steps")
    @classmethod
    def _no_zero_steps(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (no step limit) or >= 1")
        return value
    max_epochs: Optional[int] = Field(default=None, ge=-1)
    devices: Union[int, str, list[int], None] = None
    num_nodes: int = Field(default=1, ge=1)
    accumulate_grad_batches: int = Field(default=1, ge=1)
    log_every_n_steps: int = Field(default=50, ge=1)
    gradient_clip_val: Optional[float] = Field(default=None, ge=0.0)


class Evaluation(_Section):
    num_samples: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    extractor: list[Literal["domain", "inception"]] = Field(min_length=1)


class Root(_Section):
    seed: int = Field(ge=0)
    sweep_seeds: int = Field(default=1, ge=1)
    sweep_jobs: int = Field(default=1, ge=1)
    checkpoint_every_n_steps: Optional[int] = Field(default=None, ge=0)  # 0 / null: at the end only
    decode: Optional[Decode] = None
    model: Model
    transformer: Optional[Transformer] = None
    data: Data
    ratio: Optional[Ratio] = None
    trainer: Trainer
    evaluation: Optional[Evaluation] = None


def _allowed(error: dict[str, Any]) -> str:
    """pydantic's error -> what the value may be, in a few words."""
    kind, ctx = error["type"], error.get("ctx") or {}
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
              "less_than": ("<", "lt")}
    if kind in bounds:
        op, name = bounds[kind]
        return f"must be {op} {ctx[name]}"
    if kind == "finite_number":
        return "must be a finite number"
    if kind.startswith("int_"):
        return "must be an integer"
    if kind.startswith("float_"):
        return "must be a number"
    if kind in ("too_long", "list_type") and error["loc"] and error["loc"][-1] == "betas":
        return "must be a list of two numbers"
    if kind.startswith("bool_"):
        return "must be true or false"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    if kind == "too_short":
        return "must not be empty"
    if kind == "missing":
        return "is required"
    if kind == "value_error":  # our own validators: their message is the rule
        return str(error["msg"]).removeprefix("Value error, ")
    return str(error["msg"])


def _type_problems(plain: dict[str, Any]) -> list[Problem]:
    try:
        Root.model_validate(plain)
    except ValidationError as err:
        problems = []
        for error in err.errors():
            loc = [str(p) for p in error["loc"] if not isinstance(p, int)]
            if error["loc"] and isinstance(error["loc"][-1], int):  # an item of a list: name the list
                value = _lookup(plain, loc)
            else:
                value = error.get("input")
            problems.append((".".join(loc), value, _allowed(error)))
        return problems
    return []


def _lookup(plain: dict[str, Any], keys: list[str]) -> Any:
    node: Any = plain
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


# -- rules across sections ---------------------------------------------------------------------------
def _schedule_problems(plain: dict[str, Any]) -> list[Problem]:
    from lightning_mim.masking import SCHEDULES, canonical_schedule_name

    problems, reported = [], set()
    for key in ("schedule.name", "decode.schedule", "ratio.schedule"):  # the last two interpolate the first
        name = _lookup(plain, key.split("."))
        if name is None or name in reported:
            continue
        reported.add(name)
        try:
            canonical_schedule_name(str(name))
        except (ValueError, KeyError):
            problems.append((key, name, f"must be a mask schedule: {', '.join(SCHEDULES)} or powX (X > 0)"))
    return problems


def _shape_problems(plain: dict[str, Any]) -> list[Problem]:
    problems = []
    transformer = plain.get("transformer") or {}
    width, heads = transformer.get("width"), transformer.get("heads")
    if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
        problems.append(("transformer.width", width, f"must be divisible by transformer.heads={heads}"))
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


def _library_name_problems(plain: dict[str, Any]) -> list[Problem]:
    """Names whose valid values the library (or Lightning) owns: the optimiser and its learning-rate
    schedule (`optim.OPTIMIZERS`, `optim.LR_SCHEDULES`), the evaluation's split (`eval.loaders.SPLIT_NAMES`),
    the trainer's precision (`PRECISIONS`)."""
    from lightning_mim.eval.loaders import SPLIT_NAMES
    from lightning_mim.optim import LR_SCHEDULES, OPTIMIZERS

    problems = []
    optim = (plain.get("model") or {}).get("optim") or {}
    for key, valid in (("name", tuple(OPTIMIZERS)), ("schedule", LR_SCHEDULES)):
        if key in optim and optim[key] not in valid:
            problems.append((f"model.optim.{key}", optim[key], f"must be one of {', '.join(valid)}"))
    split = (plain.get("evaluation") or {}).get("split")
    if split is not None and split not in SPLIT_NAMES:
        problems.append(("evaluation.split", split, f"must be one of {', '.join(SPLIT_NAMES)}"))
    precision = (plain.get("trainer") or {}).get("precision")
    if precision is not None and str(precision) not in PRECISIONS:
        problems.append(("trainer.precision", precision, f"must be one of {', '.join(PRECISIONS)}"))
    return problems


def _pair_problems(plain: dict[str, Any]) -> list[Problem]:
    """Settings that must agree with each other: a ratio's bounds, the trainer's devices."""
    problems = []
    ratio = plain.get("ratio") or {}
    low, high = ratio.get("low"), ratio.get("high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low > high:
        problems.append(("ratio.low", low, f"must be <= ratio.high={high}"))
    devices = (plain.get("trainer") or {}).get("devices")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices < 1 and devices != -1:
        problems.append(("trainer.devices", devices, "must be >= 1, -1 (all), 'auto' or a list of device ids"))
    elif isinstance(devices, str) and devices != "auto" and not devices.replace(",", "").isdigit():
        problems.append(("trainer.devices", devices, "must be >= 1, -1 (all), 'auto' or a list of device ids"))
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
    problems = _type_problems(plain)
    problems += [p for p in _schedule_problems(plain) if p[0] not in {q[0] for q in problems}]
    seen = {q[0] for q in problems}
    problems += [p for p in _library_name_problems(plain) + _pair_problems(plain) if p[0] not in seen]
    return problems + _shape_problems(plain) + _file_problems(plain)


def format_problem(problem: Problem) -> str:
    key, value, allowed = problem
    shown = "''" if value == "" else value
    return f"{key}={shown}: {allowed}"


def check_config(cfg: DictConfig, *, where: str = "") -> None:
    """Raise ConfigError naming every problem of `cfg` (one line each; `where` prefixes them, e.g. a
    sweep's grid point)."""
    problems = config_problems(cfg)
    if problems:
        prefix = f"{where}: " if where else ""
        raise ConfigError("\n".join(prefix + format_problem(p) for p in problems))
