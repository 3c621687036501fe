"""The core report sections for one (dataset, model): final accuracy, learning curves, time-to-target, cost vs
accuracy, pairwise significance; and the cross-problem performance profiles. Each returns a list of blocks.

Statistics use the `done` trials of each label; failed, diverged and unfinished trials are counted in the tables
and listed with their errors, never dropped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import stats
from .data import (ACCURACY, AXES, AXIS_TITLES, COST_METRICS, ReportData, done, first_line, metric_values, slug,
                   status_text, unsuccessful)
from .document import Block, Cell, Figure, Heading, Items, Strong, Table, Text, ci, mark_best, pct, pval, secs, si
from .figures import FORMAT, Cloud, Line, Panel, lines_figure, pareto_figure

Groups = dict[str, list[dict[str, Any]]]  # label -> trials of one (dataset, model), seed order


@dataclass
class Context:
    data: ReportData
    colours: dict[str, tuple]
    fig_dir: Path
    targets: tuple[float, ...] = stats.TARGETS
    figures: list[Path] = field(default_factory=list)

    def figure_path(self, *parts: str) -> Path:
        """figures/<slug>.svg, suffixed -2, -3... if two problems' names slug alike ('a/b' and 'a_b')."""
        path, n = self.fig_dir / f"{slug(*parts)}.{FORMAT}", 1
        while path in self.figures:
            n += 1
            path = self.fig_dir / f"{slug(*parts)}-{n}.{FORMAT}"
        return path


def accuracy_section(groups: Groups) -> list[Block]:
    headers = ["algorithm", "mean (%)", "std", "95% CI", "n", "trials", "seconds", "FLOPs", "examples"]
    rows: list[list[Cell]] = []
    means, costs = [], {a: [] for a in AXES}
    for label, group in groups.items():
        s = stats.summarize(metric_values(group, ACCURACY))
        cost = {a: _mean(metric_values(group, COST_METRICS[a])) for a in AXES}
        rows.append([label, pct(s.mean), pct(s.std), ci(s.lo, s.hi), str(s.n), status_text(group),
                     secs(cost["seconds"]), si(cost["flops"]), si(cost["examples"])])
        means.append(s.mean)
        for a in AXES:
            costs[a].append(cost[a])
    mark_best(rows, 1, means, higher=True)
    for col, axis in ((6, "seconds"), (7, "flops"), (8, "examples")):
        mark_best(rows, col, costs[axis], higher=False)
    out: list[Block] = [Heading(3, "Final test accuracy"), Table(headers, rows, text_columns=(5,), caption=(
        "Test accuracy of the final model over seeds (done trials): mean, sample standard deviation (ddof=1) and "
        "Student-t 95% confidence interval, all in percent; n = seeds in the statistics. Costs are means over the "
        "same trials (training seconds, FLOPs, examples seen). Bold: best in its column."))]
    bad = unsuccessful([t for g in groups.values() for t in g])
    if bad:
        out += [Heading(4, "Failed, diverged and unfinished trials"),
                Items([f"{t['label']} seed {t['seed']} ({t['status']}, trial {t['id'][:12]}): "
                       f"{first_line(t.get('error'))}" for t in bad], code=True)]
    return out


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def curve_lines(groups: Groups, metric: str, axis: str, scale: float = 1.0,
                clip: tuple[float, float] | None = None) -> tuple[list[Line], bool]:
    """Per label: the mean curve with its CI band on a common grid, or each seed raw when seeds do not overlap;
    and whether the panel wants a log x axis (the labels' x values together span more than two decades)."""
    per_label = {label: [t["curves"][metric] for t in done(group) if metric in t.get("curves", {})]
                 for label, group in groups.items()}
    logx = stats.wide_range([c for cs in per_label.values() for c in cs], axis)
    lines = []
    for label, curves in per_label.items():
        if not curves:
            continue
        grid = stats.common_grid(curves, axis, logx)
        if grid is None:
            lines += [Line(label, c.x(axis), scale * c.value, thin=True) for c in curves]
            continue
        mean, lo, hi = stats.band(curves, axis, grid)
        if clip is not None:  # a t band can overshoot a bounded metric (accuracy) where seeds disagree
            lo, hi = np.clip(lo, *clip), np.clip(hi, *clip)
        band = (scale * lo, scale * hi) if len(curves) > 1 else (None, None)
        lines.append(Line(label, grid, scale * mean, *band))
    return lines, logx


