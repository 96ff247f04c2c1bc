"""Sequential verdicts of a sweep (`sweep.seeds=auto`): seeds added in rounds until every pair of grid
points is decided, the family-wise error rate kept over all pairs, all looks and both kinds of hypothesis.

A sweep with automatic seeds trains every grid point with a first round of `first_round` seeds, then
rounds of `round_size` more, up to `max_seeds` per point. The looks are the seed counts
n_1 = first_round < n_1 + round_size < ... < n_K = max_seeds (`SequentialDesign.looks`), fixed before
any value is seen. After each round `decide` reads every pair of points as DIFFERENT, EQUIVALENT
(within ±margin; only with a margin) or OPEN, keeps what earlier looks decided, and names the points
that need the next round: those in an undecided pair, until max_seeds. Its result, a `RoundState`, is
a pure function of (design, values, previous state) and a plain dict (JSON) through `to_dict` /
`from_dict`, so a driver that stores it and is killed resumes with the same decisions.
`simulate_sequential` measures the procedure on sweeps with a known truth, next to the fixed design at
max_seeds (`verdicts.simulate` on the same simulated sweeps).

The design: group-sequential paired t-tests with α-spending, and Holm over the family by the
sequentially rejective procedure for group-sequential trials of Maurer & Bretz (2013, "Multiple
testing in group sequential trials using graphical approaches", Statistics in Biopharmaceutical
Research 5:311-320; Holm is their graph with equal weights passed on evenly).

- Test, as `verdicts.compare_all` reads a blocked sweep: at look k a pair is compared over the n_k
  seeds both points have (seed i of every point shares its initial weights, data order and evaluation
  draws, which cancel in the per-seed difference d = a - b) by the paired t statistic
  t = mean(d) / (sd(d) / √n_k); its equivalence within ±margin by the two one-sided statistics
  (mean(d) + margin) / se and (margin - mean(d)) / se, shown when both exceed a one-sided boundary
  (i.e. their minimum, the TOST statistic, does). Zero spread reads as `statistics` reads it: t is 0
  for a zero numerator, ±inf otherwise.
- Spending (`alpha_spent`): a hypothesis tested at level γ may reject by look k with probability at
  most γ(t_k), t_k = n_k / max_seeds: Lan-DeMets O'Brien-Fleming type (the default)
  γ(t) = 2 - 2Φ(z_{1-γ/2} / √t), which spends almost nothing at the first looks and keeps the last
  boundary close to the fixed design's; or Pocock type γ(t) = γ ln(1 + (e - 1) t), which spends
  early and evenly. γ(1) = γ: with one look (first_round = max_seeds) the design is the fixed one.
- Boundaries (`boundaries`): c_k with P0(no crossing before k, |T_k| > c_k) = γ(t_k) - γ(t_{k-1})
  (one-sided: T_k > c_k) for the vector (T_1, ..., T_K) of one null hypothesis' paired t statistics.
  Under normal differences with mean zero that vector is pivotal (its law does not depend on the
  differences' sd), so its law is drawn once per set of looks: `NULL_DRAWS` (2^21) draws built from
  each round's sufficient statistics (`_null_statistics`), numpy's PCG64 seeded with `NULL_SEED`, so
  the boundaries are deterministic. The first look's boundary is exact (Student's t quantile); each
  later one is the empirical quantile, among the draws that have not crossed yet, that brings the
  number of crossings to c - 2√c, c = γ(t_k) · draws: the realised level of a hypothesis is below γ by
  about two Monte-Carlo standard errors (2 sqrt(γ / 2^21), 1.5 % of γ at γ = α / 6: 3 points with a
  margin), so that it exceeds γ only with a probability of about 2 %. Normal-theory boundaries (the z
  statistics' canonical joint law, each boundary read as a nominal p-value for the t test at its
  look) are the usual shortcut; they were not taken because at these seed counts they are
  anti-conservative: over 10^6 simulated null sweeps their realised level was 1.03-1.13 γ (looks 5,
  8, 11, 12 / 3, 6, 9, 12 / 4, 8, 12 / 5, 10; both spendings; γ = 0.05 and 0.05 / 6), the Monte-Carlo
  boundaries' 0.99-1.03 γ before the two-standard-error margin (the t statistics of successive looks
  share their variance estimate, which the z law ignores).
- Family and Holm: every pair's "no difference" null and, with a margin, its "|Δ| >= margin" null —
  the 2m hypotheses of `verdicts.compare_all`'s family (for each pair at most one of the two is true),
  fixed at the first look as all pairs of the points given then. At look k, with h hypotheses not yet
  rejected, each one still tested is checked against its boundary at look k for level α / h; those
  crossing are rejected, h shrinks (their α is recycled to the rest) and the check repeats until none
  crosses. A rejection is final. This is the shortcut of the closed test whose intersection
  hypotheses H_J are rejected at the first look at which some member crosses its own group-sequential
  boundary for level α / |J| (Bonferroni: level α under any dependence between the pairs). The
  shortcut needs every boundary to be non-increasing in the level; `_boundary_table` enforces it by
  raising a boundary to the largest one of the higher levels at that look, which only lowers its
  crossing probability. Earlier looks are not re-tested at a recycled level (allowed by the closed
  test, forgone: it costs power only). With one look this is Holm's procedure exactly as
  `compare_all` applies it.
- A decided pair (DIFFERENT or EQUIVALENT) is no longer tested: its other null stays in the family
  unrejected, its share of α is not recycled. A pair is tested at look k only when its two points
  share exactly n_k seeds; otherwise (fewer than 2 common seeds included) it reads UNTESTABLE at that
  look and stays undecided: skipping a planned look can only lower a crossing probability, testing at
  an unplanned number of seeds could raise it.
- Seeds: after look k < K a point needs the next round (n_{k+1} seeds) when it is in an undecided pair
  (OPEN or UNTESTABLE); the sweep ends when no point does. At the last look OPEN stays OPEN.

Assumptions: the per-seed differences of a pair are independent across seeds and normal with a common
mean and sd (the boundaries' null law; heavier tails are checked by simulation, not covered by the
argument); the seeds of each round are the next ones of one fixed order, the same for every point; the
looks are fixed in advance and the decision to add seeds depends only on the statuses (no other
data-driven stopping); there is no futility stopping: EQUIVALENT is an early stop of its own, a rejected
null in the same family, and "open at max_seeds" is only "not decided".

Why not adastop (`adastop.MultipleAgentsComparator`, Mathieu et al., "AdaStop: adaptive statistical
testing for sound comparisons of deep RL agents"; benchmarks/sequential_calibration.py measures both at
the project's sizes): it compares the points as independent groups by a permutation test of mean
differences, so the seed blocking is ignored — a shared seed effect counts as noise: 3 points, one 1 sd
better, seed correlation 0.8, rounds of 5 to 10 seeds: power 0.35 (adastop at α / 2, 100 sweeps)
against 0.96 here; its early "equal" is "no difference found", not equivalence within a margin; its
rounds must have equal sizes and it spends α linearly over them; a permutation test over 3 + 3 values
cannot go below p = 0.1 (20 splits), over 5 + 5 not below 1/126; and version 0.1.3 compares the
two-sided |mean difference| with the permutation law of the signed maximum, a one-sided reference, so
it tests at about 2α (one A/A pair, 5 + 5 normal values, one look, α = 0.05: 0.097 ± 0.009; 3 A/A
points in two rounds of 5: FWER 0.09). Run at α / 2 it keeps α, and on independent seeds its power is
close to this design's (its max-T step-down uses the dependence between pairs that share a point, which
Holm's Bonferroni steps do not). A decision costs it 80-100 ms of Python permutations at rounds of 5
(about 1 s at rounds of 4, where it enumerates 70² splits), against 3-10 ms here once a design's
boundaries are drawn (about a second per design and process). Its one advantage, no normality
assumption, is checked here by simulation instead: t3 noise keeps the FWER below α.

numpy, scipy and statsmodels are imported where used: importing this module costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from itertools import combinations
from numbers import Integral, Real
from statistics import fmean
from typing import Any, Mapping, NamedTuple

from lightning_mim.statistics import ALPHA, paired_p_value
from lightning_mim.verdicts import (
    DIFFERENT,
    EQUIVALENT,
    OPEN,
    PAIRED,
    UNTESTABLE,
    _check_level,
    _check_positive,
    _check_simulation,
    _checked_values,
    _equivalence_p,
    _noise,
    _sides,
    _spread,
    simulate,
)

OBRIEN_FLEMING, POCOCK = "obrien_fleming", "pocock"
SPENDINGS = (OBRIEN_FLEMING, POCOCK)
SPENDING_NAMES = {OBRIEN_FLEMING: "O'Brien–Fleming", POCOCK: "Pocock"}  # as the literature writes them
STATUSES = (DIFFERENT, EQUIVALENT, OPEN, UNTESTABLE)
MAX_LOOKS = 16  # the null draws hold 8 MiB per look
NULL_DRAWS = 1 << 21
NULL_SEED = 2013
NULL_MARGIN = 2.0  # Monte-Carlo standard errors the crossings of the null draws are kept below γ(t_k)


# --- the design ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequentialDesign:
    """Seeds in rounds: `first_round` seeds per point (>= 2: a paired t-test needs 2 pairs), then
    `round_size` (>= 1) more per round for the points still in an undecided pair, up to `max_seeds`
    (>= first_round) per point; `alpha`: the family-wise level over all pairs, looks and hypotheses;
    `equivalence`: the margin (> 0, objective units) of the EQUIVALENT verdict, None for none (then only
    DIFFERENT ends a pair early); `spending`: OBRIEN_FLEMING ("obrien_fleming") or POCOCK ("pocock").

    First round: 5 seeds is the suggested size. At 3 seeds a paired t-test has 2 degrees of freedom:
    even with one look, at α / 6 (3 points with a margin) it needs |t| > 10.9 (4.85 at 5 seeds), and an
    O'Brien-Fleming first look asks more; a permutation test cannot reject at 0.05 at all there (3 + 3
    values: p >= 0.1). A first look that can decide next to nothing only adds a round. The last round
    is cut short at max_seeds; a short one (5, 8, 11, 12) spends most of α before the last look, evenly
    spaced looks (5, 10, 15; 3, 6, 9, 12) do not. first_round = max_seeds is the fixed design (one look).
    """

    first_round: int
    round_size: int
    max_seeds: int
    alpha: float = ALPHA
    equivalence: float | None = None
    spending: str = OBRIEN_FLEMING

    def __post_init__(self) -> None:
        _check_count(self.first_round, "first_round", 2)
        _check_count(self.round_size, "round_size", 1)
        _check_count(self.max_seeds, "max_seeds", self.first_round)
        _check_level(self.alpha, "alpha")
        _check_positive(self.equivalence, "equivalence")
        _check_spending(self.spending)
        looks = -(-(self.max_seeds - self.first_round) // self.round_size) + 1
        if looks > MAX_LOOKS:
            raise ValueError(f"round_size must give at most {MAX_LOOKS} looks, got {self.round_size} "
                             f"({looks} looks from {self.first_round} to {self.max_seeds} seeds)")

    @property
    def looks(self) -> tuple[int, ...]:
        """The seed counts per point at which `decide` reads: first_round, + round_size, ..., max_seeds
        (the last round is cut short at max_seeds)."""
        return tuple(range(self.first_round, self.max_seeds, self.round_size)) + (self.max_seeds,)

    def hypotheses(self, n_points: int) -> int:
        """The family's size for n_points points: one null per pair, two with a margin."""
        return math.comb(n_points, 2) * (1 if self.equivalence is None else 2)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SequentialDesign:
        return cls(**_exact_keys(data, cls, "design"))


