"""Under 2-process DDP (gloo, CPU) the synced metrics equal the single-process ones.

Each rank generates its share (uneven on purpose: 50 samples in batches of 16 -> 32 + 18), and the
real statistics are computed from each rank's shard of the val loader, then gathered.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_mim.eval.generation import evaluate_generation, real_statistics_path
from _fakes import FakeGenerator, ProjectionExtractor, SyntheticImageDataModule

KW = dict(num_samples=50, batch_size=16, progress=False)


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        out = evaluate_generation(
            FakeGenerator(), SyntheticImageDataModule(), extractor=ProjectionExtractor(), cache_dir=f"{tmp}/ddp", **KW
        )
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters import torch + torchmetrics + torch-fidelity: ~40 s under load
@pytest.mark.timeout(300)
def test_two_process_ddp_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == r1  # compute() on every rank gives every rank the same numbers

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = evaluate_generation(
            FakeGenerator(),
            SyntheticImageDataModule(),
            extractor=ProjectionExtractor(),
            cache_dir=tmp_path / "single",
            **KW,
        )
    finally:
        torch.set_num_threads(before)
    # order-independent metrics agree exactly (up to float summation order)
    for key in ("fid_proj", "precision_proj", "recall_proj"):
        assert r0[key] == pytest.approx(single[key], rel=1e-5, abs=1e-9), key
    assert single["fid_proj"] > 0

    # the sharded real statistics equal the single-process ones
    dm, ext = SyntheticImageDataModule(), ProjectionExtractor()
    paths = [
        real_statistics_path(tmp_path / d, ext, fingerprint=dm.fingerprint, split="val", resolution=16, num_real=None)
        for d in ("ddp", "single")
    ]
    a, b = (torch.load(p, weights_only=True) for p in paths)
    assert len(a["features"]) == len(b["features"]) == 64
    for k in b["fid"]:
        assert torch.allclose(a["fid"][k].double(), b["fid"][k].double(), rtol=1e-6), k
    assert not [p for p in os.listdir(tmp_path / "ddp" / "real_stats") if ".tmp" in p]
