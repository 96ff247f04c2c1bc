"""A per-rank record of what each DDP process saw: a debugging aid for the multi-process tests.

`RankDataRecorder` writes `out_dir/rank{global_rank}.json` on every rank: the rank layout and
cluster environment Lightning detected, a short hash of every training and validation sample the rank
consumed, its local training losses, an RNG fingerprint per step, and `trainer.callback_metrics` after
each validation. Comparing the files answers "did the ranks see disjoint data?", "are the synced
metrics identical?" and "did the ranks draw different masks?" without reading logs. It lives under
tests/, so a run that uses it needs tests/ on the import path:

    PYTHONPATH=tests python -m lightning_mim.train trainer=ddp trainer.devices=2 \
        +callbacks.rank_data._target_=_rank_recorder.RankDataRecorder \
        +callbacks.rank_data.out_dir=/tmp/rank-data

It hashes every sample (a few µs per image): keep it out of production runs. Under DDP, `train.run`
adds `lightning_mim.callbacks.PerRankSeed` by itself, so the RNG fingerprints differ between ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor


def sample_hashes(data: Tensor) -> list[str]:
    """A 16-hex-digit SHA-1 of each sample's bytes (dim 0 indexes samples): equal tensors, equal hashes."""
    array = data.detach().to("cpu").contiguous().numpy()
    return [hashlib.sha1(row.tobytes()).hexdigest()[:16] for row in array]


def rng_fingerprint() -> str:
    """A short hash of the CPU torch RNG state: equal on two ranks means they draw the same numbers."""
    return hashlib.sha1(torch.random.get_rng_state().numpy().tobytes()).hexdigest()[:16]


def _batch_data(batch: Any) -> Tensor | None:
    """The sample tensor of a `(data, labels)` batch (images or tokens), or None for other shapes."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    return batch if isinstance(batch, Tensor) else None


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, Tensor) and value.numel() == 1:
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


class RankDataRecorder(pl.Callback):
    """Writes `out_dir/rank{global_rank}.json` after every validation and at the end of fit.

    Keys: `rank` (global_rank, local_rank, node_rank, world_size, num_nodes, num_devices, host, pid,
    cluster_environment, strategy, backend, num_threads), `train_batches` (per batch: step, sample hashes, labels),
    `train_losses` (this rank's unsynced loss per batch), `rng` (RNG fingerprint per training batch),
    `per_device_batch`, `accumulate_grad_batches`, `global_batch`, `lr` (first param group at the
    start of training), `validations` (per validation: global_step, the sample hashes and labels this
    rank evaluated, and `metrics` = `trainer.callback_metrics` as floats), `global_step` and a `weights`
    fingerprint at the end.
    """

    def __init__(self, out_dir: str | os.PathLike, hash_samples: bool = True) -> None:
        super().__init__()
        self.out_dir = Path(out_dir)
        self.hash_samples = bool(hash_samples)
        self.record: dict[str, Any] = {}
        self._val: dict[str, list] = {"samples": [], "labels": []}

    # -- helpers -------------------------------------------------------------------------------------
    def _describe(self, trainer: pl.Trainer) -> dict[str, Any]:
        strategy = trainer.strategy
        env = getattr(strategy, "cluster_environment", None)
        backend = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = str(torch.distributed.get_backend())
        return {
            "global_rank": int(trainer.global_rank),
            "local_rank": int(trainer.local_rank),
            "node_rank": int(trainer.node_rank),
            "world_size": int(trainer.world_size),
            "num_nodes": int(trainer.num_nodes),
            "num_devices": int(trainer.num_devices),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "cluster_environment": type(env).__name__ if env is not None else None,
            "strategy": type(strategy).__name__,
            "backend": backend,
            # intra-op threads: more than the cores per rank oversubscribes a shared CPU (OpenMP spin-waits)
            "num_threads": int(torch.get_num_threads()),
        }

    def _batch_entry(self, batch: Any, **extra: Any) -> dict[str, Any]:
        entry: dict[str, Any] = dict(extra)
        data = _batch_data(batch)
        if data is not None:
            entry["size"] = int(data.shape[0])
            if self.hash_samples:
                entry["samples"] = sample_hashes(data)
        if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], Tensor):
            entry["labels"] = [int(v) for v in batch[1].detach().cpu().reshape(-1)]
        return entry

    def _write(self) -> None:
        rank = self.record.get("rank", {}).get("global_rank", 0)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{rank}.json"
        tmp = path.with_suffix(f".json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.record, indent=1))
        os.replace(tmp, path)  # readers never see a half-written file

    # -- hooks ---------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.record = {
            "rank": self._describe(trainer),
            "stage": stage,
            "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
            "train_batches": [],
            "train_losses": [],
            "rng": [],
            "validations": [],
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.optimizers:
            self.record["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
            # `initial_lr` is the schedule's peak (LambdaLR scales it): the value the scaling rule sets
            self.record["peak_lr"] = float(trainer.optimizers[0].param_groups[0].get("initial_lr", self.record["lr"]))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        entry = self._batch_entry(batch, step=int(trainer.global_step), epoch=int(trainer.current_epoch))
        self.record["train_batches"].append(entry)
        self.record["rng"].append(rng_fingerprint())
        if "per_device_batch" not in self.record and "size" in entry:
            per_device = entry["size"]
            self.record["per_device_batch"] = per_device
            self.record["global_batch"] = per_device * int(trainer.world_size) * int(trainer.accumulate_grad_batches)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:
            self.record["train_losses"].append(float(loss.detach()))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val = {"samples": [], "labels": []}

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        entry = self._batch_entry(batch)
        self._val["samples"] += entry.get("samples", [])
        self._val["labels"] += entry.get("labels", [])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.record["validations"].append(
            {
                "global_step": int(trainer.global_step),
                "epoch": int(trainer.current_epoch),
                **self._val,
                "metrics": _scalars(dict(trainer.callback_metrics)),
            }
        )
        self._write()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["global_step"] = int(trainer.global_step)
        # DDP keeps the replicas identical: equal fingerprints on every rank
        blob = b"".join(p.detach().to("cpu").contiguous().numpy().tobytes() for p in pl_module.parameters())
        self.record["weights"] = hashlib.sha1(blob).hexdigest()[:16]
        self.record["final_metrics"] = _scalars(dict(trainer.callback_metrics))
        self._write()