def curves_section(ctx: Context, problem: tuple[str, str], groups: Groups) -> list[Block]:
    panels = []
    for axis in AXES:
        lines, logx = curve_lines(groups, ACCURACY, axis, scale=100, clip=(0.0, 1.0))
        if lines:
            panels.append(Panel(f"vs {AXIS_TITLES[axis]}", AXIS_TITLES[axis], "test accuracy (%)", lines, logx))
    if not panels:
        return [Heading(3, "Learning curves"), Text("No test-accuracy curves were recorded.", note=True)]
    path = lines_figure(panels, ctx.colours, ctx.figure_path(*problem, "curves"))
    ctx.figures.append(path)
    return [Heading(3, "Learning curves"), Figure(path, (
        "Test accuracy against training seconds, examples seen and FLOPs: mean over seeds with a shaded Student-t "
        "95% band (clipped to 0-100%). Seeds evaluate at different x values, so each curve is linearly "
        "interpolated onto a common grid over the range every seed covers (log-spaced on log axes, used when costs "
        "span more than two decades)."),
        alt=f"learning curves, {problem[0]} {problem[1]}")]


def target_reaches(groups: Groups, target: float) -> dict[str, stats.Reach]:
    """Per label: time-to-target over all its trials (a trial without a curve has not reached it)."""
    return {label: stats.time_to_target([t.get("curves", {}).get(ACCURACY) for t in group], target)
            for label, group in groups.items()}


def time_to_target_section(ctx: Context, groups: Groups) -> list[Block]:
    """Per target some seed reached, the algorithms that reached it (the rest are named in one row)."""
    headers = ["target", "algorithm", "reached", "seconds", "examples", "FLOPs"]
    rows: list[list[Cell]] = []
    for target in ctx.targets:
        reaches = {k: r for k, r in target_reaches(groups, target).items() if r.reached}
        if not reaches:
            continue
        block: list[list[Cell]] = [["", label, f"{r.reached}/{r.n}", secs(r.seconds), si(r.examples), si(r.flops)]
                                   for label, r in reaches.items()]
        for col, axis in ((3, "seconds"), (4, "examples"), (5, "flops")):
            mark_best(block, col, [getattr(r, axis) for r in reaches.values()], higher=False)
        missed = [k for k in groups if k not in reaches]
        if missed:
            block.append(["", "not reached: " + ", ".join(missed), "0", "–", "–", "–"])
        block[0][0] = f"≥ {100 * target:g}%"
        rows += block
    head: list[Block] = [Heading(3, "Time to target")]
    if not rows:
        low = min(ctx.targets)
        return head + [Text(f"No algorithm reached {100 * low:g}% test accuracy on any seed.", note=True)]
    return head + [Table(headers, rows, align_left=2, caption=(
        "Cost at the first evaluation whose test accuracy reaches the target (AlgoPerf style): median over the "
        "seeds that reached it; 'reached' counts them among all the algorithm's trials. Targets no algorithm "
        "reached are omitted. Bold: cheapest per target."))]


def pareto_section(ctx: Context, problem: tuple[str, str], groups: Groups) -> list[Block]:
    axes = {"flops": "FLOPs", "seconds": "training seconds"}
    clouds = []
    for label, group in groups.items():
        trials = [t for t in done(group) if t["metrics"].get(ACCURACY) is not None
                  and all(t["metrics"].get(COST_METRICS[a]) is not None for a in axes)]
        if trials:
            costs = {a: np.array([t["metrics"][COST_METRICS[a]] for t in trials], float) for a in axes}
            clouds.append(Cloud(label, costs, np.array([t["metrics"][ACCURACY] for t in trials], float)))
    if not clouds:
        return []
    path = pareto_figure(clouds, axes, ctx.colours, ctx.figure_path(*problem, "pareto"))
    ctx.figures.append(path)
    fronts = []
    for axis, title in axes.items():
        mc = [float(c.costs[axis].mean()) for c in clouds]
        ma = [float(c.acc.mean()) for c in clouds]
        fronts.append(f"{title}: " + ", ".join(clouds[i].label for i in stats.pareto_front(mc, ma)))
    return [Heading(3, "Cost versus accuracy"), Figure(path, (
        "Final test accuracy against training FLOPs and seconds: small dots are seeds, large dots the mean with "
        "its 95% CI; the dashed line joins the Pareto-optimal means (no other algorithm is both cheaper and more "
        "accurate)."), alt=f"cost versus accuracy, {problem[0]} {problem[1]}"),
        Text("Pareto-optimal, cheapest first: " + "; ".join(fronts) + ".")]


