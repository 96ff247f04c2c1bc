"""Encoding speed of the tokenizer on CPU: images/s of `encode_to_indices`, tiny vs official f=16.

    python benchmarks/tokenizer_speed.py [--threads 2] [--batch 32] [--repeats 3]

Random weights (speed does not depend on them). Each row: one warm-up batch, then the best of
`--repeats` timed batches. The ratio column is relative to the first row, from the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from conditions import print_conditions

from lightning_mim.nn.vqgan import VQGAN, official_maskgit_f16_config

TINY = dict(base_channels=16, channel_multipliers=[1, 2, 4], num_res_blocks=1, codebook_size=128, code_dim=16,
            norm_groups=8, quantizer={"restart_after": 20})  # conf/tokenizer/tiny.yaml


def images_per_second(model: VQGAN, batch: int, size: int, repeats: int) -> float:
    x = torch.rand(batch, 3, size, size)
    model.eval()
    model.encode_to_indices(x)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.encode_to_indices(x)
        best = min(best, time.perf_counter() - start)
    return batch / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print_conditions()
    torch.set_num_threads(args.threads)
    rows = [
        ("tiny (f=4, K=128)", VQGAN(**TINY), 32),
        ("maskgit f16 (K=1024)", VQGAN(**official_maskgit_f16_config()), 256),
    ]
    results = []
    for name, model, size in rows:
        params = sum(p.numel() for p in model.parameters()) / 1e6
        ips = images_per_second(model, args.batch, size, args.repeats)
        results.append((name, size, model.grid_size(size), params, ips))
    base = results[0][4]
    print(f"CPU encode_to_indices, batch {args.batch}, {args.threads} thread(s), best of {args.repeats}")
    print(f"{'tokenizer':<22} {'image':>6} {'grid':>5} {'params M':>9} {'images/s':>10} {'ratio':>8}")
    for name, size, grid, params, ips in results:
        print(f"{name:<22} {size:>5}² {grid:>4}² {params:>9.2f} {ips:>10.1f} {ips / base:>8.4f}")


if __name__ == "__main__":
    main()
