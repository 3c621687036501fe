"""The statistics behind the report: seed summaries, curve bands, time-to-target, performance profiles, Pareto
fronts and pairwise tests. Pure functions over numpy arrays; no plotting, no I/O.

Confidence intervals are Student-t intervals over seeds, mean +- t_{0.975, n-1} * s / sqrt(n) with the sample
standard deviation s (ddof=1): with the 3-10 seeds a benchmark affords, a percentile bootstrap is too narrow.
Time-to-target follows AlgoPerf (Dolan & More 2002 profiles; Dahl et al. 2023, "Benchmarking Neural Network
Training Algorithms"): the first evaluation at which the metric reaches the target, read off the learning curve.
Pairwise tests pair seeds (Demsar 2006; Colas et al. 2018, "How Many Random Seeds?"): a paired t-test and, from six
pairs on, Wilcoxon's signed-rank test, Holm-corrected, with the mean difference and its t interval, and the seeds a
two-sided paired t-test would need for 80% power at the observed effect (noncentral t), at the Bonferroni level
alpha/m of the m pairs compared together, so that the difference would survive the correction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from scipy import stats as sps

from .data import Curve

CONFIDENCE = 0.95
GRID_POINTS = 60


@dataclass(frozen=True)
class Summary:
    """Mean, sample std (ddof=1) and the t-based 95% CI over n seeds; NaN where n is too small."""

    mean: float
    std: float
    lo: float
    hi: float
    n: int


def t_halfwidth(std: np.ndarray | float, n: int, confidence: float = CONFIDENCE) -> np.ndarray | float:
    """Half-width of the two-sided t confidence interval of a mean: t_{(1+c)/2, n-1} * std / sqrt(n)."""
    if n < 2:
        return np.full_like(np.asarray(std, dtype=float), np.nan)
    return sps.t.ppf((1 + confidence) / 2, n - 1) * np.asarray(std) / math.sqrt(n)


def summarize(values: Sequence[float]) -> Summary:
    v = np.asarray(values, dtype=float)
    n = v.size
    if n == 0:
        return Summary(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else math.nan
    half = float(t_halfwidth(std, n))
    return Summary(mean, std, mean - half, mean + half, n)


# --- learning curves on a common grid ------------------------------------------------------------------------
def wide_range(curves: list[Curve], axis: str) -> bool:
    """Whether the positive x values of these curves span more than two decades (then a log axis reads better)."""
    xs = np.concatenate([c.x(axis) for c in curves] + [np.zeros(0)])
    xs = xs[xs > 0]
    return bool(xs.size) and float(xs.max()) / float(xs.min()) > 100


def common_grid(curves: list[Curve], axis: str, log: bool = False,
                points: int = GRID_POINTS) -> np.ndarray | None:
    """A grid over the x range every seed covers (no extrapolation): [points]; None if the seeds do not overlap.

    Seeds evaluate at different seconds (and, for population methods, examples), so their curves are linearly
    interpolated onto this grid before averaging. With `log`, the grid is log-spaced over positive x.
    """
    xs = [c.x(axis) for c in curves if c.value.size]
    if not xs:
        return None
    if log:
        xs = [x[x > 0] for x in xs]
        if not all(x.size for x in xs):
            return None
    lo, hi = max(float(x[0]) for x in xs), min(float(x[-1]) for x in xs)
    if not hi > lo:
        return None
    return np.geomspace(lo, hi, points) if log else np.linspace(lo, hi, points)


def band(curves: list[Curve], axis: str, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and t-based 95% CI band over seeds of curves interpolated onto grid: three [G] arrays."""
    ys = np.stack([np.interp(grid, c.x(axis), c.value) for c in curves])  # [S, G]
    mean = ys.mean(axis=0)
    if len(curves) < 2:
        return mean, mean.copy(), mean.copy()
    half = t_halfwidth(ys.std(axis=0, ddof=1), len(curves))
    return mean, mean - half, mean + half


