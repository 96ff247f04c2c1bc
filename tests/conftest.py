"""Shared fixtures: one tiny trained tokenizer and one home directory per test session.

End-to-end tests run the real entry points (`python -m lightning_mim.train`, `... .sweep`) in
subprocesses on tiny budgets. They share a session home so the digits shards, the tiny tokenizer and
the digits domain classifier are built once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tiny models on few cores: one intra-op thread avoids OpenMP spin-waiting between processes that
# share the cores (sweep workers, DDP ranks); subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Small enough that a stage-2 trial takes seconds on one CPU core.
TINY_STAGE2 = [
    "sweep_seeds=1",  # sweeps in tests run one seed per point unless they ask for more (sweep.seeds=N)
    "sweep_jobs=1",  # ... and one trial at a time unless they ask for more (sweep.jobs=N)
    "transformer.width=32",
    "transformer.depth=1",
    "transformer.heads=2",
    "transformer.mlp_dim=64",
    "trainer.max_steps=6",
    "data.batches_per_epoch=3",
    "data.val_batches=1",
    "trainer.limit_val_batches=1",
    "evaluation.num_samples=20",
    "evaluation.batch_size=20",
    "decode.steps=4",
    "checkpoint_every_n_steps=3",
    "callbacks.pictures.per_class=2",
    "callbacks.pictures.progression_samples=2",
]


def run_module(module: str, args: list[str], home: Path, *, env: dict | None = None, timeout: int = 600, check: bool = True):
    """Run `python -m module args` with LIGHTNING_MIM_HOME=home; returns the CompletedProcess."""
    full_env = {**os.environ, "LIGHTNING_MIM_HOME": str(home), "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lmim-home")


@pytest.fixture(scope="session")
def tiny_tokenizer(session_home: Path) -> Path:
    """A tiny tokenizer trained for a few steps through the real train entry point."""
    out = session_home / "runs" / "tiny-tokenizer"
    run_module(
        "lightning_mim.train",
        [
            "experiment=digits_tokenizer",
            "run_name=tiny-tokenizer",
            "trainer.max_steps=4",
            "data.batches_per_epoch=2",
            "trainer.limit_val_batches=1",
            "logger=csv",
        ],
        session_home,
    )
    result = json.loads((out / "result.json").read_text())
    return Path(result["checkpoint"])


@pytest.fixture(scope="session")
def tiny_stage2_overrides(tiny_tokenizer: Path) -> list[str]:
    return [*TINY_STAGE2, f"tokenizer.ckpt={tiny_tokenizer}"]


# Module-scoped fixtures too expensive to build twice (a 6-trial sweep, the uninterrupted reference runs).
# The suite runs on 2 pytest-xdist workers with `--dist loadgroup` (README "Tests"): every test that uses
# one of these is put in that fixture's group, so one worker builds it once and runs all of its readers.
# (tryfirst: xdist reads the marks in its own collection hook, which would otherwise run before this one.)
SHARED_FIXTURES = ("grid_sweep", "uninterrupted")
# The modules of the slowest tests (whole sweeps and trainings in subprocesses, minutes each), run first:
# longest first, the two workers end close together instead of one running a long test alone at the end.
SLOW_FIRST = ("test_sweep_e2e.py", "test_digits_learning.py", "test_postgres_sweep.py", "test_submitit.py",
              "test_exact_resume.py", "test_train_cli.py", "test_ddp.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in SHARED_FIXTURES:
            if name in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(name))
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: file order otherwise


@pytest.fixture(autouse=True)
def _reset_lightning_rank():
    """Tests that build trainers under a faked cluster environment (RANK=1, SLURM_PROCID=1) leave
    Lightning's process-global `rank_zero_only.rank` at 1, after which every logger in this process
    behaves as a non-zero rank (no MLflow run). Restore it after each test."""
    yield
    from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    rank_zero_only.rank = 0
    fabric_rank_zero_only.rank = 0


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: tiny CPU kernels on a shared 2-core machine run up to
    ~10x faster than on two. Test modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def quiet_trainer(tmp_path: Path):
    """Factory for a `pl.Trainer` that writes and prints nothing a test did not ask for: no logger,
    checkpoints, progress bar or model summary; root dir `tmp_path`. Keyword arguments add or override."""
    import lightning.pytorch as pl

    def make(**kwargs) -> pl.Trainer:
        quiet = dict(
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        return pl.Trainer(**{**quiet, **kwargs})

    return make
