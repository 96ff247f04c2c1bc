"""How the sequential verdicts of `sweep.seeds=auto` do: simulated sweeps with a known truth, next to
the fixed design at max_seeds and to adastop.

Run by hand (a few minutes at the default size, nearly all of it adastop's); prints markdown tables.

    python benchmarks/sequential_calibration.py                                # 4000 sweeps a cell, adastop 100
    python benchmarks/sequential_calibration.py --sims 20000 --adastop-sims 400   # tighter Monte-Carlo error

Every sequential cell is `lightning_mim.sequential.simulate_sequential` (the looks, boundaries, Holm family
and verdict rule of `sequential.decide`, vectorised over the sweeps); every fixed cell is
`lightning_mim.verdicts.simulate` at max_seeds (what `verdicts.compare_all` does with that many seeds);
both see the same simulated sweeps for a scenario (the sequential reading their first n_k seeds at look
k). A scenario is the noise (unit variance: normal, or Student t with 3 degrees of freedom scaled to unit
variance), the correlation ρ of the points within a seed (a shared seed effect when ρ > 0) and the
effect (point 0 better by that many noise sds, all others equal); the margin, where a row has one, is in
noise sds too. Columns:

- FWER: the share of sweeps with at least one truly equal pair called different (at any look), for A/A
  sweeps (every point equal); should be <= α;
- seeds: the seeds a point got, averaged over points and sweeps (the fixed design: max_seeds; with no
  margin two equal points are never decided and always run to max_seeds);
- power: the share of sweeps in which every pair with the better point is called different in the right
  direction (in parentheses: at least one of them); at ρ = 0.8 the seed effect cancels in the paired
  differences (sd √0.4 = 0.63 instead of √2), which a comparison of independent groups cannot use;
- wrong equivalence: margin = effect = 1 sd, so the pairs with point 0 sit exactly on the equivalence
  null: the share of sweeps in which the equivalence of at least one of them is shown (the sequential
  design stops testing a pair once it is shown different; the fixed reading tests every TOST);
- decide: wall time of one decision (`sequential.decide` on one sweep's values, its design's boundaries
  already drawn; adastop: one `partial_compare`).

adastop (`adastop.MultipleAgentsComparator`, B = 10 000 permutations) rows: its rounds must all have n
seeds (looks n, 2n, ..., Kn) and it compares the points as independent groups (no pairing by seed); its
"equal" is "no difference found", so it has no equivalence column. It is slow (0.1-0.4 s a decision in
Python), so its cells run `--adastop-sims` sweeps only (the first of the same simulated sweeps), with a
Monte-Carlo error of up to 0.05 at 100. Version 0.1.3 compares |mean difference| with the permutation
law of the signed maximum, i.e. a two-sided statistic against a one-sided reference, and so tests at
about 2α: the last table measures that on one pair, and its rows are shown at α and at α / 2.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from itertools import combinations

import numpy as np

from conditions import print_conditions

from lightning_mim.sequential import OBRIEN_FLEMING, POCOCK, SequentialDesign, decide, simulate_sequential
from lightning_mim.verdicts import _noise, simulate
from verdict_calibration import markdown, rate  # this script's folder is on sys.path when run as a script

EFFECT, MARGIN = 2.0, 1.0
# (column, noise, correlation, effect, what it reads)
SCENARIOS = (
    ("A/A, normal, ρ = 0: FWER", "normal", 0.0, 0.0, "fwer"),
    ("A/A, t3, ρ = 0.5: FWER", "t3", 0.5, 0.0, "fwer"),
    ("A/A, normal, ρ = -0.5 (4 points: -1/3): FWER", "normal", -0.5, 0.0, "fwer"),
    ("A/A, normal, ρ = 0.8: FWER; seeds", "normal", 0.8, 0.0, "fwer seeds"),
    (f"effect {EFFECT:g} sd, ρ = 0: power all (any); seeds", "normal", 0.0, EFFECT, "power seeds"),
    (f"effect {MARGIN:g} sd, ρ = 0.8: power all (any); seeds", "normal", 0.8, MARGIN, "power seeds"),
    (f"effect = margin = {MARGIN:g} sd, ρ = 0.8: wrong equivalence", "normal", 0.8, MARGIN, "equivalence"),
)
ADASTOP_SCENARIOS = {0, 3, 4, 5}  # the SCENARIOS adastop runs (its sweeps are slow)
# (points, first round, round size, max seeds, spending, margin); None for the spending: the fixed design
DESIGNS = (
    (3, 12, 1, 12, None, None), (3, 5, 3, 12, OBRIEN_FLEMING, None), (3, 5, 3, 12, POCOCK, None),
    (3, 3, 3, 12, OBRIEN_FLEMING, None), (3, 10, 1, 10, None, None), (3, 5, 5, 10, OBRIEN_FLEMING, None),
    (3, 15, 1, 15, None, None), (3, 5, 5, 15, OBRIEN_FLEMING, None),
    (3, 12, 1, 12, None, MARGIN), (3, 5, 3, 12, OBRIEN_FLEMING, MARGIN), (3, 3, 3, 12, OBRIEN_FLEMING, MARGIN),
    (3, 5, 5, 15, OBRIEN_FLEMING, MARGIN),
    (4, 12, 1, 12, None, None), (4, 5, 3, 12, OBRIEN_FLEMING, None),
    (4, 12, 1, 12, None, MARGIN), (4, 5, 3, 12, OBRIEN_FLEMING, MARGIN),
)
ADASTOP = ((3, 5, 2, 1.0), (3, 5, 2, 0.5), (3, 5, 3, 0.5))  # (points, n, K, share of α)
TIMED_SWEEPS = 10


def design_label(points: int, design: SequentialDesign, fixed: bool) -> str:
    margin = "" if design.equivalence is None else f", margin {design.equivalence:g} sd"
    if fixed:
        return f"{points} points: fixed, {design.max_seeds} seeds{margin}"
    spending = "O'Brien-Fleming" if design.spending == OBRIEN_FLEMING else "Pocock"
    return f"{points} points: {spending}, looks {', '.join(map(str, design.looks))}{margin}"


def cell(result: dict[str, float], reads: str, fixed_seeds: int | None) -> str:
    """One table cell from a result dict (keys as `simulate_sequential` has them)."""
    seeds = "" if "seeds" not in reads else f"; {fixed_seeds or result['mean_seeds']:.2f}"
    if reads.startswith("fwer"):
        return rate(result["fwer"]) + seeds
    if reads.startswith("power"):
        return f"{rate(result['power'])} ({rate(result['power_any'])})" + seeds
    return rate(result["false_equivalence"])


def sweeps(points: int, max_seeds: int, noise: str, correlation: float, effect: float, sims: int, seed: int):
    """The simulated sweeps (sims, points, max_seeds) of a scenario, drawn as `verdicts.simulate` draws them."""
    truth = np.where(np.arange(points) == 0, -float(effect), 0.0)
    return truth[None, :, None] + _noise(np.random.default_rng(seed), noise, correlation, (sims, points, max_seeds))


def decide_seconds(design: SequentialDesign, points: int, seed: int) -> float:
    """Mean wall time of `decide` over the looks of TIMED_SWEEPS simulated sweeps (effect 1 sd, ρ = 0.5)."""
    values = sweeps(points, design.max_seeds, "normal", 0.5, 1.0, TIMED_SWEEPS, seed)
    decide(design, {str(p): {"0": 0.0, "1": 1.0} for p in range(points)})  # the design's boundaries, once
    calls, seconds = 0, 0.0
    for sweep in values:
        have, state = [design.looks[0]] * points, None
        while state is None or not state.finished:
            given = {str(p): {str(i): float(v) for i, v in enumerate(row[:n])}
                     for p, (row, n) in enumerate(zip(sweep, have))}
            start = time.perf_counter()
            state = decide(design, given, state)
            seconds += time.perf_counter() - start
            calls += 1
            for label, n in state.seeds_to_add.items():
                have[int(label)] = n
    return seconds / calls


def adastop_result(points: int, n: int, looks: int, alpha: float, values, effect: float) -> dict[str, float]:
    """adastop over the sweeps `values` (sims, points, >= n * looks; point 0 lower by `effect`), read as
    `simulate_sequential` reads a sweep: FWER over the truly equal pairs, power over point 0's pairs
    ("smaller": point 0 lower), seeds per point (a point gets the next n while in an undecided
    comparison), seconds a decision."""
    from adastop import MultipleAgentsComparator

    pairs = list(combinations(range(points), 2))
    equal = [effect == 0 or i > 0 for i, _ in pairs]
    wrong, found_all, found_any, seeds, seconds, calls = 0, 0, 0, 0.0, 0.0, 0
    for s, sweep in enumerate(values):
        comparator = MultipleAgentsComparator(n=n, K=looks, B=10_000, alpha=alpha, seed=s)
        have = np.full(points, n)
        for k in range(looks):
            start = time.perf_counter()
            comparator.partial_compare({str(p): sweep[p, :(k + 1) * n] for p in range(points)}, verbose=False)
            seconds, calls = seconds + time.perf_counter() - start, calls + 1
            if comparator.is_finished or k == looks - 1:
                break
            for p in {int(p) for pair in np.asarray(comparator.current_comparisons) for p in pair}:
                have[p] = (k + 2) * n
        decisions = [comparator.decisions[str(np.array(pair))] for pair in pairs]
        wrong += any(d in ("larger", "smaller") for d, e in zip(decisions, equal) if e)
        better = [d == "smaller" for (i, _), d in zip(pairs, decisions) if i == 0]
        found_all, found_any, seeds = found_all + all(better), found_any + any(better), seeds + have.mean()
    sims = len(values)
    return {"fwer": wrong / sims, "power": found_all / sims if effect > 0 else math.nan,
            "power_any": found_any / sims if effect > 0 else math.nan, "mean_seeds": seeds / sims,
            "seconds": seconds / calls}


def adastop_level(sims: int, seed: int, alpha: float) -> float:
    """The share of A/A pairs (2 points, 5 + 5 normal values, one look) adastop calls different at α."""
    from adastop import MultipleAgentsComparator

    rng = np.random.default_rng(seed)
    rejected = 0
    for s in range(sims):
        comparator = MultipleAgentsComparator(n=5, K=1, B=10_000, alpha=alpha, seed=s)
        comparator.partial_compare({"a": rng.standard_normal(5), "b": rng.standard_normal(5)}, verbose=False)
        rejected += next(iter(comparator.decisions.values())) != "equal"
    return rejected / sims


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=4000, help="simulated sweeps per cell (default 4000)")
    parser.add_argument("--adastop-sims", type=int, default=100,
                        help="simulated sweeps per adastop cell (default 100; 0 leaves adastop out)")
    parser.add_argument("--alpha", type=float, default=0.05, help="family-wise level (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0): every row sees the same sweeps")
    args = parser.parse_args(argv)
    print_conditions()
    if args.sims < 1 or args.adastop_sims < 0:
        parser.error(f"--sims must be >= 1 and --adastop-sims >= 0, got {args.sims} and {args.adastop_sims}")

    start = time.perf_counter()
    header = ["design", *(column for column, *_ in SCENARIOS), "decide"]
    rows = []
    for points, first, size, most, spending, margin in DESIGNS:
        design = SequentialDesign(first, size, most, alpha=args.alpha, equivalence=margin,
                                  spending=spending or OBRIEN_FLEMING)
        fixed = spending is None
        cells = [design_label(points, design, fixed)]
        for _, noise, correlation, effect, reads in SCENARIOS:
            correlation = max(correlation, -1 / (points - 1))  # the least an equicorrelation allows
            if reads == "equivalence" and margin is None:
                cells.append("—")
                continue
            if fixed:
                result = simulate(points, most, effect=effect, noise=noise, correlation=correlation, sims=args.sims,
                                  alpha=args.alpha, equivalence=margin, seed=args.seed)
            else:
                result = simulate_sequential(design, points, effect=effect, noise=noise, correlation=correlation,
                                             sims=args.sims, seed=args.seed)
            cells.append(cell(result, reads, most if fixed else None))
        cells.append("" if fixed else f"{1000 * decide_seconds(design, points, args.seed):.1f} ms")
        rows.append(cells)
    for points, n, looks, share in ADASTOP if args.adastop_sims else ():
        alpha = args.alpha * share
        shown = ", ".join(str(n * (k + 1)) for k in range(looks))
        cells = [f"{points} points: adastop at α = {alpha:g}, looks {shown}"]
        seconds = []
        for index, (_, noise, correlation, effect, reads) in enumerate(SCENARIOS):
            if index not in ADASTOP_SCENARIOS:
                cells.append("not run" if reads != "equivalence" else "— (no equivalence test)")
                continue
            values = sweeps(points, n * looks, noise, correlation, effect, args.sims, args.seed)[:args.adastop_sims]
            result = adastop_result(points, n, looks, alpha, values, effect)
            seconds.append(result["seconds"])
            cells.append(cell(result, reads, None))
        rows.append(cells + [f"{1000 * float(np.mean(seconds)):.0f} ms"])
    level = None if not args.adastop_sims else adastop_level(10 * args.adastop_sims, args.seed, args.alpha)

    print(f"command: {shlex.join(['python', *sys.argv])}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(f"{args.sims} simulated sweeps per cell ({args.adastop_sims} for adastop), α = {args.alpha}, "
          f"seed {args.seed}; "
          f"Monte-Carlo standard error {math.sqrt(args.alpha * (1 - args.alpha) / args.sims):.4f} at a rate of α "
          f"({math.sqrt(args.alpha * (1 - args.alpha) / max(args.adastop_sims, 1)):.3f} for adastop)")
    print()
    print(markdown(header, rows))
    if level is not None:
        sims = 10 * args.adastop_sims
        print()
        print(f"adastop's level on one pair (2 points, 5 + 5 normal values, one look, {sims} A/A sweeps): called "
              f"different in {level:.3f} at α = {args.alpha} (Monte-Carlo standard error "
              f"{math.sqrt(level * (1 - level) / sims):.3f}); the paired t-test's level is α exactly")
    print()
    print(f"(wall time {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