def alpha_spent(spending: str, level: float, fraction: float) -> float:
    """γ(t): the part of a hypothesis' level γ (`level`) it may spend by information fraction
    t = n_k / max_seeds (`fraction`, in (0, 1]): OBRIEN_FLEMING 2 - 2Φ(z_{1-γ/2} / √t), POCOCK
    γ ln(1 + (e - 1) t) (module docstring); exactly γ at t = 1."""
    _check_spending(spending)
    _check_level(level, "level")
    if not (isinstance(fraction, Real) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if fraction == 1:
        return float(level)
    if spending == POCOCK:
        return level * math.log1p((math.e - 1) * fraction)
    from scipy.stats import norm

    return float(2 * norm.sf(norm.isf(level / 2) / math.sqrt(fraction)))


def boundaries(level: float, looks: tuple[int, ...], spending: str = OBRIEN_FLEMING,
               sides: int = 2) -> tuple[float, ...]:
    """Critical values (c_1, ..., c_K) of one hypothesis tested at `level` at `looks` (increasing seed
    counts, the first >= 2) with `spending`: sides=2 rejects at look k when |t| > c_k (t the paired t
    statistic over n_k seeds), sides=1 when t > c_k; the null crossing probability by look k is
    γ(t_k) (module docstring: exact at the first look, Monte Carlo after). math.inf: nothing left to
    spend at that look. Cached per (level, looks, spending, sides)."""
    _check_level(level, "level")
    _check_looks(looks)
    _check_spending(spending)
    if sides not in (1, 2):
        raise ValueError(f"sides must be 1 or 2, got {sides!r}")
    return _boundaries(float(level), tuple(int(n) for n in looks), spending, sides)


@lru_cache(maxsize=4096)
def _boundaries(level: float, looks: tuple[int, ...], spending: str, sides: int) -> tuple[float, ...]:
    import numpy as np
    from scipy import stats

    spent = [alpha_spent(spending, level, n / looks[-1]) for n in looks]
    critical = [float(stats.t.isf(spent[0] / sides, looks[0] - 1))]
    if len(looks) == 1:
        return tuple(critical)
    null = _null_statistics(looks)
    draws = null.shape[0]

    def statistic(k: int):
        return np.abs(null[:, k]) if sides == 2 else null[:, k]

    crossed = statistic(0) > critical[0]
    for k in range(1, len(looks)):
        x = statistic(k)
        count = spent[k] * draws
        new = math.floor(count - NULL_MARGIN * math.sqrt(count)) - int(crossed.sum())  # < the draws left
        if new <= 0:
            critical.append(math.inf)
            continue
        alive = x[~crossed]
        index = alive.size - new - 1  # exactly `new` alive draws lie above this one
        critical.append(float(np.partition(alive, index)[index]))
        crossed |= x > critical[-1]
    return tuple(critical)


@lru_cache(maxsize=2)
def _null_statistics(looks: tuple[int, ...]):
    """(NULL_DRAWS, K) float32: draws of one null hypothesis' paired t statistics at the looks
    (differences N(0, 1); the law is the same for any sd). Per round j of m_j = n_j - n_{j-1} seeds:
    its sum U_j ~ N(0, m_j) and its sum of squares about its own mean W_j ~ χ²(m_j - 1), independent;
    after look k, with S = Σ U_j, the sum of squares about the overall mean is
    Q = Σ W_j + Σ U_j² / m_j - S² / n_k and t = S / sqrt(n_k Q / (n_k - 1))."""
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(NULL_SEED))
    out = np.empty((NULL_DRAWS, len(looks)), dtype=np.float32)
    total, within, between = np.zeros(NULL_DRAWS), np.zeros(NULL_DRAWS), np.zeros(NULL_DRAWS)
    previous = 0
    for k, n in enumerate(looks):
        m, previous = n - previous, n
        u = rng.standard_normal(NULL_DRAWS) * math.sqrt(m)
        if m > 1:
            within += 2 * rng.standard_gamma((m - 1) / 2, NULL_DRAWS)
        total += u
        between += u * u / m
        squares = np.maximum(within + between - total * total / n, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[:, k] = total / np.sqrt(n * squares / (n - 1))
    out.flags.writeable = False
    return out


@lru_cache(maxsize=32)
def _boundary_table(alpha: float, looks: tuple[int, ...], spending: str, hypotheses: int, sides: int):
    """(K, hypotheses + 1) array: [k, h] the boundary at look k for level α / h (h hypotheses left;
    column 0 unused, inf), made non-decreasing in h (module docstring: Holm's shortcut needs it)."""
    import numpy as np

    table = np.full((len(looks), hypotheses + 1), np.inf)
    for h in range(1, hypotheses + 1):
        table[:, h] = _boundaries(alpha / h, looks, spending, sides)
    table[:, 1:] = np.maximum.accumulate(table[:, 1:], axis=1)
    table.flags.writeable = False
    return table


def _tables(design: SequentialDesign, hypotheses: int):
    """(two-sided table, one-sided table or None without a margin) for a family of `hypotheses`."""
    key = (float(design.alpha), design.looks, design.spending, hypotheses)
    return _boundary_table(*key, 2), None if design.equivalence is None else _boundary_table(*key, 1)


# --- one look --------------------------------------------------------------------------------------------


def _t_statistics(differences, margin: float | None):
    """(t, TOST statistic or None without a margin) of per-seed differences along the last axis:
    t = mean / se, TOST min((mean + margin) / se, (margin - mean) / se), se = sd / √n (ddof 1); zero
    spread: 0 for a zero numerator, else ±inf by its sign."""
    import numpy as np

    n = differences.shape[-1]
    mean = differences.mean(axis=-1)
    se = differences.std(axis=-1, ddof=1) / math.sqrt(n)

    def ratio(numerator):
        with np.errstate(divide="ignore", invalid="ignore"):
            exact = np.where(numerator == 0, 0.0, np.copysign(np.inf, numerator))
            return np.where(se > 0, numerator / se, exact)

    if margin is None:
        return ratio(mean), None
    return ratio(mean), np.minimum(ratio(mean + margin), ratio(margin - mean))


def _step_down(t, tost, tested, rejected, two, one):
    """Holm's step-down at one look, for many sweeps at once. t, tost: (sweeps, pairs) statistics (tost
    None without a margin); tested: (sweeps, pairs) the pairs tested at this look; rejected: (sweeps,
    hypotheses) before this look, the difference nulls first, then the equivalence nulls; two, one:
    this look's boundaries by hypotheses left (`_boundary_table` rows). Returns (rejected after this
    look, left): left[s, i] the hypotheses left when i was rejected, or when the step-down stopped."""
    import numpy as np

    hypotheses = rejected.shape[1]
    pairs = t.shape[1]
    rejected = rejected.copy()
    statistic = np.abs(t) if tost is None else np.concatenate([np.abs(t), tost], axis=1)
    checked = np.tile(tested, (1, hypotheses // max(pairs, 1)))
    two_sided = np.arange(hypotheses) < pairs
    left = np.zeros(rejected.shape, dtype=int)
    while True:
        h = hypotheses - rejected.sum(axis=1)
        bound = np.where(two_sided, two[h][:, None], np.inf if one is None else one[h][:, None])
        waiting = checked & ~rejected
        left = np.where(waiting, h[:, None], left)
        new = waiting & (statistic > bound)
        if not new.any():
            return rejected, left
        rejected |= new


def _decided(rejected, pairs: int):
    """(sweeps, pairs): a null of the pair rejected (columns: difference nulls, then equivalence)."""
    return rejected.reshape(rejected.shape[0], -1, pairs).any(axis=1)


# --- the decisions of a round ------------------------------------------------------------------------


@dataclass(frozen=True)
class PairDecision:
    """Pair (a, b) at a look, as `decide` reads it.

    status: DIFFERENT or EQUIVALENT (final: the numbers are those of the look that decided it), OPEN
      (tested at this look, nothing rejected) or UNTESTABLE (not tested at this look: its points do not
      share exactly the look's number of seeds).
    seeds: the seeds the two points share at the look the numbers are from.
    difference: mean per-seed difference a - b over them. statistic: the paired t; p_value: its nominal
      two-sided p (`statistics.paired_p_value`); level: α / (hypotheses left) when the null was
      rejected or the step-down stopped; boundary: the critical |t| at that level and look;
      nominal_level: the two-sided p of the boundary, i.e. the null is rejected when p_value < it.
    equivalence_*: the same for "|Δ| >= margin": the TOST statistic min(t_lower, t_upper), its p
      (`ttost_paired`, the larger one-sided p), the one-sided boundary and its one-sided p (None without
      a margin).
    different_at, equivalent_at: the look (index) at which that null was rejected, None if it was not.
    """

    a: str
    b: str
    status: str
    seeds: int
    difference: float | None = None
    statistic: float | None = None
    p_value: float | None = None
    level: float | None = None
    boundary: float | None = None
    nominal_level: float | None = None
    equivalence_statistic: float | None = None
    equivalence_p: float | None = None
    equivalence_level: float | None = None
    equivalence_boundary: float | None = None
    equivalence_nominal_level: float | None = None
    different_at: int | None = None
    equivalent_at: int | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    @property
    def decided(self) -> bool:
        return self.status in (DIFFERENT, EQUIVALENT)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: non-finite numbers as the strings "inf" and "-inf"."""
        return {f.name: _encoded(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PairDecision:
        return cls(**{name: value if name in ("a", "b", "status") else _decoded(value)
                      for name, value in _exact_keys(data, cls, "pair").items()})


@dataclass(frozen=True)
class RoundState:
    """The verdicts after look `look` (index into design.looks) of every pair of `points` (in the order
    of the labels, as `verdicts.compare_all` pairs them), what earlier looks decided included.
    `to_dict` adds the derived fields for readers; `from_dict` reads back what `to_dict` wrote."""

    design: SequentialDesign
    look: int
    points: tuple[str, ...]
    pairs: tuple[PairDecision, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.design, SequentialDesign):
            raise ValueError(f"design must be a SequentialDesign, got {type(self.design).__name__}")
        if not (isinstance(self.look, Integral) and not isinstance(self.look, bool)
                and 0 <= self.look < len(self.design.looks)):
            raise ValueError(f"look must be an index into the design's {len(self.design.looks)} looks, "
                             f"got {self.look!r}")
        expected = list(combinations(self.points, 2))
        if len(set(self.points)) != len(self.points) or [(p.a, p.b) for p in self.pairs] != expected:
            raise ValueError(f"pairs must be every pair of the distinct points {list(self.points)} in order, "
                             f"got {[(p.a, p.b) for p in self.pairs]}")

    @property
    def seeds(self) -> int:
        """Seeds per point at this look."""
        return self.design.looks[self.look]

    @property
    def last(self) -> bool:
        return self.look == len(self.design.looks) - 1

    @property
    def points_needing_seeds(self) -> tuple[str, ...]:
        """The points in an undecided pair (OPEN or UNTESTABLE), in `points`' order; none at the last look."""
        if self.last:
            return ()
        undecided = {label for p in self.pairs if not p.decided for label in (p.a, p.b)}
        return tuple(label for label in self.points if label in undecided)

    @property
    def seeds_to_add(self) -> dict[str, int]:
        """Point -> the seed count it is to reach for the next look."""
        return {label: self.design.looks[self.look + 1] for label in self.points_needing_seeds}

    @property
    def finished(self) -> bool:
        """Nothing left to add: every pair decided, or the last look read."""
        return not self.points_needing_seeds

    @property
    def rejected(self) -> tuple[tuple[str, str, str, int], ...]:
        """The nulls rejected so far: (DIFFERENT for "no difference" or EQUIVALENT for "|Δ| >= margin",
        a, b, look)."""
        out = []
        for p in self.pairs:
            out += [(kind, p.a, p.b, at) for kind, at in ((DIFFERENT, p.different_at), (EQUIVALENT, p.equivalent_at))
                    if at is not None]
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {"design": self.design.to_dict(), "look": self.look, "points": list(self.points),
                "pairs": [p.to_dict() for p in self.pairs], "seeds": self.seeds,
                "points_needing_seeds": list(self.points_needing_seeds), "seeds_to_add": self.seeds_to_add,
                "finished": self.finished}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundState:
        if not isinstance(data, Mapping):
            raise ValueError(f"state must be a dict as RoundState.to_dict writes it, got {type(data).__name__}")
        missing = {"design", "look", "points", "pairs"} - set(data)
        if missing:
            raise ValueError(f"state: missing keys {sorted(missing)}")
        return cls(design=SequentialDesign.from_dict(data["design"]), look=data["look"],
                   points=tuple(data["points"]), pairs=tuple(PairDecision.from_dict(p) for p in data["pairs"]))


def decide(design: SequentialDesign, values: Mapping[str, Mapping[str, float]],
           previous: RoundState | None = None) -> RoundState:
    """The verdicts of the next look: the first (index 0) without `previous`, else previous.look + 1.

    values: point label -> {seed: objective value}, seeds shared across points (as `verdicts.compare_all`
    takes them; a point may have none, e.g. when every trial of it failed: its pairs are UNTESTABLE); call
    once per round, after the round's seeds are in. The points are fixed at the first look (the family is
    all their pairs); later calls must give the same labels. Pairs decided earlier keep their verdict and
    numbers; every other pair is tested when its points share exactly this look's number of seeds (else
    UNTESTABLE at this look), and Holm steps down over the family (module docstring). Pure: equal
    arguments give equal states.
    """
    import numpy as np

    if not isinstance(design, SequentialDesign):
        raise ValueError(f"design must be a SequentialDesign, got {type(design).__name__}")
    points = _checked_points(values)
    if not points:
        raise ValueError("values: no points (needs point label -> {seed: value})")
    labels = tuple(points) if previous is None else _checked_previous(design, previous, points)
    look = 0 if previous is None else previous.look + 1
    before = {} if previous is None else {(p.a, p.b): p for p in previous.pairs if p.decided}
    pairs = list(combinations(labels, 2))
    m = len(pairs)
    rejected = np.zeros((1, design.hypotheses(len(labels))), dtype=bool)
    for i, pair in enumerate(pairs):
        if pair in before:
            rejected[0, i] = before[pair].different_at is not None
            if design.equivalence is not None:
                rejected[0, m + i] = before[pair].equivalent_at is not None
    sides = {i: _sides(points[a], points[b], blocked=True) for i, (a, b) in enumerate(pairs) if (a, b) not in before}
    tested = {i: s for i, s in sides.items() if s.test == PAIRED and len(s.a) == design.looks[look]}
    t, tost = np.full((1, m), np.nan), np.full((1, m), np.nan)
    for i, s in tested.items():
        t[0, i], tost[0, i] = _pair_statistics(s, design.equivalence)
    two, one = _tables(design, rejected.shape[1])
    one = None if one is None else one[look]
    after, left = _step_down(t, None if one is None else tost, np.isin(np.arange(m), list(tested))[None], rejected,
                             two[look], one)
    read = _Look(design, look, t[0], tost[0], two[look], one, after[0], left[0])
    return RoundState(design=design, look=look, points=labels, pairs=tuple(
        before[pair] if pair in before
        else _read_pair(read, pair, i, tested[i]) if i in tested
        else PairDecision(*pair, UNTESTABLE, seeds=len(sides[i].common_a))
        for i, pair in enumerate(pairs)))


class _Look(NamedTuple):
    """What `_read_pair` needs of a look: the pairs' paired t and TOST statistics (NaN: not tested, or
    no margin), the boundaries by hypotheses left (one: None without a margin), and from `_step_down`
    the hypotheses rejected after the look and the hypotheses left at each (m pairs: column i is pair
    i's difference null, m + i its equivalence null)."""

    design: SequentialDesign
    look: int
    t: Any
    tost: Any
    two: Any
    one: Any
    rejected: Any
    left: Any


def _pair_statistics(sides, margin: float | None) -> tuple[float, float]:
    """(paired t, TOST statistic or NaN without a margin) of a pair's paired sides (`_t_statistics`)."""
    import numpy as np

    t, tost = _t_statistics(np.subtract(sides.a, sides.b)[None], margin)
    return float(t[0]), math.nan if tost is None else float(tost[0])


def _read_pair(read: _Look, pair: tuple[str, str], i: int, sides) -> PairDecision:
    """Pair i (labels `pair`), tested at this look, with its numbers and its status."""
    from scipy import stats

    design, m = read.design, len(read.t)
    n = len(sides.a)
    difference = fmean(sides.a) - fmean(sides.b)
    different = bool(read.rejected[i])
    numbers = dict(seeds=n, difference=difference, statistic=float(read.t[i]), p_value=paired_p_value(sides.a, sides.b),
                   level=design.alpha / int(read.left[i]), boundary=float(read.two[read.left[i]]),
                   nominal_level=float(2 * stats.t.sf(read.two[read.left[i]], n - 1)),
                   different_at=read.look if different else None)
    equivalent = False
    if design.equivalence is not None:
        equivalent = bool(read.rejected[m + i])
        boundary = float(read.one[read.left[m + i]])
        numbers.update(equivalence_statistic=float(read.tost[i]),
                       equivalence_level=design.alpha / int(read.left[m + i]),
                       equivalence_p=_equivalence_p(sides, difference, _spread(sides), design.equivalence),
                       equivalence_boundary=boundary, equivalence_nominal_level=float(stats.t.sf(boundary, n - 1)),
                       equivalent_at=read.look if equivalent else None)
    status = DIFFERENT if different else EQUIVALENT if equivalent else OPEN
    return PairDecision(*pair, status=status, **numbers)


def _checked_points(values: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """values as `verdicts._checked_values` reads them (ValueError for non-finite values), except that a
    point may have no values."""
    if not isinstance(values, Mapping):
        return _checked_values(values)  # raises
    present = _checked_values({label: by for label, by in values.items() if not (isinstance(by, Mapping) and not by)})
    return {label: present.get(label, {}) for label in values}


def _checked_previous(design: SequentialDesign, previous: RoundState, points: Mapping[str, Any]) -> tuple[str, ...]:
    """previous's points, after checking that it belongs to this design and these points and that a
    look is left."""
    if not isinstance(previous, RoundState):
        raise ValueError(f"previous must be None or a RoundState, got {type(previous).__name__}")
    if previous.design != design:
        raise ValueError(f"previous: read with another design ({previous.design}), not {design}")
    if set(points) != set(previous.points):
        raise ValueError(f"values: points {sorted(points)}, but the family was fixed at the first look with "
                         f"{sorted(previous.points)}")
    if previous.finished:
        raise ValueError(f"previous: finished at look {previous.look} ({previous.seeds} seeds); nothing left to decide")
    return previous.points


# --- simulation ----------------------------------------------------------------------------------------


class _Run(NamedTuple):
    """`decide` over many simulated sweeps: rejected (sweeps, hypotheses) at the end, rejected_at the
    look of each rejection (-1: none), sign (sweeps, pairs) the sign of the paired t where the
    difference null was rejected (0 elsewhere), seeds (sweeps, points) the seeds each point got."""

    rejected: Any
    rejected_at: Any
    sign: Any
    seeds: Any


def simulate_sequential(design: SequentialDesign, n_points: int, *, effect: float = 0.0, noise: str = "normal",
                        correlation: float = 0.0, sims: int, seed: int = 0) -> dict[str, float]:
    """Monte-Carlo sweeps with a known truth, read look by look as `decide` reads them (vectorised over
    the sweeps; a test checks the two agree sweep by sweep), next to the fixed design: `verdicts.simulate`
    at max_seeds with the same α and margin, on the same simulated sweeps (the sequential reading sees
    their first n_k seeds at look k).

    Truth and noise as `verdicts.simulate` has them: point 0 lower by `effect`, all others equal, the
    effect and design.equivalence in noise-sd units; noise "normal" or "t3" (unit variance),
    equicorrelated across the points of a seed with `correlation`; numpy's Generator(PCG64(seed)).

    Returns shares of the `sims` sweeps (the fixed design's with the prefix "fixed_"):
    - fwer: >= 1 truly equal pair read DIFFERENT at some look; mc_error its binomial standard error;
    - power: every pair with point 0 DIFFERENT with point 0 the better one (NaN when effect is 0);
      power_any: at least one of them;
    - false_equivalence: >= 1 "|Δ| >= margin" null rejected for a pair whose true |Δ| >= margin (0.0
      when no pair is that far apart; NaN without a margin);
    - mean_seeds: the seeds a point got, averaged over points and sweeps (the fixed design: max_seeds);
      finished_early: the share of sweeps that needed no round to max_seeds;
    - sims.
    """
    if not isinstance(design, SequentialDesign):
        raise ValueError(f"design must be a SequentialDesign, got {type(design).__name__}")
    _check_simulation(n_points, design.max_seeds, effect, noise, correlation, sims)
    import numpy as np

    truth = np.where(np.arange(n_points) == 0, -float(effect), 0.0)
    shape = (sims, n_points, design.max_seeds)
    run = _run(design, truth[None, :, None] + _noise(np.random.default_rng(seed), noise, correlation, shape))
    first, second = (np.array(side) for side in zip(*combinations(range(n_points), 2)))
    gap = np.abs(truth[first] - truth[second])
    shown_different = run.rejected[:, :gap.size]
    better_found = (shown_different & (run.sign < 0))[:, first == 0]  # point 0 is every pair's a
    margin = design.equivalence
    wrong = shown_different[:, gap == 0].any(axis=1).mean()  # no truly equal pair: 0.0
    shares = dict(fwer=float(wrong), mc_error=math.sqrt(wrong * (1 - wrong) / sims))
    if effect > 0:
        shares.update(power=float(better_found.all(axis=1).mean()), power_any=float(better_found.any(axis=1).mean()))
    else:
        shares.update(power=math.nan, power_any=math.nan)
    shares["false_equivalence"] = (math.nan if margin is None
                                   else float(run.rejected[:, gap.size:][:, gap >= margin].any(axis=1).mean()))
    shares.update(mean_seeds=float(run.seeds.mean()),
                  finished_early=float((run.seeds < design.max_seeds).all(axis=1).mean()))
    fixed = simulate(n_points, design.max_seeds, effect=effect, noise=noise, correlation=correlation, sims=sims,
                     alpha=design.alpha, equivalence=margin, seed=seed)  # the same draws: the same sweeps
    shares.update({f"fixed_{key}": fixed[key] for key in ("fwer", "power", "power_any", "false_equivalence")})
    shares["sims"] = float(sims)
    return shares


def _run(design: SequentialDesign, values) -> _Run:
    """The sequential reading of (sweeps, points, max_seeds) values: at look k every undecided pair is
    tested over the first n_k seeds (its points have them: a point in an undecided pair gets every
    round), Holm steps down (`_step_down`) and the points of undecided pairs get the next round."""
    import numpy as np

    sims, n_points, _ = values.shape
    pairs = list(combinations(range(n_points), 2))
    m = len(pairs)
    hypotheses = design.hypotheses(n_points)
    two, one = _tables(design, hypotheses)
    differences = values[:, [i for i, _ in pairs]] - values[:, [j for _, j in pairs]]
    member = np.array([[p in pair for p in range(n_points)] for pair in pairs]).reshape(m, n_points)
    rejected = np.zeros((sims, hypotheses), dtype=bool)
    rejected_at = np.full((sims, hypotheses), -1)
    sign = np.zeros((sims, m))
    seeds = np.full((sims, n_points), design.looks[0])
    for k, n in enumerate(design.looks):
        t, tost = _t_statistics(differences[..., :n], design.equivalence)
        after, _ = _step_down(t, tost, ~_decided(rejected, m), rejected, two[k], None if one is None else one[k])
        new = after & ~rejected
        rejected_at[new] = k
        sign = np.where(new[:, :m], np.sign(t), sign)
        rejected = after
        if k + 1 < len(design.looks):
            undecided = ~_decided(rejected, m)
            seeds = np.where((undecided[:, :, None] & member[None]).any(axis=1), design.looks[k + 1], seeds)
    return _Run(rejected, rejected_at, sign, seeds)


# --- guards and encoding ----------------------------------------------------------------------------------


def _check_count(value: int, name: str, least: int) -> None:
    if not (isinstance(value, Integral) and not isinstance(value, bool) and value >= least):
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _check_spending(spending: str) -> None:
    if spending not in SPENDINGS:
        raise ValueError(f"spending must be one of {SPENDINGS}, got {spending!r}")


def _check_looks(looks: tuple[int, ...]) -> None:
    ok = (isinstance(looks, (tuple, list)) and 1 <= len(looks) <= MAX_LOOKS
          and all(isinstance(n, Integral) and not isinstance(n, bool) for n in looks)
          and looks[0] >= 2 and all(a < b for a, b in zip(looks, looks[1:])))
    if not ok:
        raise ValueError(f"looks must be 1 to {MAX_LOOKS} increasing seed counts, the first >= 2, got {looks!r}")


def _exact_keys(data: Mapping[str, Any], cls, name: str) -> dict[str, Any]:
    """data as keyword arguments of the dataclass cls; ValueError for a non-mapping or unknown keys
    (missing ones fail in cls itself)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{name} must be a dict as to_dict writes it, got {type(data).__name__}")
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{name}: unknown keys {sorted(unknown)}")
    return dict(data)


def _encoded(value: Any) -> Any:
    """A JSON value: a non-finite float as "inf" / "-inf" (NaN does not occur), numpy scalars as Python's."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, Real) and not isinstance(value, bool):
        value = float(value)
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    return value


def _decoded(value: Any) -> Any:
    return float(value) if value in ("inf", "-inf") else value