# --- time to target ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reach:
    """How a group of seeds reached one target: medians over the seeds that reached it (NaN if none did)."""

    target: float
    reached: int
    n: int
    seconds: float
    examples: float
    flops: float
    profile_costs: dict[str, float]  # median over all n seeds, unreached = inf: finite iff a majority reached


def first_reach(curve: Curve | None, target: float) -> dict[str, float] | None:
    """Seconds, examples and FLOPs at the first evaluation whose value is >= target; None if never."""
    if curve is None:
        return None
    hits = np.flatnonzero(curve.value >= target)
    if not hits.size:
        return None
    i = int(hits[0])
    return {"seconds": float(curve.seconds[i]), "examples": float(curve.examples[i]), "flops": float(curve.flops[i])}


def time_to_target(curves: list[Curve | None], target: float) -> Reach:
    """`curves` has one entry per seed of the group (None for a seed without a curve, e.g. a failed trial)."""
    hits = [first_reach(c, target) for c in curves]
    got = [h for h in hits if h is not None]
    med = {a: float(np.median([h[a] for h in got])) if got else math.nan for a in ("seconds", "examples", "flops")}
    prof = {a: float(np.median([h[a] if h else math.inf for h in hits])) if hits else math.inf
            for a in ("seconds", "examples", "flops")}
    return Reach(target, len(got), len(curves), med["seconds"], med["examples"], med["flops"], prof)


