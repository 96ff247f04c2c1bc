"""What a sweep is: axes, search spaces, fixed overrides, objective, budget — parsed from Hydra syntax.

`schedule=cosine,linear decode.steps=4,8` is a grid (cartesian product, Optuna's GridSampler);
`choice(a,b)`, `range(lo,hi[,step])`, `interval(lo,hi)` and `tag(log, interval(lo,hi))` are Optuna
search spaces explored by TPE for `sweep.n_trials` trials; plain `key=value` overrides apply to every
trial. `sweep=NAME` loads `sweeps/NAME.yaml`; `sweep.KEY=VALUE` sets one sweep option.
Parsing uses Hydra's own override parser (`config.parse_overrides`), so the grammar is exactly Hydra's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import optuna
import yaml
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

from lightning_mim.orchestration.config import ConfigError, parse_overrides, sweeps_dir
from lightning_mim.orchestration.launchers import LAUNCHERS
from lightning_mim.orchestration.pruning import PRUNERS
from lightning_mim.orchestration.summary import MetricFamily, VerdictOptions, secondary_problem
from lightning_mim.sequential import OBRIEN_FLEMING, SPENDINGS, SequentialDesign
from lightning_mim.verdicts import DIRECTIONS

DEFAULT_INFERENCE_ONLY = ("decode.",)
INTERMEDIATE_EVALS = ("auto", "true", "false")
REPLICATE_KEY = "replicate"  # the grid axis of `sweep.replicates` (an A/A design)
AUTO = "auto"  # `sweep.seeds=auto`: seeds in rounds where comparisons are open (`lightning_mim.sequential`)
# The rounds of `sweep.seeds=auto` unless `sweep.first_round/round_size/max_seeds` say otherwise: a first
# round of 5 seeds per point (at 3 the paired t-test has 2 degrees of freedom and decides almost nothing
# at the family's level), then rounds of 5 up to 15 (looks at 5, 10, 15; docs/SWEEPS.md "Seeds where the doubt
# is: `sweep.seeds=auto`")
AUTO_FIRST_ROUND, AUTO_ROUND_SIZE, AUTO_MAX_SEEDS = 5, 5, 15
MAX_POINTS_TO_CHECK = 1000  # combinations of a search space's values checked before a sweep starts


@dataclass
class SweepSpec:
    grid: dict[str, list[str]] = field(default_factory=dict)
    search: dict[str, optuna.distributions.BaseDistribution] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)
    name: str = "adhoc"
    objective: str = "val/fid_domain"
    direction: str = "minimize"
    n_trials: int | None = None
    seeds: int | None = None  # None: the preset's `sweep_seeds` for grids (resolve_seeds), 1 for search spaces
    inference_only: list[str] = field(default_factory=lambda: list(DEFAULT_INFERENCE_ONLY))
    storage: str | None = None
    retries: int = 1
    jobs: int | None = None  # worker processes on this machine (each runs whole trials); None: the preset's `sweep_jobs`
    pruner: str = "auto"  # auto: median for search spaces, none for grids (an ablation grid wants every point)
    # Evaluations before the last step: "auto" keeps them only when a pruner reads them (a grid's trial
    # is judged by its final evaluation; skipping the others changes no number: evaluations fork the RNG).
    intermediate_evals: str = "auto"
    launcher: str = "local"  # local: child processes of this driver | submitit: one job per trial
    submitit: dict[str, Any] = field(default_factory=dict)  # sweep.submitit.KEY=VALUE (cluster, timeout_min, ...)
    description: str = ""
    # How the table reads the comparisons (summary.VerdictOptions); not part of the study's name: the
    # same trials can be read again with another margin
    alpha: float = 0.05
    equivalence: float | None = None
    effect: float | None = None
    # Metrics whose comparisons are families of tests of their own (`sweep.secondary`, a named sweep's
    # `secondary:` list): each read at `alpha` with its own margin, reported beside the objective's
    secondary: list[MetricFamily] = field(default_factory=list)
    # An A/A design (`sweep.replicates=R`): every point R times as arms of their own, replicate r trained
    # with the seeds r·N .. r·N + N - 1 (N = sweep.seeds), so the arms share no seed and differ by chance only
    replicates: int = 1
    # A noisy search space (`sweep.repeats=N`): every configuration TPE suggests is trained with the
    # seeds 0..N-1 and told to Optuna as their mean; the chosen one is re-run on the fresh seeds
    # N..2N-1 (`confirmation_spec`), since the mean that won the search is biased in its favour
    repeats: int = 1
    first_seed: int = 0  # the seed axis runs first_seed .. first_seed + seeds - 1 (a confirmation's fresh seeds)
    # `sweep.seeds=auto` (adaptive): a group-sequential design decides after every round which points
    # get more seeds (`design()`); the seed axis then spans the most a point may get, max_seeds
    adaptive: bool = False
    first_round: int | None = None
    round_size: int | None = None
    max_seeds: int | None = None
    spending: str = OBRIEN_FLEMING

    def verdict_options(self) -> VerdictOptions:
        return VerdictOptions(self.alpha, self.equivalence, self.effect)

    def design(self) -> SequentialDesign | None:
        """The sequential design of `sweep.seeds=auto` (None for a fixed number of seeds): its rounds, the
        table's α and equivalence margin, the spending function. Fixed before the first trial."""
        if not self.adaptive:
            return None
        try:
            return SequentialDesign(
                first_round=self.first_round or AUTO_FIRST_ROUND, round_size=self.round_size or AUTO_ROUND_SIZE,
                max_seeds=self.max_seeds or max(AUTO_MAX_SEEDS, self.first_round or 0), alpha=self.alpha,
                equivalence=self.equivalence, spending=self.spending)
        except ValueError as err:
            raise ConfigError(f"sweep.seeds=auto: {err}") from None

    def effective_pruner(self) -> str:
        if self.pruner == "auto":
            return "none" if self.is_grid or self.repeats > 1 else "median"
        return self.pruner

    def submitit_options(self) -> dict[str, Any]:
        """{cluster, parameters} for `launchers.SubmititOptions`."""
        options = dict(self.submitit)
        return {"cluster": str(options.pop("cluster", "auto")), "parameters": options}

    def keeps_intermediate_evals(self) -> bool:
        if self.intermediate_evals == "auto":
            return self.effective_pruner() != "none"
        return self.intermediate_evals == "true"

    @property
    def is_grid(self) -> bool:
        return not self.search

    def has_seed_override(self) -> bool:
        """Whether the user set `seed` themselves (an axis, a search space or a fixed `seed=`)."""
        return "seed" in self.grid or "seed" in self.search or any(f.lstrip("+~").startswith("seed=") for f in self.fixed)

    def resolve_seeds(self, preset_default: int) -> None:
        """Settle the number of seeds per point: `sweep.seeds=N` if given; else the experiment preset's
        `sweep_seeds` for a grid (3 on digits, 1 on ImageNet); 1 for search spaces (TPE optimises one
        noisy value per trial) and when the user sets `seed` themselves."""
        if self.adaptive:
            if not self.is_grid or self.has_seed_override() or self.replicates > 1 or len(self.grid_points()) < 2:
                raise ConfigError("sweep.seeds=auto: needs a grid of 2 or more points, no seed override and no "
                                  "sweep.replicates (seeds are added where the comparisons between points are open)")
            self.seeds = self.design().max_seeds  # the seed axis: every seed a point may get
        elif any(v is not None for v in (self.first_round, self.round_size, self.max_seeds)):
            raise ConfigError("sweep.first_round, sweep.round_size and sweep.max_seeds: only with sweep.seeds=auto")
        elif self.seeds is not None:
            if self.seeds > 1 and self.has_seed_override():
                raise ConfigError(f"sweep.seeds={self.seeds} and a seed override both set the seeds; keep one")
        else:
            self.seeds = int(preset_default) if self.is_grid and not self.has_seed_override() else 1
            if self.seeds < 1:
                raise ConfigError(f"sweep_seeds={preset_default}: must be >= 1")
        if self.replicates > 1 and (not self.is_grid or self.has_seed_override() or self.seeds < 2):
            raise ConfigError(f"sweep.replicates={self.replicates}: needs a grid, sweep.seeds >= 2 and no seed override "
                              f"(each replicate takes seeds of its own)")
        if self.repeats > 1 and (self.is_grid or self.has_seed_override() or self.seeds > 1 or self.pruner not in ("auto", "none")):
            raise ConfigError(f"sweep.repeats={self.repeats}: needs a search space (choice/range/interval), no seed override, "
                              f"no sweep.seeds > 1 and no pruner (each trial trains {self.repeats} seeds and reports their mean)")

    def repeat_seeds(self) -> list[str]:
        """The seeds every configuration of a `sweep.repeats` search trains with (none without repeats)."""
        return [str(s) for s in range(self.repeats)] if self.repeats > 1 else []

    def confirmation_spec(self, params: dict[str, Any]) -> "SweepSpec":
        """The re-run of a `sweep.repeats` search's chosen configuration `params` on fresh seeds: a grid
        of that one point with the seeds repeats .. 2·repeats - 1 (none of them seen by the search), in a
        study of its own (named from it, so a rerun resumes it), read like any grid point."""
        return dataclasses.replace(
            self, grid={k: [str(v)] for k, v in sorted(params.items())}, search={}, name=f"{self.name}-confirm",
            n_trials=None, seeds=self.repeats, first_seed=self.repeats, repeats=1, replicates=1, pruner="none", jobs=1,
            description=f"the chosen configuration of a sweep.repeats={self.repeats} search, on fresh seeds",
        )

    def resolve_jobs(self, preset_default: int) -> None:
        """Settle how many trials run at once here: `sweep.jobs=N` if given, else the preset's `sweep_jobs`
        (2 for the tiny digits presets, 1 elsewhere), never more than the trials there are."""
        if self.jobs is None:
            self.jobs = max(1, int(preset_default))
            if self.is_grid:
                self.jobs = min(self.jobs, max(1, len(self.grid_points())))

    def grid_space(self) -> dict[str, list[str]]:
        space = dict(self.grid)
        if (self.seeds or 1) > 1:
            space["seed"] = [str(s) for s in range(self.first_seed, self.first_seed + self.seeds)]
        if self.replicates > 1:
            space[REPLICATE_KEY] = [str(r) for r in range(self.replicates)]
        return space

    def trained_seed(self, params: dict[str, Any]) -> str | None:
        """The seed a trial at `params` trains with: its `seed`, moved past the earlier replicates' seeds
        for `sweep.replicates` (None: the config's own seed)."""
        seed = params.get("seed")
        if REPLICATE_KEY not in params:
            return None if seed is None else str(seed)
        return str(int(params[REPLICATE_KEY]) * (self.seeds or 1) + int(seed or 0))

    def axis_points(self) -> list[dict[str, str]]:
        """The grid's points without the seed axis (the points an adaptive sweep adds seeds to)."""
        keys = sorted(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]

    def grid_points(self) -> list[dict[str, str]]:
        space = self.grid_space()
        keys = sorted(space)
        return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]

    def points_to_validate(self) -> list[dict[str, str]]:
        """What to check before the first trial: every grid point, whatever its seed (a user's seed axis
        is checked like any other); for search spaces every combination of the categorical choices and
        the integer values, with each continuous dimension at both bounds. More than
        `MAX_POINTS_TO_CHECK` combinations is refused (`ConfigError`, saying so)."""
        if self.is_grid:
            if (self.seeds or 1) == 1:
                return self.grid_points()
            # the seeds 0..N-1 of `sweep.seeds` are valid seeds: each point's other settings once
            unique = {json.dumps({k: v for k, v in p.items() if k != "seed"}, sort_keys=True): None for p in self.grid_points()}
            return [json.loads(point) for point in unique]
        space = {**{k: [str(v) for v in vs] for k, vs in self.grid_space().items()},
                 **{key: _values_to_check(dist) for key, dist in self.search.items()}}
        count = 1
        for values in space.values():
            count *= len(values)
        if count > MAX_POINTS_TO_CHECK:
            raise ConfigError(f"the search space has {count} combinations of values to check (more than "
                              f"{MAX_POINTS_TO_CHECK}): narrow its choice()/range() dimensions or use interval()")
        keys = sorted(space)
        return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]

    def total_trials(self) -> int:
        if self.is_grid:
            return len(self.grid_points())
        if not self.n_trials:
            raise ConfigError("search spaces (choice/range/interval) need sweep.n_trials=N")
        return int(self.n_trials)

    def is_inference_only(self, key: str) -> bool:
        return any(key == p or (p.endswith(".") and key.startswith(p)) or key == p.rstrip(".") for p in self.inference_only)

    def study_name(self) -> str:
        """Derived from the spec, so rerunning the same command resumes the same study."""
        blob = json.dumps(
            {
                "grid": self.grid_space(),
                "search": {k: repr(v) for k, v in sorted(self.search.items())},
                "fixed": sorted(self.fixed),
                "objective": [self.objective, self.direction],
                "n_trials": self.n_trials if self.search else None,
                **({"repeats": self.repeats} if self.repeats > 1 else {}),  # names without repeats stay as they were
                # the rounds, α and margin decide which trials run: part of an adaptive sweep's identity
                **({"design": self.design().to_dict()} if self.adaptive else {}),
            },
            sort_keys=True,
        )
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"

    def trial_overrides(self, params: dict[str, Any]) -> list[str]:
        """The config overrides of a trial at `params` (a replicate is no config key: it moves the seed)."""
        settings = {k: v for k, v in params.items() if k != REPLICATE_KEY}
        if REPLICATE_KEY in params:
            settings["seed"] = self.trained_seed(params)
        return [*self.fixed, *(f"{k}={v}" for k, v in sorted(settings.items()))]


