"""Scale-out on CPU: `trainer=ddp` with 2 gloo processes end to end, the trainer configs (ddp, torchrun,
slurm) against Lightning's cluster environments, per-rank seeds, and the global batch of the lr rule.

The end-to-end run records what every rank saw with `RankDataRecorder` (tests/_rank_recorder.py, one JSON
per rank) and checks: disjoint data, a falling loss, identical synced metrics, different random
draws per rank, one checkpoint, one MLflow run. Multi-process runs go through `run_processes`: one
thread per rank, a hard timeout, and on a hang every rank's stack in the failure message (never a stuck CI).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

RECORDER = "_rank_recorder.RankDataRecorder"  # a test helper: the ranks import it from tests/ (`recorder_env`)
TESTS_DIR = Path(__file__).resolve().parent


from _decode import decode_config  # noqa: E402
from _processes import CHILD_ENV, LAUNCHER_ENV, ProcessesHung, child_env, free_port, run_processes  # noqa: E402,F401


def train_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "lightning_mim.train", *args]


def merge_overrides(base: list[str], *changes: str) -> list[str]:
    """`base` with some `key=value` overrides replaced or added (Hydra rejects a key given twice)."""
    out = {o.split("=", 1)[0]: o for o in base}
    for change in changes:
        out[change.split("=", 1)[0]] = change
    return list(out.values())


def recorder_overrides(out_dir: Path) -> list[str]:
    """Overrides that add `RankDataRecorder` writing to `out_dir`; run them with `recorder_env`."""
    return [f"+callbacks.rank_data._target_={RECORDER}", f"+callbacks.rank_data.out_dir={out_dir}"]


def recorder_env(home: Path) -> dict[str, str]:
    """`child_env(home)` with tests/ first on PYTHONPATH, so every rank can import the recorder."""
    env = child_env(home)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH")) if p)
    return env


def read_ranks(out_dir: Path, world: int) -> list[dict]:
    files = sorted(out_dir.glob("rank*.json"))
    assert [f.name for f in files] == [f"rank{r}.json" for r in range(world)]
    return [json.loads(f.read_text()) for f in files]


def val_split_hashes(overrides: list[str]) -> list[str]:
    """Hashes of every sample of the val split, read in this process (rank 0 of 1) with the run's data config."""
    from hydra.utils import instantiate

    from _rank_recorder import sample_hashes
    from lightning_mim.orchestration.config import absolutize_paths, compose

    cfg = compose(overrides)
    absolutize_paths(cfg)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("validate")
    hashes: list[str] = []
    for images, _ in datamodule.val_dataloader():
        hashes += sample_hashes(images)
    return hashes


def assert_synced_val_metrics(ranks: list[dict]) -> None:
    """Every validation: the same `val/*` values on every rank (train/* are rank-local by design)."""
    assert len({len(r["validations"]) for r in ranks}) == 1
    for checks in zip(*(r["validations"] for r in ranks)):
        vals = [{k: v for k, v in c["metrics"].items() if k.startswith("val/")} for c in checks]
        assert vals[0] and all(v == vals[0] for v in vals), vals


def assert_exact_disjoint_cover(ranks: list[dict], expected: list[str]) -> None:
    assert len(expected) == len(set(expected)) == 200  # digits val: 20 per class
    for checks in zip(*(r["validations"] for r in ranks)):
        seen = [set(c["samples"]) for c in checks]
        assert all(len(c["samples"]) == len(s) for c, s in zip(checks, seen))  # no sample twice on one rank
        assert not set.intersection(*seen)
        assert set.union(*seen) == set(expected)


# ------------------------------------------------------------------------------------ fast checks


def test_sample_hashes_identify_samples():
    from _rank_recorder import sample_hashes

    x = torch.rand(4, 3, 8, 8)
    h = sample_hashes(x)
    assert len(h) == 4 and len(set(h)) == 4 and all(len(s) == 16 for s in h)
    assert sample_hashes(x.clone()) == h
    assert sample_hashes(x[[2, 0]]) == [h[2], h[0]]
    assert sample_hashes(torch.arange(12).view(3, 4)) != sample_hashes(torch.arange(12).view(3, 4) + 1)


