"""What a benchmark's numbers were measured under, printed by every benchmark before its table.

Machines of one kind differ about 3x in speed from one day to the next, so a number is only readable
beside the machine it ran on, in terms a reader can compare with theirs: the CPU model and cores, the
GPU if any, the one-thread float32 matmul rate (the unit `sweep_floor.py` divides FLOPs by), the
commit, and what else was running (the load average when the benchmark started; near 0 on a quiet
machine). Ratios measured within one run stay comparable across machines; absolute seconds do not.

    from conditions import print_conditions   # benchmarks/ is the script's directory: on sys.path
    print_conditions()

Why written here: nothing in the standard library or torch prints these together, and every
benchmark needs the same line.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo on Linux; `platform` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_rate(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n float32 matmul on `threads` intra-op threads (best of `repeats`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return 2 * n**3 / best


def commit() -> str:
    """The checkout's commit (`-dirty` with uncommitted changes to tracked files); "unknown" outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def gpu() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def conditions(rate: float | None = None) -> str:
    """One line: CPU model, cores, GPU, one-thread matmul GFLOP/s (`rate` in FLOP/s when measured
    already), torch, commit, and the 1-minute load average now."""
    import torch

    rate = matmul_rate(1) if rate is None else rate
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores, GPU {gpu()}; matmul {rate / 1e9:.1f} GFLOP/s on one thread "
            f"(2048² float32); torch {torch.__version__}; commit {commit()}; load average {load:.2f} at start "
            f"(other work running: near 0 means none)")


def print_conditions(rate: float | None = None) -> None:
    print(conditions(rate), flush=True)
