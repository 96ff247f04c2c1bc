"""The library's settings, typed: one definition of every rule about a configurable value.

Each part of the library that a config section configures takes its values through a model here,
and the config check (`orchestration/schema.py`) composes the same models, so a rule written once
holds at both places:

  DecodeSettings       `decoding.decode`'s settings (the `decode` section); `modules.stage2` keeps one
  OptimSettings        `optim.build_optimizer`'s recipe (`model.optim`)
  TransformerSettings  the stage-2 transformer's shape (`transformer`)
  RatioSettings        the masking-ratio distributions of `masking` (`ratio`)
  EvaluationSettings   how generated samples are scored (`evaluation`)
  TrainerSettings      what Lightning's Trainer takes from `trainer` (Lightning owns the rules; the
                       names it accepts are written here, and a test pins them to Lightning's)

and the names the library owns: mask schedules (`canonical_schedule_name`), `OPTIMIZER_NAMES`,
`LR_SCHEDULES`, `GUIDANCE_RAMPS`, `SPLIT_NAMES`, `PRECISIONS`.

Strict (pydantic's strict mode, which this module is written on because it gives typed, located
errors): no `true` or `'8'` for an integer, no string for a number (an integer is a number), no inf or
nan where a finite number is meant. A problem reads `decode.steps=-3: must be >= 1`; `validated`
raises `SettingsError` (a ValueError) with one such line per problem.

Torch-free and cheap to import: a typo is refused before torch, Lightning or any data is loaded.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Iterable, Mapping, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

Problem = tuple[str, Any, str]  # (dotted key, value, what is allowed)

# -- names the library owns -----------------------------------------------------------------------
# Mask schedules: paper names first (the canonical ones), then the official code's aliases
# (google-research/maskgit `mask_schedule.py`); any other `powX` (X a float > 0) is 1 - r^X.
SCHEDULE_NAMES: tuple[str, ...] = ("linear", "square", "cubic", "sqrt", "cosine", "log", "exp", "arccos")
SCHEDULE_ALIASES: dict[str, str] = {"uniform": "linear", "pow2": "square", "pow3": "cubic", "pow0.5": "sqrt"}
NEEDS_N_TOKENS: frozenset[str] = frozenset({"log", "exp"})  # schedules whose value depends on N
POWER_SCHEDULES: dict[float, str] = {1.0: "linear", 2.0: "square", 3.0: "cubic", 0.5: "sqrt"}
_POW_RE = re.compile(r"^pow(?P<x>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")

OPTIMIZER_NAMES = ("adam", "adamw")  # `optim.OPTIMIZERS` maps them to torch's classes
LR_SCHEDULES = ("constant", "cosine")
GUIDANCE_RAMPS = ("constant", "linear")
SPLIT_NAMES = ("train", "val", "test")
EXTRACTORS = ("domain", "inception")
SECOND_DRAW_SUFFIX = "_draw2"  # `fid_domain_draw2`: a metric on the second draw of samples (`evaluation.second_draw`)
# `Trainer(precision=...)` values: Lightning's own list (`lightning.fabric.connector._PRECISION_INPUT_STR`
# and its aliases; tests/test_schema.py checks they are equal), written here because importing Lightning
# to read it costs seconds before a typo could be refused.
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
              "32-true", "64-true", "64", "32", "16", "bf16")


def schedule_exponent(name: str) -> Optional[float]:
    """X of a `powX` name that is not one of the named schedules; None for the named ones.
    ValueError for an unknown name or an exponent that is not a finite float > 0."""
    if not isinstance(name, str):
        raise _unknown_schedule(name)
    if name in SCHEDULE_NAMES or name in SCHEDULE_ALIASES:
        return None
    match = _POW_RE.match(name)
    if match is None:
        raise _unknown_schedule(name)
    exponent = float(match.group("x"))
    if not math.isfinite(exponent) or exponent <= 0:
        raise ValueError(f"mask schedule {name!r}: the exponent of powX must be a finite float > 0")
    return exponent


def canonical_schedule_name(name: str) -> str:
    """Paper name of a schedule (`uniform`->`linear`, `pow2`->`square`, `pow2.0`->`square`, `pow1.50`->`pow1.5`)."""
    exponent = schedule_exponent(name)
    if exponent is None:
        return SCHEDULE_ALIASES.get(name, name)
    return POWER_SCHEDULES.get(exponent, f"pow{exponent:g}")


def _unknown_schedule(name: object) -> ValueError:
    valid = ", ".join([*SCHEDULE_NAMES, *SCHEDULE_ALIASES])
    return ValueError(f"unknown mask schedule {name!r}; valid: {valid}, or powX for any float X > 0 (e.g. pow1.5)")


def _one_of(value: Any, names: Iterable[str]) -> Any:
    names = tuple(names)
    if value not in names:
        raise ValueError(f"must be one of {', '.join(names)}")
    return value


# -- the models -----------------------------------------------------------------------------------
class Settings(BaseModel):
    """Strict, finite, immutable; keys a model does not know are left to whoever owns them (Hydra's
    struct mode for a config; `from_mapping` where a library part takes a whole section)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, frozen=True)