def significance_section(groups: Groups) -> list[Block]:
    samples = {label: metric_values(g, ACCURACY) for label, g in groups.items()}
    samples = {k: v for k, v in samples.items() if v.size >= 2}
    head: list[Block] = [Heading(3, "Pairwise significance")]
    if len(samples) < 2:
        return head + [Text("Fewer than two algorithms have two or more finished seeds: no test.", note=True)]
    labels, _, adj = stats.pairwise(samples)
    means = [float(samples[k].mean()) for k in labels]
    rows: list[list[Cell]] = []
    for i, row_label in enumerate(labels):
        row: list[Cell] = [row_label]
        for j in range(len(labels)):
            row.append("—" if i == j else _p_cell(adj[i, j], means[i] - means[j]))
        rows.append(row)
    m = len(labels) * (len(labels) - 1) // 2
    return head + [Table(["row vs column", *labels], rows, caption=(
        f"Holm-adjusted p-values of two-sided Welch t-tests on final test accuracy over seeds ({m} pairs). "
        "▲: the row's mean is higher, ▼: lower; * marks p < 0.05 after correction."))]


def _p_cell(p: float, diff: float) -> Cell:
    if not math.isfinite(p):
        return "n/a"
    arrow = "▲" if diff > 0 else "▼" if diff < 0 else "="
    text = f"{arrow} {pval(p)}{'*' if p < 0.05 else ''}"
    return Strong(text) if p < 0.05 else text


def profiles_section(ctx: Context) -> list[Block]:
    """Dolan-More performance profiles over every (dataset, model, target) that some algorithm reached."""
    from .data import by_problem

    problems = by_problem(ctx.data.trials)
    labels = ctx.data.labels()
    costs = {a: {k: [] for k in labels} for a in AXES}
    names = []
    for problem, groups in problems.items():
        for target in ctx.targets:
            reaches = target_reaches(groups, target)
            if not any(math.isfinite(r.profile_costs["seconds"]) for r in reaches.values()):
                continue
            names.append(f"{problem[0]}/{problem[1]}@{100 * target:g}%")
            for a in AXES:
                for k in labels:
                    costs[a][k].append(reaches[k].profile_costs[a] if k in reaches else math.inf)
    head: list[Block] = [Heading(2, "Performance profiles")]
    if len(labels) < 2:
        return head + [Text("Performance profiles compare algorithms: this run has only one.", note=True)]
    if not names:
        return head + [Text("No algorithm reached any accuracy target on a majority of its seeds.", note=True)]
    panels = []
    for a in AXES:
        ratios = stats.performance_ratios({k: np.array(v) for k, v in costs[a].items()})
        taus = stats.tau_grid(ratios)
        lines = [Line(k, taus, stats.profile(r, taus), step=True) for k, r in ratios.items()]
        panels.append(Panel(f"time-to-target in {AXIS_TITLES[a]}", f"ratio τ to the best ({AXIS_TITLES[a]})",
                            "fraction of problems ρ(τ)", lines, logx=True, ylim=(-0.02, 1.02)))
    path = lines_figure(panels, ctx.colours, ctx.figure_path("performance-profiles"))
    ctx.figures.append(path)
    return head + [Figure(path, (
        "Dolan & Moré performance profiles as in AlgoPerf: for each problem (dataset, model, accuracy target) an "
        "algorithm's cost is its median time-to-target over seeds, counting seeds that missed the target as "
        "infinite (so it is finite only when a majority reached it); ρ(τ) is the fraction of problems it solves "
        f"within τ times the best algorithm's cost. Problems ({len(names)}): " + ", ".join(names) + "."),
        alt="performance profiles")]
