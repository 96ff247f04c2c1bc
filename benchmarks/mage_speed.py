"""MAGE training-step time with token drop (0.5, the official setting) against no drop.

    python benchmarks/mage_speed.py                      # ViT-B widths, batch 8, 256 tokens
    python benchmarks/mage_speed.py --size tiny --steps 5 # a quick smoke run

One step = forward + masked-token loss + backward + AdamW step, in training mode (dropout on); the two
settings alternate step by step and the median is reported. Both use the same mask (ratio 0.75 -> 192 masked tokens); with drop, ceil(0.5 N) = 128 of them are
removed from the encoder input (it sees 1 + 128 tokens instead of 257). The decoder always runs on
all 257 positions, so the speed-up is bounded by the encoder's share of the compute: the table also
prints that bound from a FLOP count.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from conditions import print_conditions

from lightning_mim.checkpoints.mage import mage_config
from lightning_mim.losses import masked_token_loss
from lightning_mim.nn.mage import MAGE

SIZES = {
    "base": mage_config("base"),
    "tiny": {**mage_config("base"), "enc_width": 128, "enc_depth": 4, "enc_heads": 4,
             "dec_width": 128, "dec_depth": 2, "dec_heads": 4},
}


def train_flops(cfg: dict, batch: int, n: int, n_drop: int) -> float:
    """Matmul FLOPs of one training step (x3 for forward + backward), ignoring norms and softmax."""
    def layers(width: int, depth: int, tokens: int) -> float:
        per_token = 2 * 12 * width * width + 4 * tokens * width  # qkv + proj + MLP (ratio 4), attention
        return depth * tokens * per_token

    enc = layers(cfg["enc_width"], cfg["enc_depth"], 1 + n - n_drop)
    dec = layers(cfg["dec_width"], cfg["dec_depth"], 1 + n)
    head = n * 2 * (cfg["dec_width"] * cfg["enc_width"] + cfg["enc_width"] * cfg["codebook_size"])
    embed = (1 + n - n_drop) * 2 * cfg["enc_width"] * cfg["dec_width"]  # decoder_embed
    return 3 * batch * (enc + dec + head + embed)


def time_steps(model: MAGE, tokens, mask, drops: list, steps: int, warmup: int) -> list[float]:
    """Median step time per drop pattern. The patterns alternate step by step (A, B, A, B, ...), so
    load from other processes on a shared machine hits both alike."""
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    times: list[list[float]] = [[] for _ in drops]
    for i in range(warmup + steps):
        for j, drop in enumerate(drops):
            start = time.perf_counter()
            loss = masked_token_loss(model(tokens, mask, drop), tokens, mask, reduction="token_mean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= warmup:
                times[j].append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--drop-ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    print_conditions()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = SIZES[args.size]
    model = MAGE(**cfg).train()
    B, N = args.batch, args.tokens
    n_mask, n_drop = math.ceil(args.mask_ratio * N), math.ceil(args.drop_ratio * N)
    if not 0 < n_drop <= n_mask:
        raise SystemExit(f"need 0 < dropped ({n_drop}) <= masked ({n_mask})")
    tokens = torch.randint(0, cfg["codebook_size"], (B, N))
    rank = torch.rand(B, N).argsort(1).argsort(1)  # one noise ranking: dropped subset of masked
    mask, drop = rank < n_mask, rank < n_drop
    no_drop = torch.zeros_like(drop)

    runs = (("no drop", no_drop, 0), (f"drop {args.drop_ratio:g}", drop, n_drop))
    secs = time_steps(model, tokens, mask, [d for _, d, _ in runs], args.steps, args.warmup)
    rows = [(name, 1 + N - nd, sec, train_flops(cfg, B, N, nd)) for (name, _, nd), sec in zip(runs, secs)]
    base_sec, base_flops = rows[0][2], rows[0][3]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"MAGE {args.size}: {n_params / 1e6:.1f} M params, batch {B}, {N} tokens, mask {n_mask}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    print(f"{'config':<10} {'enc tokens':>10} {'s/step':>8} {'speed-up':>9} {'FLOP bound':>11}")
    for name, enc_tokens, sec, flops in rows:
        print(f"{name:<10} {enc_tokens:>10} {sec:>8.2f} {base_sec / sec:>8.2f}x {base_flops / flops:>10.2f}x")


if __name__ == "__main__":
    main()