def probability(default: Any = ...) -> Any:
    return Field(default=default, ge=0.0, le=1.0)


class DecodeSettings(Settings):
    """The settings of a run's decoding, named exactly as `decode()`'s parameters, so that
    `decode(logits_fn, tokens, mask_id=..., **settings.as_kwargs())` holds.

    No defaults here: the `decode` config group (`conf/decode/*.yaml`) is their one source, and a
    module gets a complete set from its config. steps: T >= 1. schedule: a mask schedule name
    (`canonical_schedule_name`). choice_temperature >= 0: Gumbel scale on the confidence.
    temperature >= 0: softmax temperature (0 = argmax). guidance_scale >= 0: classifier-free guidance
    (0 = off). guidance_ramp: one of GUIDANCE_RAMPS.
    """

    steps: int = Field(ge=1)
    schedule: str
    choice_temperature: float = Field(ge=0.0)
    temperature: float = Field(ge=0.0)
    guidance_scale: float = Field(ge=0.0)
    guidance_ramp: str

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        try:
            canonical_schedule_name(value)
        except ValueError:
            raise ValueError(f"must be a mask schedule: {', '.join([*SCHEDULE_NAMES, *SCHEDULE_ALIASES])} or powX (X > 0)")
        return value

    @field_validator("guidance_ramp")
    @classmethod
    def _ramp(cls, value: str) -> str:
        return _one_of(value, GUIDANCE_RAMPS)

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> "DecodeSettings":
        """From a config section (`cfg.decode`, a module's `decode` hyper-parameter): every field, no other key."""
        names = list(cls.model_fields)
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise ValueError(f"unknown decode setting(s) {unknown}; valid: {', '.join(names)}")
        missing = [n for n in names if n not in settings]
        if missing:
            raise ValueError(f"decode settings lack {missing}: give all of {', '.join(names)} (conf/decode/ has them)")
        return validated(cls, settings, "decode")

    def replace(self, **overrides: Any) -> "DecodeSettings":
        """A copy with some fields changed (e.g. `steps=12` at evaluation); unknown names are an error."""
        if not overrides:
            return self
        unknown = sorted(set(overrides) - set(type(self).model_fields))
        if unknown:
            raise ValueError(f"unknown decode setting(s) {unknown}; valid: {', '.join(type(self).model_fields)}")
        return validated(type(self), {**self.as_kwargs(), **overrides}, "decode")

    def as_kwargs(self) -> dict[str, Any]:
        return self.model_dump()


