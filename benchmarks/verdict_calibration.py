"""How often a sweep's verdicts are wrong: simulated sweeps with a known truth, read four ways.

Run by hand (seconds at the default size); prints markdown tables.

    python benchmarks/verdict_calibration.py                # 2000 simulated sweeps per cell
    python benchmarks/verdict_calibration.py --sims 20000   # tighter Monte-Carlo error

Every cell is `lightning_mim.verdicts.simulate` — the same tests, Holm family and verdict rule as
`verdicts.compare_all`, vectorised over the simulated sweeps. A scenario is points x seeds, the noise
(unit variance: normal, or Student t with 3 degrees of freedom scaled to unit variance), the correlation
ρ of the points within a seed (a shared seed effect when ρ > 0; the least equicorrelation, -1/(points-1),
for the negative ones) and the effect (point 0 better by that many noise sds, all others equal). Each
scenario is read four ways on the same simulated sweeps:

- Welch: Welch's test for every pair, each at α alone (unadjusted: the table as it was, but over all
  pairs instead of against the best only);
- Welch + Holm: the same p-values, Holm-adjusted over all pairs;
- paired: the paired t-test by seed, each at α alone;
- paired + Holm: what `compare_all` does (blocked by seed, Holm over all pairs).

Columns: FWER, the share of sweeps with at least one truly equal pair called different (should be
<= α for the Holm columns); power, the share of sweeps in which every pair with the better point is
called different in the right direction (in parentheses: at least one of them). The second table sets an
equivalence margin equal to the effect, so the pairs with point 0 sit exactly on the equivalence null:
its cells are the share of sweeps in which the equivalence of at least one of them is shown (adjusted
TOST p < α; the margin's tests join the Holm family), whether or not the verdict then reads "equivalent"
— a pair also shown different reads "different", which would hide the test's error. The Monte-Carlo
standard error of a rate p is sqrt(p (1 - p) / sims): printed for
p = α and for p = 0.5 (the largest). The third table reads A/A sweeps with two metrics as a sweep with
a secondary family does (`verdicts.simulate_families`): each metric's pairs Holm-adjusted on their own,
so each family's rate should be <= α, and that of a false "different" in either family <= 2α.

Why written here: the verdicts' error rates at 3 seeds depend on the test, the multiplicity correction
and the seed correlation together; statsmodels and scipy give each test's nominal level, not the rate of
a whole sweep's table, and only a simulation of the whole reading measures it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from conditions import print_conditions

from lightning_mim.verdicts import simulate, simulate_families

READINGS = (  # (name, blocked, holm)
    ("Welch", False, False), ("Welch + Holm", False, True), ("paired", True, False), ("paired + Holm", True, True),
)

# (points, seeds, noise, correlation, effect)
DIFFERENCE_SCENARIOS = (
    (3, 3, "normal", 0.0, 0.0), (3, 3, "normal", 0.8, 0.0), (3, 3, "normal", -0.5, 0.0), (3, 3, "t3", 0.8, 0.0),
    (4, 3, "normal", 0.8, 0.0), (12, 3, "normal", 0.0, 0.0), (12, 3, "normal", 0.8, 0.0), (12, 3, "t3", 0.8, 0.0),
    (3, 10, "normal", 0.8, 0.0), (3, 10, "normal", -0.5, 0.0), (2, 10, "normal", -0.9, 0.0),
    (3, 3, "normal", 0.0, 3.0), (3, 3, "normal", 0.8, 3.0), (3, 3, "normal", 0.8, 5.0), (3, 5, "normal", 0.8, 1.5),
    (3, 10, "normal", 0.0, 1.5), (3, 10, "normal", 0.8, 1.5), (3, 10, "normal", 0.0, 3.0), (12, 3, "normal", 0.8, 3.0),
)
EQUIVALENCE_SCENARIOS = (  # effect = margin = 1 sd
    (2, 10, "normal", 0.0, 1.0), (3, 3, "normal", 0.8, 1.0), (3, 10, "normal", 0.0, 1.0), (3, 10, "normal", 0.8, 1.0),
    (3, 20, "normal", 0.8, 1.0),
)


# Two families (`sweep.secondary`): points x seeds, ρ across points, the correlation of the two metrics
# within a trial (0: unrelated; -0.6: a probe that rises as FID falls; 1: one metric twice)
FAMILY_SCENARIOS = ((4, 3, 0.0, 0.0), (4, 3, 0.5, -0.6), (4, 3, 0.5, 0.0), (4, 3, 0.5, 1.0), (4, 10, 0.5, -0.6))


def scenario_label(points: int, seeds: int, noise: str, correlation: float, effect: float) -> str:
    return f"{points} x {seeds}, {noise}, ρ = {correlation:g}, effect {effect:g}"


def rate(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def readings(scenario, args, margin_at_effect: bool = False) -> list[dict[str, float]]:
    """`simulate` of one scenario (points, seeds, noise, ρ, effect) under each of READINGS, on the same
    simulated sweeps; with `margin_at_effect`, an equivalence margin equal to the true effect."""
    points, seeds, noise, correlation, effect = scenario
    return [simulate(points, seeds, effect=effect, noise=noise, correlation=correlation, sims=args.sims,
                     alpha=args.alpha, blocked=blocked, holm=holm, seed=args.seed,
                     equivalence=effect if margin_at_effect else None)
            for _, blocked, holm in READINGS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=2000, help="simulated sweeps per cell (default 2000)")
    parser.add_argument("--alpha", type=float, default=0.05, help="family-wise level (default 0.05)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed (default 0); the four readings of a scenario see the same sweeps")
    args = parser.parse_args(argv)
    print_conditions()
    if args.sims < 1:
        parser.error(f"--sims must be >= 1, got {args.sims}")

    start = time.perf_counter()
    rows = []
    for scenario in DIFFERENCE_SCENARIOS:
        cells = [scenario_label(*scenario)]
        for r in readings(scenario, args):
            power = "—" if math.isnan(r["power"]) else f"{r['power']:.3f} ({r['power_any']:.3f})"
            cells += [rate(r["fwer"]), power]
        rows.append(cells)
    header = ["scenario (points x seeds, noise, ρ, effect in sd)"]
    for name, *_ in READINGS:
        header += [f"{name}: FWER", f"{name}: power all (any)"]

    equivalence_rows = []
    for scenario in EQUIVALENCE_SCENARIOS:
        cells = [scenario_label(*scenario)]
        cells += [rate(r["false_equivalence"]) for r in readings(scenario, args, margin_at_effect=True)]
        equivalence_rows.append(cells)

    print(f"{args.sims} simulated sweeps per cell, α = {args.alpha}, seed {args.seed}; Monte-Carlo standard error "
          f"{math.sqrt(args.alpha * (1 - args.alpha) / args.sims):.4f} at a rate of α, "
          f"{math.sqrt(0.25 / args.sims):.4f} at most")
    print()
    print("Difference: FWER (>= 1 truly equal pair called different) and power (every pair with the better point "
          "called different; any of them)")
    print()
    print(markdown(header, rows))
    print()
    print("Equivalence, margin = effect (the pairs with point 0 on the equivalence null): share of sweeps with >= 1 "
          "of them shown equivalent (adjusted TOST p < α)")
    print()
    print(markdown(["scenario (points x seeds, noise, ρ, effect = margin in sd)", *(name for name, *_ in READINGS)],
                   equivalence_rows))
    print()
    family_rows = []
    for points, seeds, correlation, metric_correlation in FAMILY_SCENARIOS:
        r = simulate_families(points, seeds, metric_correlation=metric_correlation, correlation=correlation,
                              sims=args.sims, alpha=args.alpha, seed=args.seed)
        family_rows.append([f"{points} x {seeds}, ρ = {correlation:g}, metrics r = {metric_correlation:g}",
                            rate(r["first"]), rate(r["second"]), rate(r["either"])])
    print("Two families (sweep.secondary), A/A on both metrics, paired + Holm within each family: share of sweeps with "
          ">= 1 pair called different")
    print()
    print(markdown(["scenario (points x seeds, ρ, correlation of the two metrics)", "objective's family",
                    "secondary family", "either family"], family_rows))
    print()
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
