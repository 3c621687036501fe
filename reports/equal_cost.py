"""Accuracy at equal cost: every algorithm's validation accuracy at a grid of cost levels (decades 10^k of nominal
FLOPs, training seconds and examples seen), read off the validation curves, so that methods whose runs differ in
length (an ES spends far more FLOPs than backprop in the same seconds) meet at the same cost.

Besides the decades, one more level: the largest cost every run of the group reached (the end of the shortest run,
marked "all"), where every algorithm still has a value. A trial's accuracy at level c is the value of its last
evaluation at a cost <= c: the model it had at that cost, never an interpolation between two models. A label's cell is the mean (and Student-t 95% CI) over its done seeds,
shown only when every done seed's run reached c (its last evaluation cost >= c); a level where no label has a value
is not a column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import stats
from .data import AXIS_TITLES, Curve, done
from .document import Block, Cell, Heading, Table, Text, mark_best, pct, si
from .groups import VAL, Group, Groups

AXES = ("flops", "seconds", "examples")  # table order: the device-independent currency first


@dataclass
class CostTable:
    """Per label, a Summary over seeds at each level (None: not every done seed reached it)."""

    axis: str
    levels: list[float]  # [L] cost levels, increasing
    cells: dict[str, list[stats.Summary | None]]  # label -> [L]


def decade_levels(curves: list[Curve], axis: str) -> list[float]:
    """10^k from the decade of the earliest evaluation past cost 0, rounded up (a lower level would show only
    untrained models), to the largest cost any run reached, rounded down."""
    firsts = [float(c.x(axis)[c.x(axis) > 0][0]) for c in curves if np.any(c.x(axis) > 0)]
    if not firsts:
        return []
    lo = math.ceil(math.log10(min(firsts)) - 1e-9)  # tolerance: 1e12 read back as 1.0000000000000002e12
    hi = math.floor(math.log10(max(float(c.x(axis)[-1]) for c in curves)) + 1e-9)
    return [10.0 ** k for k in range(lo, hi + 1)]


def value_at(curve: Curve, axis: str, level: float) -> float:
    """The value of the last evaluation at cost <= level; NaN when even the first cost more."""
    at = np.flatnonzero(curve.x(axis) <= level * (1 + 1e-12))
    return float(curve.value[at[-1]]) if at.size else math.nan


def level_summary(curves: list[Curve | None], axis: str, level: float) -> stats.Summary | None:
    """Mean and CI over seeds ([S] curves, None for a seed without one) at a level every seed reached, else None."""
    if not curves or any(c is None or not c.value.size or c.x(axis)[-1] < level * (1 - 1e-12) for c in curves):
        return None
    values = [value_at(c, axis, level) for c in curves]
    return None if any(math.isnan(v) for v in values) else stats.summarize(values)


def common_level(curves: list[Curve], axis: str) -> float | None:
    """The largest cost every run reached (the shortest run's last evaluation); None when some run never passed 0."""
    ends = [float(c.x(axis)[-1]) for c in curves]
    return min(ends) if ends and min(ends) > 0 else None


def cost_table(labels: Groups, axis: str, metric: str = VAL) -> CostTable:
    """The accuracy-at-cost table of one group along one cost axis: the decades and the level every run reached,
    columns no label reached dropped."""
    curves = {k: [t.curves.get(metric) for t in done(g)] for k, g in labels.items()}
    runs = [c for cs in curves.values() for c in cs if c is not None and c.value.size]
    levels = decade_levels(runs, axis)
    common = common_level(runs, axis)
    if common is not None and not any(math.isclose(common, level, rel_tol=1e-9) for level in levels):
        levels = sorted([*levels, common])
    cells = {k: [level_summary(cs, axis, level) for level in levels] for k, cs in curves.items()}
    keep = [i for i in range(len(levels)) if any(v[i] is not None for v in cells.values())]
    return CostTable(axis, [levels[i] for i in keep], {k: [v[i] for i in keep] for k, v in cells.items()})


def level_text(axis: str, level: float) -> str:
    """Column titles: `1e12` FLOPs, `100 s`, `10k` examples; a level off the decades (the common one) in full."""
    exponent = math.log10(level)
    if axis == "flops":
        whole = math.isclose(exponent, round(exponent), abs_tol=1e-9)
        return f"1e{round(exponent)}" if whole else f"{level:.3g}".replace("e+", "e")
    return f"{level:.3g} s" if axis == "seconds" else si(level)


def _cell(s: stats.Summary | None, compact: bool) -> str:
    if s is None:
        return "–"
    half = s.hi - s.mean
    return pct(s.mean) + ("" if compact or not math.isfinite(half) else f" ± {100 * half:.2f}")


def as_table(table: CostTable, ranked: list[str], caption: str = "", compact: bool = False) -> Table:
    """Rows = labels, columns = levels; bold: the best mean per column among ranked labels."""
    rows: list[list[Cell]] = [[k, *(_cell(s, compact) for s in cells)] for k, cells in table.cells.items()]
    eligible = [k in ranked for k in table.cells]
    for i in range(len(table.levels)):
        means = [s.mean if s is not None else math.nan for s in (cells[i] for cells in table.cells.values())]
        mark_best(rows, i + 1, means, higher=True, eligible=eligible)
    return Table(["algorithm", *(level_text(table.axis, c) for c in table.levels)], rows, caption=caption)


def caption(axis: str, metric: str = VAL) -> str:
    what = "validation" if metric == VAL else "test"
    return (f"{what.capitalize()} accuracy (%) at equal {AXIS_TITLES[axis]} (decades 10^k): for each seed, the "
            f"{metric} of its last evaluation at a cost ≤ the column's level (the model it had at that cost, no "
            "interpolation); mean ± Student-t 95% half-width over done seeds, shown only when every done seed's "
            "run reached the level ('–' otherwise); levels no algorithm reached are not shown. The one column off "
            "the decades is the largest cost every run reached (the end of the shortest run), where all "
            "algorithms meet. Bold: best per column among ranked algorithms.")


def equal_cost_section(group: Group) -> list[Block]:
    head: list[Block] = [Heading(3, "Accuracy at equal cost")]
    tables = [cost_table(group.labels, axis) for axis in AXES]
    blocks: list[Block] = [as_table(t, group.ranked, caption(t.axis)) for t in tables if t.levels]
    if not blocks:
        return head + [Text("No validation-accuracy curve reaches a cost level: no table.", note=True)]
    return head + blocks
