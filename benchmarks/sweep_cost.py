"""Where a sweep trial's wall time goes: one trial of a digits preset (digits_maskgit by default), phase by phase.

Run by hand on a quiet machine; prints one table and the ratio of the trial's wall time to its
training steps alone (a trial that is mostly training: <= 1.5x).

    python benchmarks/sweep_cost.py                        # a default sweep trial: 600 steps, final evaluation
    python benchmarks/sweep_cost.py --compare              # ... and without the token memo and final-only evaluation
    python benchmarks/sweep_cost.py trainer.max_steps=200  # any train override
    python benchmarks/sweep_cost.py experiment=digits_mage # a MAGE trial: the linear probe is one of its callbacks

Phases:
- interpreter + imports: `python -c "import lightning_mim.orchestration.training"` in a fresh process
  (what every trial process pays before its first line of work), measured separately;
- stages: the shared tokenizer (trained once per sweep, then cached) — reported, not counted in the trial;
- set-up: compose the config, build data / model / trainer, open the MLflow run and log its params;
- the Lightning hooks of the fit, timed by wrapping them: training steps (forward, loss, backward,
  optimizer), of which the frozen tokenizer's share (`to_tokens` on every image batch), validation
  steps, each callback (generation metrics with their set-up — domain classifier, real statistics —,
  pictures, checkpoints), the logger's calls (MLflow), and the rest of the loop (data loading,
  Lightning's bookkeeping) as the residual.

Why written here: Lightning's `SimpleProfiler` reports hook totals but cannot attribute a callback's
time to "evaluation" vs "pictures" or the tokenizer's share inside `training_step`; this wraps exactly
the methods whose time a trial's cost breakdown needs, in-process, and runs the real
`orchestration.training.run`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import defaultdict
from functools import wraps
from pathlib import Path

import lightning.pytorch as pl

from conditions import print_conditions

from lightning_mim.orchestration.config import compose
from lightning_mim.orchestration.stages import ensure_tokenizer
from lightning_mim.orchestration.sweep import final_evaluation_only
from lightning_mim.orchestration.training import run

CALLBACK_HOOKS = (
    "setup", "on_fit_start", "on_train_start", "on_train_batch_end", "on_validation_start", "on_validation_epoch_end",
    "on_validation_end", "on_train_epoch_end", "on_train_end", "on_fit_end",
)  # not on_save_checkpoint: it runs inside ModelCheckpoint's hooks, which are timed already
LOGGER_METHODS = ("log_metrics", "log_hyperparams", "finalize", "save")
STEP = "optimizer steps (forward, loss, backward, update)"
NESTED = "  of which: "


class PhaseTimer(pl.Callback):
    """Wraps the module's steps, every other callback's hooks and the loggers' methods with timers."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.fit_start = self.fit_end = None

    def _wrap(self, owner, name: str, label: str) -> None:
        method = getattr(owner, name, None)
        if method is None or getattr(method, "_timed", False):
            return

        @wraps(method)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.counts[label] += 1

        timed._timed = True
        setattr(owner, name, timed)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.fit_start = time.perf_counter()
        for callback in trainer.callbacks:
            if callback is not self:
                for hook in CALLBACK_HOOKS:
                    self._wrap(callback, hook, f"callback {type(callback).__name__}")
        for logger in trainer.loggers:
            for method in LOGGER_METHODS:
                self._wrap(logger, method, f"logger {type(logger).__name__}")
        # optimizer_step runs the closure (training_step + backward) inside: the training steps' total
        self._wrap(pl_module, "optimizer_step", STEP)
        self._wrap(pl_module, "training_step", NESTED + "training_step (forward + loss)")
        self._wrap(pl_module, "to_tokens", NESTED + "tokenizer on image batches (to_tokens, train + val)")
        self._wrap(pl_module, "validation_step", "validation steps")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_end = time.perf_counter()


