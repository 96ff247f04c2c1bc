"""MaskGIT speed on CPU: training tokens/s and decoding images/s at several widths, and the paper's
argument — T-step parallel decoding against a same-size causal transformer that decodes the same
N tokens one at a time with a KV cache. Run by hand; prints one table with ratios from one run.

The paper's speed-up comes from doing T sequential forward passes instead of N. It is a *latency*
argument: each MaskGIT pass processes all N+1 positions, so it does T·(N+1)/N ≈ T times more
token-forwards than a KV-cached autoregressive decoder (the "work" column). Where a forward pass costs
about the same for 1 or 257 tokens (an accelerator at small batch) the T/N ratio of sequential passes
decides; on a compute-bound CPU the work ratio does, and the measured speed-up stays near 1.

    python benchmarks/maskgit_speed.py                     # widths 256 512 768, N=256, T=8
    python benchmarks/maskgit_speed.py --widths 256 --depth 4 --batch 4
"""

from __future__ import annotations

import argparse
import time

import torch

from conditions import print_conditions

from lightning_mim.decoding import decode
from lightning_mim.losses import masked_token_loss
from lightning_mim.masking import ScheduleRatio, mask_tokens
from lightning_mim.nn.transformer import BidirectionalTransformer
from lightning_mim.tokens import TokenLayout


def build(width: int, depth: int, n_tokens: int, layout: TokenLayout, causal: bool) -> BidirectionalTransformer:
    return BidirectionalTransformer(
        vocab_size=layout.vocab_size, n_positions=n_tokens + 1, codebook_size=layout.codebook_size,
        width=width, depth=depth, heads=max(1, width // 64), mlp_dim=4 * width, dropout=0.0, attn_dropout=0.0,
        causal=causal,
    )


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def training_tokens_per_s(model, layout, batch: int, n_tokens: int, repeats: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    ratio = ScheduleRatio("cosine")
    tokens = torch.randint(0, layout.codebook_size, (batch, n_tokens))

    def step():
        masked, mask = mask_tokens(tokens, ratio(batch), layout.mask_id)
        ids = torch.cat([torch.full((batch, 1), layout.codebook_size), masked], 1)
        loss = masked_token_loss(model(ids)[:, 1:], tokens, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.train()
    return batch * n_tokens / timed(step, repeats)


@torch.no_grad()
def parallel_decode_seconds(model, layout, batch: int, n_tokens: int, steps: int, repeats: int) -> float:
    model.eval()
    cls = torch.full((batch, 1), layout.codebook_size)
    start = torch.full((batch, n_tokens), layout.mask_id)
    fn = lambda t: model(torch.cat([cls, t], 1))[:, 1:]  # noqa: E731
    return timed(lambda: decode(fn, start, mask_id=layout.mask_id, steps=steps), repeats)


@torch.no_grad()
def autoregressive_seconds(model, layout, batch: int, n_tokens: int, repeats: int) -> float:
    """Sample N tokens one by one with a KV cache (what a VQGAN-transformer does)."""
    model.eval()

    def run():
        cache = model.new_cache()
        ids = torch.full((batch, 1), layout.codebook_size)
        for _ in range(n_tokens):
            logits = model(ids, cache=cache)[:, -1]
            ids = torch.multinomial(torch.softmax(logits.float(), -1), 1)

    return timed(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 768])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print_conditions()
    torch.manual_seed(0)
    layout = TokenLayout(1024, 1000)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, depth {args.depth}, N={args.tokens}, "
          f"T={args.steps}, batch {args.batch}")
    work = args.steps * (args.tokens + 1) / args.tokens
    print(f"sequential forward passes: MaskGIT {args.steps}, AR {args.tokens} ({args.tokens / args.steps:.0f}x fewer); "
          f"token-forwards: MaskGIT {work:.2f}x more than AR+KV")
    header = f"{'width':>6} {'train tok/s':>12} {'MaskGIT img/s':>14} {'AR+KV img/s':>12} {'MaskGIT s':>10} {'AR s':>8} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    for width in args.widths:
        bidirectional = build(width, args.depth, args.tokens, layout, causal=False)
        causal = build(width, args.depth, args.tokens, layout, causal=True)
        tok_s = training_tokens_per_s(bidirectional, layout, args.batch, args.tokens, args.repeats)
        parallel = parallel_decode_seconds(bidirectional, layout, args.batch, args.tokens, args.steps, args.repeats)
        autoregressive = autoregressive_seconds(causal, layout, args.batch, args.tokens, 1)
        print(f"{width:>6} {tok_s:>12.0f} {args.batch / parallel:>14.2f} {args.batch / autoregressive:>12.2f} "
              f"{parallel:>10.2f} {autoregressive:>8.2f} {autoregressive / parallel:>8.1f}x")


if __name__ == "__main__":
    main()
