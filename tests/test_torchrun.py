"""Two "nodes" × one process under torchrun on loopback: `python -m lightning_mim.train trainer=torchrun`
started by two torchrun agents that meet through a c10d rendezvous on 127.0.0.1 (the command of
docs/SCALING.md). `trainer=torchrun` reads devices = LOCAL_WORLD_SIZE (1) and num_nodes =
GROUP_WORLD_SIZE (2) from torchrun's environment; Lightning must pick up TorchElasticEnvironment (no
relaunching of its own) and the run must behave like any DDP run: node ranks 0 and 1, disjoint
validation data, identical synced metrics, one run directory with one checkpoint.
"""

from __future__ import annotations

import json
import sys

import pytest
from _processes import free_port
from test_ddp import (
    assert_exact_disjoint_cover,
    assert_synced_val_metrics,
    merge_overrides,
    read_ranks,
    recorder_env,
    recorder_overrides,
    run_processes,
    val_split_hashes,
)

TIMEOUT = 180


def torchrun_command(port: int, run_id: str, module_args: list[str], *, hosts_store: bool) -> list[str]:
    """One node's agent (`torchrun` is `python -m torch.distributed.run`).

    On one machine both agents match the endpoint 127.0.0.1 and torchrun would let each try to host
    the rendezvous store and fall back to being a client; in CI that race once left neither hosting
    (both timed out connecting). `is_host` names the one host, as on a real cluster.
    """
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
        "--rdzv-conf", f"is_host={int(hosts_store)}",
        "--local-addr", "127.0.0.1",  # advertise loopback, not the host's public name
        "--max-restarts", "0",
        "-m", "lightning_mim.train", *module_args,
    ]  # fmt: skip


@pytest.mark.slow  # two agents + two workers importing torch/Lightning: ~20 s idle, ~40 s on a loaded machine
@pytest.mark.timeout(TIMEOUT + 60)
def test_two_nodes_by_torchrun_on_loopback(session_home, tiny_stage2_overrides, tmp_path):
    home, rank_dir = tmp_path / "home", tmp_path / "ranks"
    stage2 = [o for o in tiny_stage2_overrides if not o.startswith("callbacks.")]  # callbacks=none below
    args = merge_overrides(
        ["experiment=digits_maskgit", *stage2],
        "trainer=torchrun",
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
    port = free_port()
    commands = [torchrun_command(port, "lmim-test", args, hosts_store=node == 0) for node in range(2)]
    run_processes(commands, recorder_env(home), tmp_path / "logs", timeout=TIMEOUT)

    ranks = read_ranks(rank_dir, 2)
    assert sorted(r["rank"]["node_rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["rank"]["cluster_environment"] == "TorchElasticEnvironment"
        assert (r["rank"]["world_size"], r["rank"]["num_nodes"], r["rank"]["num_devices"]) == (2, 2, 1)
        assert r["rank"]["local_rank"] == 0 and r["rank"]["global_rank"] == r["rank"]["node_rank"]
        assert r["rank"]["backend"] == "gloo" and r["rank"]["num_threads"] == 1
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