# --- performance profiles (Dolan & More 2002) ----------------------------------------------------------------
def performance_ratios(costs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """costs: label -> [P] cost per problem (inf = attempted, not solved; NaN = not run). Ratio to the best label
    that attempted each problem: [P], NaN where the label did not run it; inf on a problem nobody solved, which
    stays in every attempting label's denominator."""
    labels = list(costs)
    mat = np.stack([np.asarray(costs[k], dtype=float) for k in labels])  # [L, P]
    ran = ~np.isnan(mat)
    best = np.where(ran, mat, np.inf).min(axis=0)  # [P]
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = np.where(np.isfinite(best), mat / np.where(np.isfinite(best), best, 1.0), np.inf)
    ratios = np.where(ran, ratios, np.nan)
    return {k: ratios[i] for i, k in enumerate(labels)}


def profile(ratios: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """rho(tau) = fraction of the problems the label ran that it solved within a factor tau of the best: [T]."""
    ran = ratios[~np.isnan(ratios)]
    if ran.size == 0:
        return np.zeros_like(taus)
    return (ran[None, :] <= taus[:, None]).mean(axis=1)


def tau_grid(ratios: dict[str, np.ndarray], points: int = 200) -> np.ndarray:
    finite = np.concatenate([r[np.isfinite(r)] for r in ratios.values()] + [np.ones(1)])
    top = max(2.0, float(finite.max()) * 1.1)
    return np.geomspace(1.0, top, points)


# --- Pareto front ---------------------------------------------------------------------------------------------
def pareto_front(costs: Sequence[float], accs: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats (cost <= and accuracy >=, one strictly), by increasing cost."""
    c, a = np.asarray(costs, dtype=float), np.asarray(accs, dtype=float)
    ok = np.flatnonzero(np.isfinite(c) & np.isfinite(a))
    front = []
    for i in ok:
        dominated = np.any((c[ok] <= c[i]) & (a[ok] >= a[i]) & ((c[ok] < c[i]) | (a[ok] > a[i])))
        if not dominated:
            front.append(int(i))
    return sorted(front, key=lambda i: (c[i], -a[i]))


# --- paired tests ---------------------------------------------------------------------------------------------
WILCOXON_MIN = 6  # below six pairs the exact signed-rank test cannot reach p < 0.05 (two-sided): not reported
ALPHA, POWER = 0.05, 0.80
MAX_SEEDS = 10 ** 7  # beyond this many seeds the difference is called undetectable (inf)


@dataclass(frozen=True)
class Paired:
    """Labels a and b on the seeds both finished: n pairs, differences a - b [n] summarised, and the tests."""

    a: str
    b: str
    n: int
    diff: Summary  # mean difference with its Student-t 95% CI
    p_t: float  # two-sided paired t-test
    p_wilcoxon: float  # two-sided Wilcoxon signed-rank; NaN below WILCOXON_MIN pairs
    p_holm: float = math.nan  # p_t, Holm-adjusted over the pairs tested together
    seeds_needed: float = math.nan  # for 80% power at the observed effect; NaN when the pair is significant


def paired_by_seed(a: dict[int, float], b: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """The values of the seeds present in both (seed -> value): two aligned [n] arrays, in seed order."""
    seeds = sorted(set(a) & set(b))
    return np.array([a[s] for s in seeds], dtype=float), np.array([b[s] for s in seeds], dtype=float)


def paired_test(a: str, b: str, x: np.ndarray, y: np.ndarray) -> Paired:
    """Tests on aligned seeds x, y ([n], n >= 2). Constant differences have no noise: p = 1 if they are all zero,
    else 0 (scipy returns NaN there)."""
    d = x - y
    if d.std() == 0:
        p_t = 1.0 if d[0] == 0 else 0.0
    else:
        p_t = float(sps.ttest_rel(x, y).pvalue)
    p_w = math.nan
    if d.size >= WILCOXON_MIN:
        p_w = 1.0 if not np.any(d) else float(sps.wilcoxon(x, y).pvalue)
    return Paired(a, b, d.size, summarize(d), p_t, p_w)


def paired_tests(samples: dict[str, dict[int, float]]) -> tuple[list[Paired], list[tuple[str, str]]]:
    """Every pair of labels with >= 2 shared seeds, Holm-corrected together, with the seeds needed for the ones
    that stay non-significant; and the pairs left untested (fewer than two shared seeds)."""
    labels = list(samples)
    tests, untested = [], []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            x, y = paired_by_seed(samples[a], samples[b])
            if x.size >= 2:
                tests.append(paired_test(a, b, x, y))
            else:
                untested.append((a, b))
    adjusted = holm([t.p_t for t in tests])
    # Power at the Bonferroni level ALPHA / m: a pair whose raw p falls below it stays significant after Holm
    # whatever the other pairs give, so these are the seeds that detect the difference in this very table.
    alpha = ALPHA / max(len(tests), 1)
    out = []
    for t, p in zip(tests, adjusted):
        effect = abs(t.diff.mean) / t.diff.std if t.diff.std > 0 else math.inf
        needed = math.nan if p < ALPHA else (math.inf if t.diff.mean == 0 else seeds_for_power(effect, alpha=alpha))
        out.append(replace(t, p_holm=float(p), seeds_needed=needed))
    return out, untested


def paired_power(effect: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test with n pairs at standardised effect mean(d) / sd(d)."""
    crit = sps.t.ppf(1 - alpha / 2, n - 1)
    nc = effect * math.sqrt(n)
    return float(sps.nct.sf(crit, n - 1, nc) + sps.nct.cdf(-crit, n - 1, nc))


def seeds_for_power(effect: float, power: float = POWER, alpha: float = ALPHA) -> float:
    """The fewest pairs (>= 2) that give the paired t-test `power` at this effect; inf for no effect or past
    MAX_SEEDS. Power grows with n, so doubling then bisection finds it."""
    if not effect > 0:
        return math.inf
    if math.isinf(effect) or paired_power(effect, 2, alpha) >= power:
        return 2.0
    lo, hi = 2, 4  # invariant: power(lo) < target
    while paired_power(effect, hi, alpha) < power:
        if hi >= MAX_SEEDS:
            return math.inf
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if paired_power(effect, mid, alpha) >= power else (mid, hi)
    return float(hi)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values (NaNs pass through and do not count in m)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out