class OptimSettings(Settings):
    """An optimiser recipe (`optim.build_optimizer`): name (OPTIMIZER_NAMES), peak `lr` or MAGE's
    `base_lr` (· global batch / 256), betas (two numbers), decoupled weight decay >= 0, warm-up in
    steps (or epochs, converted by the module), lr schedule (LR_SCHEDULES) and the cosine's floor
    `min_lr_ratio` in [0, 1]. None: the key is absent (the module's default applies)."""

    name: Optional[str] = None
    lr: Optional[float] = Field(default=None, gt=0.0)
    base_lr: Optional[float] = Field(default=None, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    warmup_steps: Optional[int] = Field(default=None, ge=0)
    warmup_epochs: Optional[float] = Field(default=None, ge=0.0)
    betas: Optional[list[float]] = Field(default=None, min_length=2, max_length=2)
    min_lr_ratio: Optional[float] = probability(None)
    schedule: Optional[str] = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else _one_of(value, OPTIMIZER_NAMES)

    @field_validator("schedule")
    @classmethod
    def _lr_schedule(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else _one_of(value, LR_SCHEDULES)


class TransformerSettings(Settings):
    """The stage-2 transformer's shape: width divisible by heads (each head gets width / heads
    channels), dropout probabilities in [0, 1]."""

    heads: int = Field(ge=1)  # before width: width's rule reads it
    width: int = Field(ge=1)
    depth: int = Field(ge=1)
    mlp_dim: int = Field(ge=1)
    dropout: Optional[float] = probability(None)  # None: absent, `nn.transformer`'s default applies
    attn_dropout: Optional[float] = probability(None)

    @field_validator("width")
    @classmethod
    def _width(cls, value: int, info: ValidationInfo) -> int:
        heads = info.data.get("heads")
        if heads and value % heads:
            raise ValueError(f"must be divisible by transformer.heads={heads}")
        return value


class RatioSettings(Settings):
    """A masking-ratio distribution's parameters (`masking.TruncGaussRatio`, `UniformRatio`,
    `FixedRatio`, `ScheduleRatio`): ratios and bounds in [0, 1] with low <= high, a truncated
    Gaussian's std > 0, a schedule name for `ScheduleRatio`."""

    high: Optional[float] = probability(None)  # before low: low's rule reads it
    low: Optional[float] = probability(None)
    mean: Optional[float] = probability(None)
    std: Optional[float] = Field(default=None, gt=0.0)
    value: Optional[float] = probability(None)
    schedule: Optional[str] = None

    @field_validator("low")
    @classmethod
    def _low(cls, value: Optional[float], info: ValidationInfo) -> Optional[float]:
        high = info.data.get("high")
        if value is not None and high is not None and value > high:
            raise ValueError(f"must be <= ratio.high={high}")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else DecodeSettings._schedule(value)


class EvaluationSettings(Settings):
    """How generated samples are scored: how many and in what batches, with which feature extractors
    (EXTRACTORS, at least one), against which split's statistics (SPLIT_NAMES)."""

    num_samples: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    extractor: list[str] = Field(min_length=1)
    split: Optional[str] = None
    second_draw: bool = False

    @field_validator("extractor")
    @classmethod
    def _extractors(cls, value: list[str]) -> list[str]:
        return [_one_of(v, EXTRACTORS) for v in value]

    @field_validator("split")
    @classmethod
    def _split(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else _one_of(value, SPLIT_NAMES)


class TrainerSettings(Settings):
    """What the Trainer takes from `trainer`: a step budget (-1: none; 0 would train nothing), devices
    (>= 1, -1 = all, 'auto', or ids), precision (PRECISIONS), counts >= 1."""

    max_steps: int = Field(ge=-1)
    max_epochs: Optional[int] = Field(default=None, ge=-1)
    devices: Union[int, str, list[int], None] = None
    num_nodes: int = Field(default=1, ge=1)
    accumulate_grad_batches: int = Field(default=1, ge=1)
    log_every_n_steps: int = Field(default=50, ge=1)
    gradient_clip_val: Optional[float] = Field(default=None, ge=0.0)
    precision: Union[str, int, None] = None

    @field_validator("max_steps")
    @classmethod
    def _no_zero_steps(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (no step limit) or >= 1")
        return value

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        bad_int = isinstance(value, int) and value < 1 and value != -1
        bad_str = isinstance(value, str) and value != "auto" and not value.replace(",", "").isdigit()
        if bad_int or bad_str:
            raise ValueError("must be >= 1, -1 (all), 'auto' or a list of device ids")
        return value

    @field_validator("precision")
    @classmethod
    def _precision(cls, value: Any) -> Any:
        return None if value is None else _one_of(str(value), PRECISIONS)


# -- errors in one line each ----------------------------------------------------------------------
class SettingsError(ValueError):
    """Invalid settings: one `key=value: what is allowed` line per problem."""


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], values: Mapping[str, Any], section: str = "") -> M:
    """`model` built from `values`, or SettingsError naming each problem under `section`."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as err:
        lines = [format_problem(p) for p in problems_of(err, dict(values), section)]
        raise SettingsError("\n".join(lines)) from None


def validated_field(model: type[BaseModel], name: str, value: Any, section: str = "") -> Any:
    """One field of `model` checked alone (its type and bounds; rules that read other fields need
    `validated`), for a function that takes one setting, e.g. `decoding.masked_counts(steps=...)`."""
    from pydantic import TypeAdapter

    field = model.model_fields[name]
    adapter = TypeAdapter(Annotated[field.annotation, field], config=model.model_config)  # type: ignore[arg-type]
    try:
        return adapter.validate_python(value)
    except ValidationError as err:
        problems = [(".".join(p for p in (section, name) if p), value, allowed(e)) for e in err.errors()]
        raise SettingsError("\n".join(format_problem(p) for p in problems)) from None


def problems_of(err: ValidationError, values: Mapping[str, Any], section: str = "") -> list[Problem]:
    """pydantic's errors -> (dotted key, value, what is allowed); an item of a list names the list."""
    problems = []
    for error in err.errors():
        loc = [str(p) for p in error["loc"] if not isinstance(p, int)]
        if error["loc"] and isinstance(error["loc"][-1], int):
            value = _lookup(values, loc)
        else:
            value = error.get("input")
        problems.append((".".join([section, *loc] if section else loc), value, allowed(error)))
    return problems


def allowed(error: Mapping[str, Any]) -> str:
    """One pydantic error -> what the value may be, in a few words."""
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
    if kind == "value_error":  # the rules above: their message is what is allowed
        return str(error["msg"]).removeprefix("Value error, ")
    return str(error["msg"])


def format_problem(problem: Problem) -> str:
    key, value, what = problem
    shown = "''" if value == "" else value
    return f"{key}={shown}: {what}"


def _lookup(values: Mapping[str, Any], keys: list[str]) -> Any:
    node: Any = values
    for key in keys:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node