def test_per_rank_seed_keeps_rank_zero_and_separates_ranks():
    from lightning_mim.callbacks import PerRankSeed

    draws = []
    for rank in (0, 1, 2):
        callback = PerRankSeed(seed=7)
        callback.setup(SimpleNamespace(global_rank=rank), None, "fit")
        assert callback.applied == 7 + rank  # MAE/MAGE: seed + rank
        draws.append(torch.rand(5))
    torch.manual_seed(7)
    assert torch.equal(draws[0], torch.rand(5))  # rank 0 = a single-process run
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def test_ddp_config_is_lightning_ddp():
    from lightning_mim.orchestration.config import compose

    cfg = compose(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2 and cfg.trainer.num_nodes == 1


def test_torchrun_config_reads_the_launchers_world(monkeypatch):
    from omegaconf import OmegaConf

    from lightning_mim.orchestration.config import compose

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc-per-node 4
    monkeypatch.setenv("GROUP_WORLD_SIZE", "3")  # torchrun --nnodes 3
    trainer = OmegaConf.to_container(compose(["trainer=torchrun"]).trainer, resolve=True)
    assert (trainer["devices"], trainer["num_nodes"], trainer["strategy"]) == (4, 3, "ddp")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("GROUP_WORLD_SIZE")
    trainer = OmegaConf.to_container(compose(["trainer=torchrun"]).trainer, resolve=True)
    assert (trainer["devices"], trainer["num_nodes"]) == (1, 1)


SLURM_ENV = {  # task 3 of 4: 2 nodes x 2 tasks, on the second node
    "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_NNODES": "2",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "lmim",
    "SLURM_NODELIST": "gpu[07-08]",
}


def test_slurm_config_gives_lightning_the_allocations_ranks(monkeypatch):
    """trainer=slurm under an srun task: Lightning picks SLURMEnvironment and the ranks SLURM assigned."""
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from omegaconf import OmegaConf

    from lightning_mim.orchestration.config import compose

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    trainer_cfg = OmegaConf.to_container(compose(["trainer=slurm"]).trainer, resolve=True)
    assert (trainer_cfg["devices"], trainer_cfg["num_nodes"], trainer_cfg["precision"]) == (2, 2, "bf16-mixed")
    trainer_cfg.update(accelerator="cpu", precision="32-true")  # the config says gpu; this machine has none
    trainer = pl.Trainer(**trainer_cfg, logger=False, enable_checkpointing=False)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (4, 3, 1, 1)
    assert env.main_address == "gpu07"  # the first node of the allocation hosts the process group


def _fake_trainer(per_device: int, world: int, accumulate: int, batches_per_epoch: int = 10):
    return SimpleNamespace(
        datamodule=SimpleNamespace(batch_size=per_device),
        world_size=world,
        accumulate_grad_batches=accumulate,
        estimated_stepping_batches=100,
        train_dataloader=object(),
        num_training_batches=batches_per_epoch,
    )


def test_mage_base_lr_counts_every_rank_and_accumulation():
    """MAGE: lr = base_lr x (per-device batch x world size x accumulation) / 256 — 64 x 8 GPUs x 8 nodes = 4096."""
    from lightning_mim.modules.mage import MAGEModule

    tokenizer = {"ckpt": None, "arch": {"base_channels": 8, "channel_multipliers": [1, 2], "num_res_blocks": 1,
                                        "codebook_size": 16, "code_dim": 8, "norm_groups": 4}}
    arch = {"enc_width": 32, "enc_depth": 1, "enc_heads": 4, "dec_width": 32, "dec_depth": 1, "dec_heads": 4}
    optim = {"name": "adamw", "lr": None, "base_lr": 1.5e-4, "betas": [0.9, 0.95], "weight_decay": 0.05,
             "decay_norms_and_biases": False, "warmup_epochs": 1, "schedule": "cosine"}
    ratio = {"_target_": "lightning_mim.masking.FixedRatio", "value": 0.75}
    module = MAGEModule(arch=arch, tokenizer=tokenizer, ratio=ratio, decode=decode_config(steps=2), optim=optim, image_size=8)
    for per_device, world, accumulate in ((64, 64, 1), (128, 8, 4), (64, 1, 1)):
        module.trainer = _fake_trainer(per_device, world, accumulate, batches_per_epoch=40)
        optimizer = module.configure_optimizers()["optimizer"]
        assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(1.5e-4 * per_device * world * accumulate / 256)
        scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
        # warmup_epochs 1 = 40 batches per rank / accumulation optimizer steps
        warmup = max(1, -(-40 // accumulate))
        assert scheduler.lr_lambdas[0](warmup - 1) == pytest.approx(1.0)
        assert scheduler.lr_lambdas[0](0) == pytest.approx(1 / warmup)


def test_maskgit_base_lr_counts_every_rank():
    from lightning_mim.modules.maskgit import MaskGITModule

    tokenizer = {"ckpt": None, "arch": {"base_channels": 8, "channel_multipliers": [1, 2], "num_res_blocks": 1,
                                        "codebook_size": 16, "code_dim": 8, "norm_groups": 4}}
    transformer = {"width": 32, "depth": 1, "heads": 2, "mlp_dim": 64}
    ratio = {"_target_": "lightning_mim.masking.ScheduleRatio", "schedule": "cosine"}
    optim = {"name": "adam", "lr": None, "base_lr": 1e-4, "betas": [0.9, 0.96], "weight_decay": 0.045, "warmup_steps": 0}
    module = MaskGITModule(transformer=transformer, tokenizer=tokenizer, ratio=ratio, decode=decode_config(steps=2), optim=optim,
                           num_classes=10, image_size=8)
    module.trainer = _fake_trainer(32, 8, 2)
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-4 * 32 * 8 * 2 / 256)


# ------------------------------------------------------------------ the harness itself: a hang is reported

HANG_SNIPPET = """
import datetime, sys, time
import torch.distributed as dist
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=600))
print(f"rank {rank} joined", flush=True)
if rank == 0:
    time.sleep(600)      # a rank that never reaches the collective ...
else:
    dist.barrier()       # ... and one waiting for it
"""


def test_run_processes_turns_a_hang_into_a_failure_with_every_ranks_stack(tmp_path):
    """A collective on one rank only: the harness must fail within its timeout and show where each rank is."""
    port = free_port()
    commands = [[sys.executable, "-c", HANG_SNIPPET, str(rank), str(port)] for rank in (0, 1)]
    start = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        run_processes(commands, child_env(tmp_path), tmp_path / "logs", timeout=12)
    message = str(failure.value)
    assert time.monotonic() - start < 60
    assert "still running after" in message and "exit codes [-6, " in message  # rank 0 SIGABRT'ed first
    # each rank's Python stack (faulthandler, or rank 1's own traceback when rank 0's end breaks its
    # barrier first; py-spy adds a dump of both when installed): rank 1 waits in the collective (or, on
    # a very slow machine, still in the rendezvous for rank 0; or, when rank 0's abort broke the barrier
    # first, in torch.distributed's exception hook reporting that)
    assert "Fatal Python error: Aborted" in message and '"<string>", line 9' in message, message[-4000:]
    assert any(where in message for where in ("in barrier", "in init_process_group", "in _distributed_excepthook")), message[-4000:]
    assert not any(HANG_SNIPPET in (p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))


def test_run_processes_reports_a_failing_command(tmp_path):
    with pytest.raises(AssertionError, match=r"exit codes \[0, 3\][\s\S]*boom"):
        run_processes(
            [[sys.executable, "-c", "pass"], [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]],
            child_env(tmp_path), tmp_path / "logs", timeout=60,
        )  # fmt: skip


# ------------------------------------------------------------------------------- 2-process DDP run


def ddp_overrides(stage2: list[str], session_home: Path, *changes: str) -> list[str]:
    """`experiment=digits_maskgit trainer=ddp trainer.devices=2` on CPU with the session's tiny tokenizer."""
    return merge_overrides(
        ["experiment=digits_maskgit", *stage2],
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"paths.cache_dir={session_home / 'cache'}",  # digits shards + domain classifier of the session
        "trainer.enable_progress_bar=false",
        *changes,
    )


@pytest.mark.slow  # two interpreters + Lightning's relaunch: ~20 s idle, ~35 s on a loaded 2-core machine
@pytest.mark.timeout(300)
def test_two_process_ddp_on_cpu(session_home, tiny_stage2_overrides, tmp_path):
    from mlflow.tracking import MlflowClient

    home, rank_dir = tmp_path / "home", tmp_path / "ranks"
    args = ddp_overrides(
        tiny_stage2_overrides,
        session_home,
        "run_name=ddp-cpu",  # see test_ddp_relaunch_without_run_name_writes_one_run_dir
        # 3 epochs of 3 batches of 32 per rank, validated after each: the loss measurably falls in 9 steps
        "data.batch_size=32",
        "trainer.max_steps=9",
        "data.batches_per_epoch=3",
        "model.optim.lr=3e-3",
        "model.optim.warmup_steps=0",
        "model.optim.schedule=constant",
        # the whole val split (200 digits = 4 shards of 50: 2 per rank), not one batch
        "data.val_batches=null",
        "trainer.limit_val_batches=null",
        # generation metrics once, at the last step: 20 samples in 2 batches of 10, one per rank, features gathered
        "callbacks.generation_metrics.every_n_steps=9",
        "evaluation.batch_size=10",
        *recorder_overrides(rank_dir),  # no per-rank seeding override: train.run adds it under DDP by itself
    )
    run_processes([train_command(args)], recorder_env(home), tmp_path / "logs", timeout=240)
    r0, r1 = ranks = read_ranks(rank_dir, 2)

    # the layout Lightning launched: 2 processes on one node, gloo, one intra-op thread each
    assert [(r["rank"]["global_rank"], r["rank"]["local_rank"], r["rank"]["node_rank"]) for r in ranks] == [(0, 0, 0), (1, 1, 0)]
    for r in ranks:
        assert r["rank"]["world_size"] == 2 and r["rank"]["backend"] == "gloo"
        assert r["rank"]["strategy"] == "DDPStrategy" and r["rank"]["cluster_environment"] == "LightningEnvironment"
        assert r["rank"]["num_threads"] == 1
        assert r["global_step"] == 9 and len(r["train_batches"]) == 9  # equal batch counts: nobody waits
        assert all(b["size"] == 32 for b in r["train_batches"])
        assert r["global_batch"] == 64 and r["peak_lr"] == pytest.approx(3e-3)  # MaskGIT's lr is not scaled
    assert r0["rank"]["pid"] != r1["rank"]["pid"]

    # training: the ranks' streams differ at every step (per-rank shard/shuffle seeds)
    for b0, b1 in zip(r0["train_batches"], r1["train_batches"]):
        assert b0["samples"] != b1["samples"]
        assert len(set(b0["samples"]) & set(b1["samples"])) < 8  # resampling may repeat a few, not the batch
    # ... and so do their random draws (masks, dropout): by default rank r is seeded `seed + r` ...
    assert all(a != b for a, b in zip(r0["rng"], r1["rng"]))
    # ... while DDP keeps the weights identical
    assert r0["weights"] == r1["weights"]

    # validation: each rank evaluated its half, the halves cover the val split exactly, 3 times the same
    assert [v["global_step"] for v in r0["validations"]] == [3, 6, 9]
    assert_exact_disjoint_cover(ranks, val_split_hashes(args))
    assert all(v["samples"] == r0["validations"][0]["samples"] for v in r0["validations"])
    assert [len(v["samples"]) for v in r0["validations"]] == [len(v["samples"]) for v in r1["validations"]] == [100] * 3

    # the synced metrics are identical on both ranks, the generation metrics included
    assert_synced_val_metrics(ranks)
    final = r0["validations"][-1]["metrics"]
    assert {"val/fid_domain", "val/kid_domain", "val/cas", "val/loss"} <= set(final)
    # the loss falls: validation loss after each epoch, and each rank's own training loss
    val_losses = [v["metrics"]["val/loss"] for v in r0["validations"]]
    assert val_losses[0] > val_losses[1] > val_losses[2] and val_losses[0] - val_losses[2] > 0.05, val_losses
    for r in ranks:
        losses = r["train_losses"]
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses

    # rank 0 alone wrote: one run directory, one checkpoint, one MLflow run, one result.json
    assert [p.name for p in (home / "runs").iterdir()] == ["ddp-cpu"]
    out = home / "runs" / "ddp-cpu"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]
    assert len(list(home.rglob("*.ckpt"))) == 1
    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 9
    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "ddp-cpu" and run.info.status == "FINISHED"
    assert run.data.metrics["val/loss"] == pytest.approx(val_losses[-1])
    assert run.data.metrics["val/fid_domain"] == pytest.approx(final["val/fid_domain"])
    result = json.loads((out / "result.json").read_text())
    assert result["global_step"] == 9
    assert result["mlflow_run_id"] == run.info.run_id  # rank 0's result (train.py writes it on rank 0 only)
    assert result["metrics"]["val/loss"] == pytest.approx(val_losses[-1])


@pytest.mark.slow  # ~15 s idle
@pytest.mark.timeout(240)
def test_ddp_relaunch_without_run_name_writes_one_run_dir(session_home, tiny_stage2_overrides, tmp_path):
    """No run_name: rank 0 resolves `now` once and hands it to the rank Lightning relaunches (env
    LIGHTNING_MIM_RUN_NAME), so both ranks write into one run directory."""
    home = tmp_path / "home"
    stage2 = [o for o in tiny_stage2_overrides if not o.startswith("callbacks.")]  # callbacks=none below
    args = ddp_overrides(stage2, session_home, "trainer.max_steps=1", "trainer.limit_val_batches=0", "callbacks=none", "logger=csv")
    assert not any(a.startswith("run_name=") for a in args)
    run_processes([train_command(args)], child_env(home), tmp_path / "logs", timeout=180)
    run_dirs = [p.name for p in (home / "runs").iterdir()]
    assert len(run_dirs) == 1, run_dirs
    assert (home / "runs" / run_dirs[0] / "checkpoints" / "last.ckpt").is_file()