def import_seconds() -> float:
    """Wall time of a fresh interpreter importing the train entry point (best of two)."""

    def timed(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - start

    return min(timed("import lightning_mim.orchestration.training") for _ in range(2))


def measure_trial(base: list[str], overrides: list[str], *, memo: bool) -> tuple[list[tuple[str, float, int]], float, float, int]:
    """Run one trial in this process; (rows, wall seconds, training-step seconds, steps)."""
    import lightning_mim.orchestration.training as train_module
    from lightning_mim.modules.token_memo import TokenMemo

    imports = import_seconds()
    timer = PhaseTimer()
    original, remember = train_module._instantiate_callbacks, TokenMemo.__call__
    train_module._instantiate_callbacks = lambda cfg: [*original(cfg), timer]
    if not memo:  # without the memo: the tokenizer runs on every image batch
        TokenMemo.__call__ = lambda self, images, encode: encode(images)
    try:
        cfg = compose([*base, *overrides])
        start = time.perf_counter()
        result = run(cfg)
        end = time.perf_counter()
    finally:
        train_module._instantiate_callbacks, TokenMemo.__call__ = original, remember

    fit = timer.fit_end - timer.fit_start
    rows = [("interpreter + imports (fresh process)", imports, 1)]
    rows.append(("set-up: config, data, model, trainer, MLflow run", timer.fit_start - start, 1))
    hooks = dict(timer.seconds)
    # manual optimisation (the tokenizer's GAN) never calls optimizer_step: training_step is the whole step
    training = hooks.get(STEP) or hooks.get(NESTED + "training_step (forward + loss)", 0.0)
    for label in sorted(hooks, key=lambda k: (k != STEP, not k.startswith(NESTED), k)):
        rows.append((label, hooks[label], timer.counts[label]))
    measured = sum(v for k, v in hooks.items() if not k.startswith(NESTED)) + (0.0 if STEP in hooks else training)
    rows.append(("rest of the fit: data loading, Lightning loop (residual)", fit - measured, 1))
    rows.append(("after the fit: metrics, result.json", end - timer.fit_end, 1))
    return rows, imports + (end - start), training, int(result["global_step"])


def print_table(title: str, rows, wall: float, training: float) -> None:
    print(f"\n{title}")
    print(f"{'phase':<58} {'seconds':>8} {'share':>6} {'calls':>6}")
    for label, seconds, calls in rows:
        print(f"{label:<58} {seconds:8.1f} {seconds / wall:6.1%} {calls:6d}")
    print(f"{'trial wall time':<58} {wall:8.1f}")
    print(f"training steps alone (training_step + optimizer step): {training:.1f} s; "
          f"wall / training = {wall / training:.2f}x (goal <= 1.5x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="train overrides (experiment=digits_maskgit is the default)")
    parser.add_argument("--home", default=os.environ.get("LIGHTNING_MIM_HOME", "lmim-bench"))
    parser.add_argument("--compare", action="store_true",
                        help="also run the trial without the token memo and with intermediate evaluations "
                             "(tokenizer on every batch), after a 1-step warm-up that fills the home's caches")
    args = parser.parse_args(argv)
    print_conditions()
    base = [f"paths.home={Path(args.home).resolve()}", "run_name=sweep-cost", *args.overrides]

    import torch

    start = time.perf_counter()
    ensure_tokenizer(compose(base), run)
    tokenizer = time.perf_counter() - start
    print(f"one trial: {' '.join(args.overrides) or 'experiment=digits_maskgit (defaults)'}; torch threads {torch.get_num_threads()}")
    print(f"shared tokenizer stage (once per sweep, cached after): {tokenizer:.1f} s")
    # what a grid sweep's trial runs: the final evaluation only (sweep.intermediate_evals=auto), token memo on
    now = final_evaluation_only(compose(base))
    trials = [("as a grid sweep runs it: token memo, final evaluation only", now, True)]
    if args.compare:
        start = time.perf_counter()
        run(compose([*base, "trainer.max_steps=1", "run_name=sweep-cost-warmup"]))
        print(f"warm-up (domain classifier, real statistics; once per home): {time.perf_counter() - start:.1f} s")
        trials.insert(0, ("without the memo: tokenizer on every batch, the preset's intermediate evaluations", [], False))
    walls = []
    for title, overrides, memo in trials:
        rows, wall, training, steps = measure_trial(base, overrides, memo=memo)
        print_table(f"{title} ({steps} steps)", rows, wall, training)
        walls.append(wall)
    if len(walls) == 2:
        print(f"\ntrial wall time without / with the memo and final-only evaluation: {walls[0]:.1f} / {walls[1]:.1f} s = {walls[0] / walls[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
