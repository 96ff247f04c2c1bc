"""Two "nodes" × one process under torchrun on loopback: `python -m lightning_mim.train trainer=ddp
trainer.num_nodes=2 trainer.devices=1` started by two torchrun agents that meet through a c10d
rendezvous on 127.0.0.1. Lightning must pick up TorchElasticEnvironment (no relaunching of its own)
and the run must behave like any DDP run: node ranks 0 and 1, disjoint validation data, identical
synced metrics, one checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from test_ddp import (
    MULTI_PROCESS,
    assert_exact_disjoint_cover,
    assert_synced_val_metrics,
    merge_overrides,
    read_ranks,
    recorder_overrides,
    val_split_hashes,
)

TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(port: int, run_id: str, module_args: list[str]) -> list[str]:
    """One node's agent (`torchrun` is `python -m torch.distributed.run`)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
        "--local-addr", "127.0.0.1",  # advertise loopback, not the host's public name
        "--max-restarts", "0",
        "-m", "lightning_mim.train", *module_args,
    ]  # fmt: skip


@MULTI_PROCESS
@pytest.mark.slow  # two agents + two workers importing torch/Lightning: ~50 s on a loaded 2-core machine
@pytest.mark.timeout(TIMEOUT + 60)
def test_two_nodes_by_torchrun_on_loopback(session_home, tiny_stage2_overrides, tmp_path):
    home, rank_dir = tmp_path / "home", tmp_path / "ranks"
    args = merge_overrides(
        ["experiment=digits_maskgit", *tiny_stage2_overrides],
        "trainer=ddp",
        "trainer.num_nodes=2",
        "trainer.devices=1",
        "trainer.accelerator=cpu",
        "run_name=torchrun-2x1",  # both nodes compose the config themselves: the name must not be `now`
        f"paths.cache_dir={session_home / 'cache'}",
        "trainer.max_steps=4",
        "data.batches_per_epoch=2",
        "data.val_batches=null",
        "trainer.limit_val_batches=null",
        "callbacks=none",
        # MLflow's SQLite store is created by whichever process opens it first; two nodes opening a fresh
        # one at once race on its schema migration (see docs/SCALING.md: use a tracking server there)
        "logger=csv",
        "trainer.enable_progress_bar=false",
        *recorder_overrides(rank_dir),
    )
    env = {**os.environ, "LIGHTNING_MIM_HOME": str(home), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(key, None)
    command = torchrun_command(free_port(), "lmim-test", args)
    logs = [open(tmp_path / f"node{n}.log", "w") for n in range(2)]
    procs = [
        subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True) for log in logs
    ]
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:  # each agent leads its own session: end it with its worker
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    tails = "\n".join(f"--- node {n}\n" + (tmp_path / f"node{n}.log").read_text()[-3000:] for n in range(2))
    assert codes == [0, 0], tails

    ranks = read_ranks(rank_dir, 2)
    assert sorted(r["rank"]["node_rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["rank"]["cluster_environment"] == "TorchElasticEnvironment"
        assert (r["rank"]["world_size"], r["rank"]["num_nodes"], r["rank"]["num_devices"]) == (2, 2, 1)
        assert r["rank"]["local_rank"] == 0 and r["rank"]["global_rank"] == r["rank"]["node_rank"]
        assert r["rank"]["backend"] == "gloo"
        assert r["global_step"] == 4 and len(r["train_batches"]) == 4
    assert ranks[0]["train_batches"][0]["samples"] != ranks[1]["train_batches"][0]["samples"]
    assert_exact_disjoint_cover(ranks, val_split_hashes(args))
    assert_synced_val_metrics(ranks)

    out = home / "runs" / "torchrun-2x1"
    assert [p.name for p in (home / "runs").iterdir()] == ["torchrun-2x1"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]
    result = json.loads((out / "result.json").read_text())
    assert result["global_step"] == 4
    assert result["metrics"]["val/loss"] == pytest.approx(ranks[0]["validations"][-1]["metrics"]["val/loss"])
