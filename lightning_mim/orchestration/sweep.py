"""`python -m lightning_mim.sweep [overrides]`: many runs, one Optuna study, one MLflow parent run.

The driver owns the Optuna trials; every trial runs as its own process (`python -m lightning_mim.train
...`, or `... .evaluate` for a model an earlier trial trained), which avoids Hydra-multirun + DDP
relaunch problems and keeps a crashing trial from taking the sweep down. The parts:

- `sweep_spec`: the command line -> a `SweepSpec` (axes, search spaces, objective, budget);
- `sweep_study`: the Optuna study, the workers' locks, recovery of dead trials, what is left to run;
- `stages`: trained models cached by a hash of their training config, so trials that differ only in
  inference-only axes (`decode.*`) evaluate one checkpoint, and a killed training resumes;
- `launchers`: where a trial's process runs (here, or a SLURM job through submitit);
- `protocol`: what the driver and a trial's process tell each other (environment, result file, phases);
- `sweep_tracking`: the MLflow parent run and what the driver adds to the trials' child runs;
- `sweep_console`: the progress bar, the final table and the report;
- this module: one trial from its point to its objective (`Sweep`), and the command (`main`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any, Sequence

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from lightning_mim.orchestration.config import ConfigError, absolutize_paths, compose, report_config_error
from lightning_mim.orchestration.fingerprint import PROTOCOL_ATTR, evaluation_protocol
from lightning_mim.orchestration.launchers import TrialFailed, die_with_parent, launch, run_local
from lightning_mim.orchestration.protocol import (
    PROGRESS_FILE,
    TRIAL_CONFIG,
    TrialContext,
    phase_reached,
    read_result,
    result_path,
    write_config,
)
from lightning_mim.orchestration.schema import config_problems, format_problem
from lightning_mim.orchestration.stages import cached
from lightning_mim.orchestration.summary import REPEATS_ATTR, SEED_ATTR, SEED_KEY, format_estimate, latest_round, round_line
from lightning_mim.orchestration.sweep_console import TrialsBar, point_name, print_summary, write_sweep_report
from lightning_mim.orchestration.sweep_spec import (
    AUTO_FIRST_ROUND,
    AUTO_MAX_SEEDS,
    AUTO_ROUND_SIZE,
    SweepSpec,
    named_sweeps,
    parse,
    write_spec,
)
from lightning_mim.orchestration.sweep_study import HEARTBEAT_SECONDS, INTERRUPTED, SweepStudy, incomplete_points
from lightning_mim.orchestration.sweep_tracking import REPEAT_TAG, SweepRuns
from lightning_mim.orchestration.tracking import redacted
from lightning_mim.sequential import RoundState
from lightning_mim.statistics import Estimate, mean_interval

__all__ = ["HEARTBEAT_SECONDS", "Sweep", "final_evaluation_only", "main", "point_name"]

HELPER_FLAG = "--helper-worker"  # what `sweep.jobs=N` adds to the workers it starts
ROUND_POLL_SECONDS = 5  # an adaptive sweep's worker waits this long between looks at the others' trials


@dataclass(frozen=True)
class Confirmation:
    """A `sweep.repeats` search's chosen configuration (trial `trial`, `params`), its mean over the
    search's seeds (`search_mean`, the best of the search: biased in its favour) and the `estimate`
    (mean ± 95 % interval) of `objective` over `fresh_seeds` the search never saw, from study `study`
    (estimate None: no fresh seed completed)."""

    study: str
    trial: int
    params: dict[str, Any]
    search_seeds: list[str]
    search_mean: float
    fresh_seeds: list[str]
    estimate: Estimate | None
    objective: str

    def line(self) -> str:
        fresh = "no fresh seed completed" if self.estimate is None else f"{format_estimate(self.estimate)} (n={self.estimate.n})"
        return (f"chosen: {point_name(self.params)} (trial {self.trial}): {self.objective} {self.search_mean:.4f} over the "
                f"search's seeds {','.join(self.search_seeds)} (the search's best: biased in its favour); on fresh seeds "
                f"{','.join(self.fresh_seeds)}: {fresh} (study {self.study})")

    def record(self) -> dict[str, Any]:
        """Plain data for MLflow and JSON."""
        estimate = self.estimate
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k != "estimate"},
                "estimate": None if estimate is None else {"mean": estimate.mean, "n": estimate.n, "low": estimate.low,
                                                            "high": estimate.high}}


def final_evaluation_keys(cfg: DictConfig) -> list[str]:
    """The keys that, set to null, leave each evaluation callback of `cfg` (metrics, pictures, probes)
    only its end-of-training run. Callbacks are not part of the model's cache key: the trained weights
    are the same either way (evaluations draw from their own seeded generators, under `fork_rng`)."""
    out = []
    for name, spec in (cfg.get("callbacks") or {}).items():
        if spec:
            out += [f"callbacks.{name}.{key}" for key in ("every_n_steps", "every_n_epochs") if spec.get(key) is not None]
    return out


def final_evaluation_only(cfg: DictConfig) -> list[str]:
    """`final_evaluation_keys` as command-line overrides (`callbacks.pictures.every_n_steps=null`)."""
    return [f"{key}=null" for key in final_evaluation_keys(cfg)]


def as_written(cfg: DictConfig, key: str) -> Any:
    """The value at dotted `key` of `cfg` as written: an interpolation stays `${...}`, a section stays
    unresolved. (Stage keys hash configs as written: `stages.stage_key`.)"""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    return OmegaConf.to_container(parent, resolve=False)[leaf]


class Sweep:
    """One sweep spec in one home: validated up front, then run trial by trial (by this worker and any
    other running the same command on the same study)."""

    def __init__(self, spec: SweepSpec, base_overrides: Sequence[str] = ()) -> None:
        self.spec = spec
        self.given_overrides = list(base_overrides)
        self.confirmation: Confirmation | None = None  # `sweep.repeats`: the chosen configuration on fresh seeds
        probe = compose([*spec.fixed, *base_overrides])
        absolutize_paths(probe)
        self._defaults = probe  # every trial's config before the point's axes (`training_view`)
        self.home = Path(probe.paths.home)
        spec.resolve_seeds(int(probe.get("sweep_seeds", 1)))  # before the study name: seeds are an axis
        spec.resolve_jobs(int(probe.get("sweep_jobs", 1)))
        self.study_name = spec.study_name()
        self.sweep_dir = self.home / "sweeps" / self.study_name
        self.base_overrides = [*base_overrides, f"paths.home={self.home}"]
        self._validate_points()  # before anything is written
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        self.storage_url = spec.storage or f"sqlite:///{self.home}/optuna.db"
        self.study = SweepStudy(spec, self.study_name, self.storage_url, self.sweep_dir)
        tracking_uri = probe.logger.tracking_uri if "tracking_uri" in probe.logger else None
        self.runs = SweepRuns(tracking_uri, str(probe.experiment_name), probe.logger.get("artifact_location"), self.study_name)
        self.runs.ensure()
        write_spec(spec, self.sweep_dir / "spec.yaml")

    def _validate_points(self) -> None:
        """Compose and check (`schema.check_config`) every grid point, or both bounds of every search
        space, up front: a bad value fails now, in one line naming the point, not in trial 7."""
        for point in self.spec.points_to_validate():
            cfg = compose([*self.spec.trial_overrides(point), *self.base_overrides])
            shown = " ".join(f"{k}={v}" for k, v in point.items())
            lines = []
            for problem in config_problems(cfg):
                line = format_problem(problem)
                if shown and not (len(point) == 1 and line.startswith(f"{problem[0]}=") and problem[0] in point):
                    line = f"{'grid point' if self.spec.is_grid else 'search space at'} {shown}: {line}"
                lines.append(line)
            if lines:
                raise ConfigError("\n".join(lines))

    # -- the study and the parent run ---------------------------------------------------------------
    def create_stores(self) -> optuna.Study:
        """Create the study, the MLflow experiment and the parent run (what a cluster driver does
        once before starting workers)."""
        study = self.study.open()
        self.parent_run_id(study)
        return study

    def parent_run_id(self, study: optuna.Study) -> str | None:
        return self.runs.parent(study, lambda: self.study.lock("parent"), self.storage_url, self.sweep_dir / "spec.yaml")

    def finish(self, study: optuna.Study) -> None:
        """Once no trial is left to run: a `sweep.repeats` search's chosen configuration re-run on fresh
        seeds (`confirm`), then the parent run's aggregates over every trial of the study."""
        self.confirmation = self.confirm(study)
        parent = self.parent_run_id(study)
        if parent:
            self.runs.finish_parent(study, parent, self.spec)
            if self.confirmation is not None:
                self.runs.log_confirmation(parent, self.confirmation.record())

    def confirm(self, study: optuna.Study) -> Confirmation | None:
        """`sweep.repeats=N`: the configuration with the best mean over its N seeds, trained again with N
        fresh seeds in a study of its own (`SweepSpec.confirmation_spec`; a rerun resumes it): the
        estimate to quote, since the mean that won the search is biased in its favour. None without
        repeats or without a complete trial."""
        if not self.spec.repeat_seeds() or not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return None
        chosen = study.best_trial
        print(f"the chosen configuration (trial {chosen.number}, {point_name(chosen.params)}) on fresh seeds:", flush=True)
        again = Sweep(self.spec.confirmation_spec(chosen.params), self.given_overrides)
        values = [t.value for t in again.run() if t.state == TrialState.COMPLETE]
        estimate = mean_interval(values) if values else None
        return Confirmation(again.study_name, chosen.number, dict(chosen.params), self.spec.repeat_seeds(), float(chosen.value),
                            again.spec.grid_space().get(SEED_KEY, []), estimate, self.spec.objective)

    def run(self, finish: bool = True) -> list[optuna.trial.FrozenTrial]:
        """Run trials until the study is done (an adaptive sweep: round after round, until its design
        stops adding seeds); with `finish`, then write the parent run's aggregates (a `sweep.jobs` helper
        worker leaves that to the command that started it)."""
        study = self.study.open()
        self.study.recover(study, self.runs.end_dead_runs)
        parent = self.parent_run_id(study)
        todo = self.study.remaining(study)
        if self.spec.adaptive:
            looks = ", ".join(map(str, self.spec.design().looks))
            print(f"sweep {self.study_name}: seeds in rounds (looks at {looks} seeds a point), "
                  f"{self.total_trials(study)} trials asked for so far, {todo} to run (storage {redacted(self.storage_url)})")
            self._show_rounds(study)  # a resumed sweep's rounds so far
        else:
            print(f"sweep {self.study_name}: {self.total_trials(study)} trials in all, {todo} to run (storage {redacted(self.storage_url)})")
        while True:
            if self.study.remaining(study) > 0:
                self._run_trials(study, self.total_trials(study), parent)
            if not (self.spec.adaptive and self._next_round(study)):
                break
        if finish:
            self.finish(study)
        return study.get_trials(deepcopy=False)

    def total_trials(self, study: optuna.Study) -> int:
        """The trials of the whole sweep: every grid point, the search budget, or what an adaptive
        sweep's rounds have asked for so far."""
        if self.spec.adaptive:
            return len(self.study.wanted_points(study))
        return len(self.spec.grid_points()) if self.spec.is_grid else self.spec.total_trials()

    def _next_round(self, study: optuna.Study) -> bool:
        """An adaptive sweep whose queued trials are all taken: retry the round's failed trials
        (`sweep.retries`), wait for the other workers' trials of this round, then decide the round
        (`SweepStudy.decide_round`, one worker under a lock) and show it, whichever worker decided.
        True when there are trials to run (the next round, or a retry), False once the design is done."""
        while True:
            self.study.recover(study, self.runs.end_dead_runs)  # queues the retries and a dead driver's redo
            if self.study.remaining(study) > 0:
                self._show_rounds(study)
                return True
            if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # another worker's
                time.sleep(ROUND_POLL_SECONDS)
                continue
            state = self.study.decide_round(study)  # None: decided by another worker, or a trial ended meanwhile
            if state is not None:
                phase_reached("decided", look=state.look)
            rounds = self._show_rounds(study)
            if rounds and rounds[-1].finished:
                return False

    def _show_rounds(self, study: optuna.Study) -> list[RoundState]:
        """Print the rounds decided since this worker last looked (by it or another worker sharing the
        study: every worker's console shows every round); the study's rounds."""
        rounds = self.study.rounds(study)
        for state in rounds[self._rounds_shown:]:
            print(round_line(state), flush=True)
        self._rounds_shown = len(rounds)
        return rounds

    _rounds_shown = 0

    def _run_trials(self, study: optuna.Study, total: int, parent: str | None) -> None:
        """Ask/tell loop: a trial is asked under the study's lock only while points remain, so concurrent
        workers never create a duplicate; a heartbeat thread lets Optuna fail the trials of a worker that
        died on another node. The bar shows every running trial's phase (from the trials' progress files)
        and an ETA from the trials this worker finished."""
        done = total - self.study.remaining(study)
        with TrialsBar(self.sweep_dir, total, done, self.spec.jobs) as bar:
            self._bar = bar
            while (asked := self.study.ask(study)) is not None:
                trial, params, remaining = asked
                bar.trial_started(remaining)
                with self.study.heartbeat(trial):
                    state, value = self._run_trial(trial, params, parent)
                study.tell(trial, value, state=state)
                shown = "" if value is None else f" {self.spec.objective}={value:.4g}"
                running = sum(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
                bar.trial_ended(f"trial {trial.number} {state.name.lower()}{shown} {point_name(params)}",
                                done=max(0, total - self.study.remaining(study) - running))  # all workers
            self._bar = None

    _bar: TrialsBar | None = None

    def _refresh_console(self) -> None:
        if self._bar is not None:
            self._bar.refresh()

    # -- one trial ----------------------------------------------------------------------------------
    def _run_trial(self, trial: optuna.Trial, params: dict[str, Any], parent: str | None) -> tuple[TrialState, float | None]:
        try:
            return TrialState.COMPLETE, self.objective(trial, params, parent)
        except optuna.TrialPruned:
            return TrialState.PRUNED, None
        except KeyboardInterrupt:
            trial.set_user_attr("error", INTERRUPTED)
            trial.study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as err:  # recorded, reported at the end; the sweep goes on
            if "error" not in trial.user_attrs:
                trial.set_user_attr("error", f"{type(err).__name__}: {err}"[-2000:])
            return TrialState.FAIL, None

    def objective(self, trial: optuna.Trial, params: dict[str, Any], parent_run_id: str | None) -> float:
        """Train (or reuse) and evaluate the model of `params`; the objective's value. With
        `sweep.repeats=N` the configuration is trained with each of the seeds 0..N-1 (one after the
        other, each in `trial-<n>/seed-<s>/`, each an MLflow run of its own) and the value is their mean;
        the per-seed metrics are kept (`REPEATS_ATTR`) so the summary reads the N seeds as a point's seeds."""
        trial.set_user_attr("host", socket.gethostname())
        if self.spec.trained_seed(params) is not None:
            trial.set_user_attr(SEED_ATTR, self.spec.trained_seed(params))  # the summary pairs points by it
        trial.set_user_attr("pid", os.getpid())
        trial_dir = self.sweep_dir / f"trial-{trial.number:04d}"
        seeds = self.spec.repeat_seeds()
        if not seeds:
            return self._measure(trial, params, trial_dir, parent_run_id)[self.spec.objective]
        by_seed = {seed: self._measure(trial, {**params, SEED_KEY: seed}, trial_dir, parent_run_id, repeat=seed) for seed in seeds}
        trial.set_user_attr(REPEATS_ATTR, by_seed)
        shared = set.intersection(*(set(m) for m in by_seed.values()))
        trial.set_user_attr("metrics", {name: fmean(m[name] for m in by_seed.values()) for name in sorted(shared)})
        return fmean(m[self.spec.objective] for m in by_seed.values())

    def _measure(self, trial: optuna.Trial, params: dict[str, Any], trial_dir: Path, parent_run_id: str | None,
                 repeat: str | None = None) -> dict[str, float]:
        """The metrics of one model: the config at `params` trained (or reused) and evaluated in
        `trial_dir` (`trial_dir/seed-<repeat>` for one of a trial's repeats, whose MLflow run is tagged
        with it), checked to hold a finite objective, which is logged to that MLflow run."""
        tags = {"lightning_mim.role": "trial", "lightning_mim.study": self.study_name, "optuna.trial_number": str(trial.number)}
        if repeat is not None:
            tags[REPEAT_TAG] = repeat
        context = TrialContext(parent_run_id=parent_run_id, tags=tags, progress_file=str(trial_dir / PROGRESS_FILE),
                               objective=self.spec.objective)  # the bar reads trial-<n>/progress, whichever repeat runs
        model_dir = trial_dir if repeat is None else trial_dir / f"seed-{repeat}"
        phase_reached("asked", trial=trial.number, progress_file=context.progress_file)
        run_name = point_name(params) or f"trial-{trial.number:03d}"  # MLflow shows children by their point
        try:
            metrics, checkpoint = self._train_or_reuse(trial, params, model_dir, run_name, context)
            trial.set_user_attr("checkpoint", checkpoint)  # the report finds the model's pictures beside it
        except optuna.TrialPruned:
            raise  # the training process already tagged its MLflow run optuna.state=PRUNED
        except Exception as err:
            trial.set_user_attr("error", str(err)[-2000:])
            self.runs.record_failed_run(trial.number, run_name, parent_run_id, tags, params, str(err))
            raise
        if repeat is None:
            trial.set_user_attr("metrics", metrics)
        if self.spec.objective not in metrics:
            raise TrialFailed(f"objective '{self.spec.objective}' not among the trial's metrics: {', '.join(sorted(metrics))}")
        value = metrics[self.spec.objective]
        if value != value:  # NaN
            raise TrialFailed(f"objective '{self.spec.objective}' is NaN")
        phase_reached("logging", trial=trial.number, progress_file=context.progress_file)
        self.runs.log_objective(trial.number, self.spec.objective, value, repeat=repeat)
        return metrics

    def trial_config(self, params: dict[str, Any], run_name: str) -> DictConfig:
        """The config of the trial at point `params`, composed and checked once, here: what its process
        runs (written to the trial's directory) and what its stage-cache key comes from. Evaluations
        before the last step are dropped unless the sweep prunes (`sweep.intermediate_evals`)."""
        cfg = compose([*self.spec.trial_overrides(params), *self.base_overrides])
        absolutize_paths(cfg)
        if not self.spec.keeps_intermediate_evals():
            for key in final_evaluation_keys(cfg):
                OmegaConf.update(cfg, key, None, merge=False)
        cfg.run_name = run_name
        return cfg

    def training_view(self, cfg: DictConfig, params: dict[str, Any]) -> DictConfig:
        """`cfg` as its trained model sees it: each inference-only axis of the point (`decode.steps`)
        back at the value it has without the sweep's axes. Trials that differ only there share this
        view's stage-cache key, so one model is trained and the others evaluate it."""
        view = copy.deepcopy(cfg)
        for key in params:
            if self.spec.is_inference_only(key):
                OmegaConf.update(view, key, as_written(self._defaults, key), merge=False)
        return view

    def _train_or_reuse(
        self, trial: optuna.Trial, params: dict[str, Any], trial_dir: Path, run_name: str, context: TrialContext
    ) -> tuple[dict[str, float], str]:
        """Train the stage-2 model for these training settings once (the stage cache); evaluate it for
        the rest. A pruned training is not marked done: the next trial with the same settings resumes it.
        Returns (the trial's metrics, the trained checkpoint)."""
        cfg = self.trial_config(params, run_name)
        trial.set_user_attr(PROTOCOL_ATTR, evaluation_protocol(cfg))  # numbers of two protocols are never pooled
        config_file = trial_dir / TRIAL_CONFIG
        phase = dict(trial=trial.number, progress_file=context.progress_file)

        def train(stage_dir: Path) -> dict[str, Any]:
            cfg.paths.output_dir, cfg.ckpt_path = str(stage_dir), "last"  # a killed training resumes
            write_config(cfg, config_file)
            pruning = dict(storage=self.storage_url, study=self.study_name, trial_id=self.study.trial_id(trial),
                           monitor=self.spec.objective, pruner=self.spec.effective_pruner())
            env = dataclasses.replace(context, pruning=pruning).environment()
            self._launch([sys.executable, "-m", "lightning_mim.train", f"--config={config_file}"], trial_dir / "train.log", env, cfg)
            phase_reached("exited", **phase)
            result = read_result(result_path(stage_dir))
            if result.get("pruned_at_step") is not None:
                raise optuna.TrialPruned(f"pruned at step {result['pruned_at_step']}")
            return {**result, "trained_by": run_name}

        trained, trained_now = cached(str(cfg.choices.get("model", "model")), self.training_view(cfg, params), train)
        if trained_now:
            phase_reached("recorded", **phase)
            return trained["metrics"], trained["checkpoint"]
        # A checkpoint trained by an earlier trial: evaluate it at this trial's inference settings.
        cfg.paths.output_dir = str(trial_dir)
        write_config(cfg, config_file)
        result_file = result_path(trial_dir)
        args = [sys.executable, "-m", "lightning_mim.evaluate", f"ckpt={trained['checkpoint']}", f"config={config_file}",
                f"result_file={result_file}"]
        self._launch(args, trial_dir / "evaluate.log", context.environment(), cfg)
        phase_reached("exited", **phase)
        evaluated = read_result(result_file)
        return {**trained["metrics"], **evaluated["metrics"]}, trained["checkpoint"]

    def _launch(self, args: list[str], log_path: Path, env: dict[str, str], cfg: DictConfig) -> None:
        launch(self.spec.launcher, args, log_path, env, cfg, self.spec.submitit_options(), self._refresh_console)


HELP = """usage: python -m lightning_mim.sweep [sweep=NAME] [AXIS=a,b,c ...] [KEY=VALUE ...] [sweep.OPTION=VALUE ...]

  AXIS=a,b,c                       grid axis (cartesian product with the other axes)
  KEY=choice(a,b) | range(lo,hi) | interval(lo,hi) | tag(log,interval(lo,hi))
                                   Optuna search space (TPE), needs sweep.n_trials=N
  KEY=VALUE                        fixed override for every trial (any train config key)
  sweep=NAME                       named study from sweeps/NAME.yaml: {names}
  sweep.objective=val/fid_domain   metric to optimise (sweep.direction=minimize|maximize)
  sweep.seeds=3                    train every grid point with seeds 0..2 (default: the preset's sweep_seeds,
                                   3 for digits_*, 1 for imagenet256_*); the table shows mean ± 95 % CI and
                                   compares every pair of points, paired by seed, Holm-adjusted
  sweep.seeds=auto                 seeds in rounds, only where a comparison is still open: a first round of
                                   sweep.first_round={first} seeds a point, then sweep.round_size={size} more for the
                                   points in an open pair, up to sweep.max_seeds={most}; a group-sequential test
                                   (sweep.spending=obrien_fleming|pocock) keeps the error rate over the rounds
  sweep.alpha=0.05                 the family-wise error rate of the table's verdicts
  sweep.equivalence=DELTA          a margin in objective units, chosen before the sweep: a pair can also end
                                   "equivalent" (two one-sided tests); without it, only "different" or "open"
  sweep.effect=DELTA               the difference the seeds-needed estimate of an open pair is for
                                   (default: the observed one, marked ~)
  sweep.replicates=2               an A/A check: every point twice, on disjoint seeds (needs sweep.seeds >= 2)
  sweep.repeats=3                  search spaces: train every suggested configuration with seeds 0..2 and
                                   tell TPE their mean; the chosen one is re-run on seeds 3..5 (its estimate)
  sweep.jobs=2                     run 2 trials at once on this machine (worker processes sharing the study,
                                   the cores shared out; default: the preset's sweep_jobs, 2 for digits_*)
  sweep.pruner=median              prune trials on the objective's intermediate values: auto (median for
                                   search spaces, none for grids), none, median, percentile, hyperband
  sweep.intermediate_evals=auto    evaluations before a trial's last step: auto (only when a pruner
                                   reads them), true, false; the final evaluation always runs
  sweep.inference_only=decode.     axes that reuse one trained checkpoint (default: decode.*)
  sweep.launcher=submitit          run each trial as a SLURM job through submitit (default: local processes);
                                   sweep.submitit.cluster=local|slurm|auto, sweep.submitit.KEY=VALUE for
                                   AutoExecutor.update_parameters (timeout_min, slurm_partition, mem_gb, ...)
  sweep.storage=URL                Optuna RDB storage (default sqlite:///<paths.home>/optuna.db;
                                   postgresql://... for workers on several nodes)

Rerunning the same command resumes the study. Several workers may run the same command at once
(on a cluster, run it once with --prepare-only first to create the study and the MLflow parent run).
"""


def train_shared_stages(sweep: Sweep) -> None:
    """Train the stages every trial shares (today: the tokenizer) once, with all the cores, before
    several workers start: otherwise one worker trains it on one core while the others wait for it."""
    first = sweep.spec.grid_points()[0] if sweep.spec.is_grid else sweep.spec.points_to_validate()[0]
    cfg = compose([*sweep.spec.trial_overrides(first), *sweep.base_overrides])
    if "tokenizer" not in cfg.get("model", {}) or cfg.tokenizer.get("ckpt") or sweep.spec.launcher != "local":
        return  # nothing to train, or trials run as jobs elsewhere (not on the submitting node)
    log = sweep.sweep_dir / "stages.log"
    print(f"shared stages first (the tokenizer, all cores; cached after the first sweep; log {log})", flush=True)
    args = [sys.executable, "-m", "lightning_mim.train", "--stages-only", *sweep.spec.trial_overrides(first), *sweep.base_overrides]
    run_local(args, log, dict(os.environ))


def start_local_workers(sweep: Sweep, argv: Sequence[str], jobs: int) -> list[subprocess.Popen]:
    """`sweep.jobs=N`: N-1 more workers of this same sweep on this machine (the multi-worker path of a
    cluster, on one host), so N trials train at once. The caller has created the study and the MLflow
    parent run (`Sweep.create_stores`), so the workers do not race for them. Unless OMP_NUM_THREADS is set, the cores are shared out:
    tiny models use one core better than two (digits MaskGIT: two one-core trials train 1.25x faster than
    one two-core trial), so N trials at cores/N threads beat one trial on all the cores."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    args = [sys.executable, "-m", "lightning_mim.sweep", *(a for a in argv if not a.startswith("sweep.jobs=")), "sweep.jobs=1",
            HELPER_FLAG]
    workers = []
    for index in range(1, jobs):
        with open(sweep.sweep_dir / f"worker-{index}.log", "ab") as log:
            workers.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent))
    return workers


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(HELP.format(names=", ".join(named_sweeps()) or "(none)", first=AUTO_FIRST_ROUND, size=AUTO_ROUND_SIZE,
                          most=AUTO_MAX_SEEDS))
        return 0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    SweepStudy.quiet_heartbeat_warnings()
    warnings.filterwarnings("ignore", message=".*is experimental.*")
    prepare_only = "--prepare-only" in argv
    helper = HELPER_FLAG in argv  # started by `sweep.jobs=N`: runs trials, leaves the summary to its starter
    argv = [a for a in argv if a not in ("--prepare-only", HELPER_FLAG)]
    try:
        spec = parse(argv)
        sweep = Sweep(spec)
    except ConfigError as err:
        return report_config_error(err)
    if prepare_only:
        sweep.create_stores()
        print(f"prepared study {sweep.study_name} in {redacted(sweep.storage_url)}")
        return 0
    start = time.time()
    workers: list[subprocess.Popen] = []
    try:
        # helpers (and the shared stages first) only when there is work: a finished sweep's rerun needs none
        if spec.jobs > 1 and sweep.study.has_work(sweep.create_stores()):
            train_shared_stages(sweep)
            workers = start_local_workers(sweep, argv, spec.jobs)
        trials = sweep.run(finish=not (helper or workers))
        if helper:
            return 0
        if workers:
            print(f"waiting for {len(workers)} more worker(s) to finish their trials (logs: {sweep.sweep_dir}/worker-*.log)")
            for worker in workers:
                worker.wait()
            study = sweep.study.open()
            sweep.finish(study)  # the helpers' trials are in now: the parent run's aggregates cover every trial
            trials = study.get_trials(deepcopy=False)
    except KeyboardInterrupt:
        for worker in workers:
            worker.send_signal(signal.SIGINT)
        for worker in workers:
            worker.wait()
        print("\ninterrupted: the study is saved; rerun the same command to resume", file=sys.stderr)
        return 130
    study = sweep.study.open()
    print_summary(spec, sweep.study_name, sweep.storage_url, trials, sweep.runs, latest_round(study.user_attrs))
    if sweep.confirmation is not None:
        print(sweep.confirmation.line())
    write_sweep_report(sweep.home, sweep.study_name, sweep.runs.tracking_uri)
    print(f"wall time {time.time() - start:.0f} s")
    missing = incomplete_points(spec, trials, sweep.study.wanted_points(study) if spec.adaptive else None)
    if missing:  # the last line says so; 2 stays for bad input
        print(f"incomplete: {len(missing)} point(s) without a result: {'; '.join(missing)} "
              "(rerun the same command to retry them)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
