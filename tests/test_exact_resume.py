"""Exact resume: a run killed by SIGKILL and resumed with `ckpt_path=last` ends where the uninterrupted
run ends (same step, weights and metrics; same machine and threads), and its building blocks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_module

from lightning_mim.data.pipeline import FixedBatches

TESTS = Path(__file__).parent
# 2.4 epochs of 5 batches, a checkpoint after every step; the loss, masks and dropout all draw randomness
BUDGET = ["trainer.max_steps=12", "data.batches_per_epoch=5", "checkpoint_every_n_steps=1", "logger=csv",
          "transformer.dropout=0.1", "callbacks.pictures=null"]


def _final(home: Path, run_name: str) -> tuple[dict, dict]:
    out = home / "runs" / run_name
    result = json.loads((out / "result.json").read_text())
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return result, state


@pytest.fixture(scope="module")
def uninterrupted(tiny_stage2_overrides, tmp_path_factory):
    """The uninterrupted run of a setting, trained once per setting: home -> (result, checkpoint)."""
    done: dict[tuple[str, ...], tuple[Path, tuple[dict, dict]]] = {}

    def run(extra: list[str]):
        if tuple(extra) not in done:
            home = tmp_path_factory.mktemp("resume-home")
            run_module("lightning_mim.train", [*tiny_stage2_overrides, *BUDGET, *extra, "run_name=full"], home)
            done[tuple(extra)] = home, _final(home, "full")
        return done[tuple(extra)]

    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kill_after", "extra"),
    [(5, []), (8, []), (8, ["data.train_augment.hflip=true"])],  # augmented: every sample's flip is seeded
    ids=["at-an-epoch-boundary", "mid-epoch", "mid-epoch-augmented"],
)
def test_sigkill_then_resume_equals_the_uninterrupted_run(uninterrupted, tiny_stage2_overrides, kill_after, extra):
    home, (full_result, full_state) = uninterrupted(extra)
    name = f"killed-{kill_after}"
    args = [*tiny_stage2_overrides, *BUDGET, *extra, f"run_name={name}"]
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    killed = run_module("lightning_mim.train", [*args, "+callbacks.killer._target_=_killer.KillAtStep",
                        f"+callbacks.killer.step={kill_after}"], home, env=env, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: no clean-up ran
    saved = torch.load(home / "runs" / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == kill_after - 1  # the step it died in was never saved
    run_module("lightning_mim.train", [*args, "ckpt_path=last"], home)
    result, state = _final(home, name)
    assert result["global_step"] == full_result["global_step"] == 12
    for key, value in full_state["state_dict"].items():
        assert torch.equal(state["state_dict"][key], value), key
    for key in ("val/loss", "val/fid_domain", "val/cas"):
        assert result["metrics"][key] == full_result["metrics"][key], key


def test_fixed_batches_resume_replays_the_epoch_from_the_batch():
    """The loader alone: epoch e from batch b equals the uninterrupted pass's batches b.. of epoch e."""

    class Stream:
        """An endless stream whose content depends on the epoch counter, like the seeded shard pipeline."""

        def __init__(self, epoch):
            self.epoch = epoch
            self.generator = torch.Generator().manual_seed(3)

        def __iter__(self):
            base = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator)) % 1000
            return iter([(self.epoch.value, base, i) for i in range(100)])

    from lightning_mim.data.pipeline import _Epoch

    def loader():
        epoch = _Epoch()
        return FixedBatches(Stream(epoch), 4, epoch)

    full = loader()
    passes = [list(full) for _ in range(3)]
    resumed = loader()
    resumed.resume(epoch=1, batches_done=3)
    assert list(resumed) == passes[1][3:]
    assert list(resumed) == passes[2]
    with pytest.raises(ValueError, match="cannot resume"):
        resumed.resume(epoch=0, batches_done=5)


@pytest.mark.slow  # three 2-process runs: ~100 s on a loaded 2-core machine
@pytest.mark.timeout(600)
def test_two_rank_ddp_sigkill_then_resume_equals_the_uninterrupted_run(session_home, tiny_stage2_overrides, tmp_path):
    """Both ranks die by SIGKILL after step 5 (mid-epoch: epochs of 3 batches per rank); each rank gets
    its own generators and its own stream position back, and the resumed run ends as the uninterrupted one."""
    from _processes import child_env, run_processes
    from test_ddp import ddp_overrides, train_command

    home = tmp_path / "home"
    env = child_env(home)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)

    def args(name: str, *more: str) -> list[str]:
        return ddp_overrides(tiny_stage2_overrides, session_home, f"run_name={name}", "trainer.max_steps=8",
                             "data.batches_per_epoch=3", "checkpoint_every_n_steps=1", "logger=csv",
                             "transformer.dropout=0.1", "callbacks.pictures=null", *more)

    run_processes([train_command(args("full"))], env, tmp_path / "full", timeout=240)
    killer = ["+callbacks.killer._target_=_killer.KillAtStep", "+callbacks.killer.step=5"]
    run_processes([train_command(args("killed", *killer))], env, tmp_path / "killed", timeout=240, expected_codes=[-9])
    saved = torch.load(home / "runs" / "killed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4 and len(saved["exact_resume"]["rng"]) == 2  # one generator set per rank
    run_processes([train_command(args("killed", "ckpt_path=last"))], env, tmp_path / "resumed", timeout=240)
    full_result, full_state = _final(home, "full")
    result, state = _final(home, "killed")
    assert result["global_step"] == full_result["global_step"] == 8
    for key, value in full_state["state_dict"].items():
        assert torch.equal(state["state_dict"][key], value), key
    for key in ("val/loss", "val/fid_domain", "val/cas"):
        assert result["metrics"][key] == full_result["metrics"][key], key
