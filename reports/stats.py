"""The statistics behind the report: seed summaries, curve bands, time-to-target, performance profiles, Pareto
fronts and pairwise tests. Pure functions over numpy arrays; no plotting, no I/O.

Confidence intervals are Student-t intervals over seeds, mean +- t_{0.975, n-1} * s / sqrt(n) with the sample
standard deviation s (ddof=1): with the 3-10 seeds a benchmark affords, a percentile bootstrap is too narrow.
Time-to-target follows AlgoPerf (Dolan & More 2002 profiles; Dahl et al. 2023, "Benchmarking Neural Network
Training Algorithms"): the first evaluation at which the metric reaches the target, read off the learning curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as sps

from .data import Curve

CONFIDENCE = 0.95
TARGETS = (0.90, 0.95, 0.97, 0.98)
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
    """costs: label -> [P] cost per problem (inf = not solved). Ratio to the best label on each problem: [P];
    a problem nobody solved is dropped (it says nothing about relative speed)."""
    labels = list(costs)
    mat = np.stack([np.asarray(costs[k], dtype=float) for k in labels])  # [L, P]
    best = mat.min(axis=0)
    keep = np.isfinite(best)
    ratios = mat[:, keep] / best[keep]
    return {k: ratios[i] for i, k in enumerate(labels)}


def profile(ratios: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """rho(tau) = fraction of problems solved within a factor tau of the best: [T]."""
    if ratios.size == 0:
        return np.zeros_like(taus)
    return (ratios[None, :] <= taus[:, None]).mean(axis=1)


def tau_grid(ratios: dict[str, np.ndarray], points: int = 200) -> np.ndarray:
    finite = np.concatenate([r[np.isfinite(r)] for r in ratios.values()] + [np.ones(1)])
    top = max(2.0, float(finite.max()) * 1.1)
    return np.geomspace(1.0, top, points)


# --- Pareto front and pairwise tests --------------------------------------------------------------------------
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


def welch(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Welch t-test p-value; NaN when it is undefined (fewer than 2 seeds or both groups constant)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 2 or b.size < 2:
        return math.nan
    if a.var(ddof=1) == 0 and b.var(ddof=1) == 0:
        return 1.0 if a.mean() == b.mean() else 0.0  # no noise at all: identical or certainly different
    return float(sps.ttest_ind(a, b, equal_var=False).pvalue)


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


def pairwise(samples: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Welch tests between every pair of labels, Holm-corrected over the pairs: labels, raw [L, L], adjusted
    [L, L] (symmetric, NaN on the diagonal)."""
    labels = list(samples)
    pairs = [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels))]
    raw = [welch(samples[labels[i]], samples[labels[j]]) for i, j in pairs]
    adj = holm(raw)
    raw_m = np.full((len(labels), len(labels)), np.nan)
    adj_m = raw_m.copy()
    for (i, j), r, a in zip(pairs, raw, adj):
        raw_m[i, j] = raw_m[j, i] = r
        adj_m[i, j] = adj_m[j, i] = a
    return labels, raw_m, adj_m