def _values_to_check(dist: optuna.distributions.BaseDistribution) -> list[str]:
    """The values of a search-space dimension a config check must see: every choice, every integer of
    a range (up to MAX_POINTS_TO_CHECK), or both bounds of a continuous interval."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return [str(c) for c in dist.choices]
    if isinstance(dist, optuna.distributions.IntDistribution) and not dist.log:
        count = (dist.high - dist.low) // dist.step + 1
        if count <= MAX_POINTS_TO_CHECK:
            return [str(v) for v in range(dist.low, dist.high + 1, dist.step)]
    return [repr(dist.low), repr(dist.high)]


def _distribution(override) -> optuna.distributions.BaseDistribution:
    value = override.value()
    key = override.key_or_group
    if isinstance(value, ChoiceSweep):
        return optuna.distributions.CategoricalDistribution([str(v) for v in value.list])
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step or 1
        if all(float(x).is_integer() for x in (start, stop, step)):
            values = list(range(int(start), int(stop), int(step)))  # Hydra's range excludes stop
            if not values:
                raise ConfigError(f"empty range for {key}: {override.input_line}")
            return optuna.distributions.IntDistribution(values[0], values[-1], step=int(step))
        return optuna.distributions.CategoricalDistribution(list(override.sweep_string_iterator()))
    if isinstance(value, IntervalSweep):
        if not float(value.start) < float(value.end):
            raise ConfigError(f"{key}={override.input_line.split('=', 1)[1]}: interval bounds must be increasing "
                              f"(low < high), got {value.start} and {value.end}")
        if "log" in value.tags and float(value.start) <= 0:
            raise ConfigError(f"{key}={override.input_line.split('=', 1)[1]}: a log interval's bounds must be > 0")
        log = "log" in value.tags
        if "int" in value.tags:
            return optuna.distributions.IntDistribution(int(value.start), int(value.end), log=log)
        return optuna.distributions.FloatDistribution(float(value.start), float(value.end), log=log)
    raise ConfigError(f"unsupported sweep for {key}: {override.input_line}")


def _apply_option(spec: SweepSpec, key: str, value: Any) -> None:
    if key in ("objective", "name", "storage", "description"):
        setattr(spec, key, str(value))
    elif key == "direction":
        if value not in DIRECTIONS:
            raise ConfigError(f"unknown sweep.direction '{value}'; valid: {', '.join(DIRECTIONS)}")
        spec.direction = value
    elif key == "pruner":
        if value not in ("auto", *PRUNERS):
            raise ConfigError(f"unknown sweep.pruner '{value}'; valid: auto, {', '.join(PRUNERS)}")
        spec.pruner = str(value)
    elif key == "seeds" and str(value) == AUTO:
        spec.adaptive, spec.seeds = True, None
    elif key in ("n_trials", "seeds", "retries", "jobs", "replicates", "repeats", "first_round", "round_size", "max_seeds"):
        try:
            setattr(spec, key, int(value))
        except (TypeError, ValueError):
            raise ConfigError(f"sweep.{key}={value!r}: expected an integer" + (" or auto" if key == "seeds" else "")) from None
        if key not in ("n_trials", "retries") and getattr(spec, key) < 1:
            raise ConfigError(f"sweep.{key} must be >= 1, got {value}")
        if key == "seeds":
            spec.adaptive = False
    elif key == "spending":
        if value not in SPENDINGS:
            raise ConfigError(f"unknown sweep.spending '{value}'; valid: {', '.join(SPENDINGS)}")
        spec.spending = str(value)
    elif key == "intermediate_evals":
        value = str(value).lower()
        if value not in INTERMEDIATE_EVALS:
            raise ConfigError(f"unknown sweep.intermediate_evals '{value}'; valid: {', '.join(INTERMEDIATE_EVALS)}")
        spec.intermediate_evals = value
    elif key == "launcher":
        if value not in LAUNCHERS:
            raise ConfigError(f"unknown sweep.launcher '{value}'; valid: {', '.join(LAUNCHERS)}")
        spec.launcher = str(value)
    elif key.startswith("submitit."):
        name = key.split(".", 1)[1]
        if name == "cluster" and value not in ("auto", "local", "slurm", "debug"):
            raise ConfigError(f"unknown sweep.submitit.cluster '{value}'; valid: auto, local, slurm, debug")
        spec.submitit[name] = value
    elif key in ("alpha", "equivalence", "effect"):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"sweep.{key}={value!r}: expected a number") from None
        setattr(spec, key, number)
        try:
            spec.verdict_options()
        except ValueError as err:
            raise ConfigError(str(err)) from None
    elif key == "secondary":
        texts = value if isinstance(value, list) else [value]
        if [str(t) for t in texts] in (["none"], ["null"], [""]):
            spec.secondary = []
            return
        try:
            spec.secondary = [MetricFamily(**t) if isinstance(t, dict) else MetricFamily.parse(str(t)) for t in texts]
        except (TypeError, ValueError) as err:
            shown = ",".join(map(str, texts))
            raise ConfigError(f"sweep.secondary={shown}: {err}; expected METRIC:DIRECTION[:MARGIN] "
                              f"(e.g. val/fid_domain:minimize:1.0) or none") from None
    elif key == "inference_only":
        spec.inference_only = [str(v) for v in (value if isinstance(value, list) else str(value).split(","))]
    else:
        valid = ("objective, direction, n_trials, seeds, retries, jobs, pruner, intermediate_evals, inference_only, "
                 "launcher, submitit.KEY, storage, name, alpha, equivalence, effect, replicates, repeats, first_round, "
                 "round_size, max_seeds, spending, secondary")
        raise ConfigError(f"unknown sweep option '{key}'; valid: {valid}")


def named_sweeps() -> list[str]:
    return sorted(p.stem for p in sweeps_dir().glob("*.yaml"))


def load_named(name: str) -> dict[str, Any]:
    path = sweeps_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown sweep '{name}'; valid: {', '.join(named_sweeps())}")
    return yaml.safe_load(path.read_text()) or {}


def parse(args: Sequence[str]) -> SweepSpec:
    """Build a SweepSpec from command-line overrides (and the named study they refer to)."""
    spec = SweepSpec()
    args = list(args)
    named = [a for a in args if a.startswith("sweep=")]
    lines: list[str] = []
    if named:
        study = load_named(named[-1].split("=", 1)[1])
        spec.name = named[-1].split("=", 1)[1]
        for key, value in (study.get("axes") or {}).items():
            lines.append(f"{key}={value if isinstance(value, str) else ','.join(map(str, value))}")
        lines += [str(o) for o in study.get("fixed") or []]
        for key, value in (study.get("options") or {}).items():
            _apply_option(spec, key, value)
        if "objective" in study:
            _apply_option(spec, "objective", study["objective"]["metric"])
            _apply_option(spec, "direction", study["objective"].get("direction", "minimize"))
        if "secondary" in study:
            _apply_option(spec, "secondary", study["secondary"] or "none")
        spec.description = study.get("description", "")
    lines += [a for a in args if not a.startswith("sweep=")]
    for override in parse_overrides(lines):
        key = override.key_or_group
        if key.startswith("sweep."):
            _apply_option(spec, key.split(".", 1)[1], override.value())
        elif not override.is_sweep_override():
            spec.fixed = [f for f in spec.fixed if f.split("=", 1)[0] != key] + [override.input_line]
            spec.grid.pop(key, None)
            spec.search.pop(key, None)
        elif override.value_type.name == "SIMPLE_CHOICE_SWEEP":
            spec.grid[key] = [str(v) for v in override.sweep_string_iterator()]
            spec.search.pop(key, None)
        else:
            spec.search[key] = _distribution(override)
            spec.grid.pop(key, None)
    check_secondary(spec)
    return spec


def check_secondary(spec: SweepSpec) -> None:
    """ConfigError, in one line, when the secondary families cannot be read beside the objective
    (`summary.secondary_problem`)."""
    problem = secondary_problem(spec.objective, spec.secondary, spec.adaptive)
    if problem:
        raise ConfigError(f"sweep.secondary={','.join(f.text() for f in spec.secondary)}: {problem}")


def search_space_for_tpe(spec: SweepSpec) -> dict[str, optuna.distributions.BaseDistribution]:
    """Grid axes become categorical dimensions when any axis is a real search space."""
    space = {k: optuna.distributions.CategoricalDistribution(v) for k, v in spec.grid_space().items()}
    space.update(spec.search)
    return space


def write_spec(spec: SweepSpec, path: Path) -> None:
    data = {
        "name": spec.name,
        "grid": spec.grid_space(),
        "search": {k: repr(v) for k, v in spec.search.items()},
        "fixed": spec.fixed,
        "objective": spec.objective,
        "direction": spec.direction,
        "n_trials": spec.n_trials,
        "seeds": spec.seeds,
        **({"repeats": spec.repeats} if spec.repeats > 1 else {}),
        **({"design": spec.design().to_dict()} if spec.adaptive else {}),
        "inference_only": spec.inference_only,
        "storage": spec.storage,  # None: sqlite:///<home>/optuna.db
        "verdicts": {"alpha": spec.alpha, "equivalence": spec.equivalence, "effect": spec.effect},
        "secondary": [family.to_dict() for family in spec.secondary],
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
