"""The core report sections for one group (one problem, dataset x model, under one budget): final accuracy,
learning curves, time-to-target and cost vs accuracy. Each returns a list of blocks.

Validation drives every choice: best marks, targets and the Pareto front read the validation accuracy; the test set
gives only final numbers. Only a group's ranked labels are marked or compared (see groups.py); unranked ones are
shown. Statistics use the `done` trials of each label; failed, diverged and unfinished trials are counted in the
tables and listed with their errors, never dropped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import stats
from .data import (AXES, AXIS_TITLES, COST_METRICS, ReportData, done, metric_values, slug, status_text, trouble,
                   unsuccessful)
from .document import Block, Cell, Figure, Heading, Items, Table, Text, ci, mark_best, pct, secs, si
from .figures import FORMAT, Cloud, Line, Panel, lines_figure, pareto_figure
from .groups import TEST, VAL, Group, Groups, Targets, mean_final, targets
from .interactive import LinesPlot, ParetoPlot, hover_info

__all__ = ["Context", "Groups", "accuracy_section", "curve_lines", "curves_section", "pareto_section",
           "target_reaches", "time_to_target_section"]


@dataclass
class Context:
    data: ReportData
    colours: dict[str, tuple]
    fig_dir: Path
    figures: list[Path] = field(default_factory=list)

    def figure_path(self, *parts: str) -> Path:
        """figures/<slug>.svg, suffixed -2, -3... if two problems' names slug alike ('a/b' and 'a_b')."""
        path, n = self.fig_dir / f"{slug(*parts)}.{FORMAT}", 1
        while path in self.figures:
            n += 1
            path = self.fig_dir / f"{slug(*parts)}-{n}.{FORMAT}"
        return path


def accuracy_section(group: Group) -> list[Block]:
    headers = ["algorithm", "validation (%)", "test (%)", "test std", "test 95% CI", "n", "trials", "seconds",
               "FLOPs", "examples"]
    rows: list[list[Cell]] = []
    vals, costs = [], {a: [] for a in AXES}
    for label, trials in group.labels.items():
        s = stats.summarize(metric_values(trials, TEST))
        cost = {a: _mean(metric_values(trials, COST_METRICS[a])) for a in AXES}
        vals.append(mean_final(trials, VAL))
        rows.append([label, pct(vals[-1]), pct(s.mean), pct(s.std), ci(s.lo, s.hi), str(s.n), status_text(trials),
                     secs(cost["seconds"]), si(cost["flops"]), si(cost["examples"])])
        for a in AXES:
            costs[a].append(cost[a])
    eligible = [k in group.ranked for k in group.labels]
    mark_best(rows, 1, vals, higher=True, eligible=eligible)
    for col, axis in ((7, "seconds"), (8, "flops"), (9, "examples")):
        mark_best(rows, col, costs[axis], higher=False, eligible=eligible)
    out: list[Block] = [Heading(3, "Final accuracy"), Table(headers, rows, text_columns=(6,), caption=(
        "The final model of each seed (done trials). Validation: mean accuracy over seeds, the number that ranks. "
        "Test: mean, sample standard deviation (ddof=1) and Student-t 95% confidence interval, never marked (the "
        "test set makes no choice); n = seeds in the statistics. All accuracies in percent. Costs are means over "
        "the same trials (training seconds, nominal FLOPs, examples seen). Bold: best in its column among ranked "
        "algorithms."))]
    bad = unsuccessful([t for g in group.labels.values() for t in g])
    if bad:
        out += [Heading(4, "Failed, diverged and unfinished trials"),
                Items([f"{t.label} seed {t.seed} ({t.status}, trial {t.id[:12]}): {trouble(t)}"
                       for t in bad], code=True)]
    return out


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def curve_lines(groups: Groups, metric: str, axis: str, scale: float = 1.0,
                clip: tuple[float, float] | None = None) -> tuple[list[Line], bool]:
    """Per label: the mean curve with its CI band on a common grid, or each seed raw when seeds do not overlap;
    and whether the panel wants a log x axis (the labels' x values together span more than two decades)."""
    per_trial = {label: [t for t in done(group) if metric in t.curves] for label, group in groups.items()}
    per_label = {label: [t.curves[metric] for t in trials] for label, trials in per_trial.items()}
    logx = stats.wide_range([c for cs in per_label.values() for c in cs], axis)
    lines = []
    for label, curves in per_label.items():
        if not curves:
            continue
        grid = stats.common_grid(curves, axis, logx)
        if grid is None:
            lines += [Line(label, t.curves[metric].x(axis), scale * t.curves[metric].value, thin=True,
                           hover=f"seed {t.seed}") for t in per_trial[label]]
            continue
        mean, lo, hi = stats.band(curves, axis, grid)
        if clip is not None:  # a t band can overshoot a bounded metric (accuracy) where seeds disagree
            lo, hi = np.clip(lo, *clip), np.clip(hi, *clip)
        band = (scale * lo, scale * hi) if len(curves) > 1 else (None, None)
        lines.append(Line(label, grid, scale * mean, *band))
    return lines, logx


def curves_section(ctx: Context, parts: tuple[str, ...], group: Group) -> list[Block]:
    """Validation-accuracy curves (test-accuracy ones only for a store that recorded no validation curve)."""
    trials = [t for g in group.labels.values() for t in g]
    metric = VAL if any(VAL in t.curves for t in trials) else TEST
    what = "validation" if metric == VAL else "test"
    panels = []
    for axis in AXES:
        lines, logx = curve_lines(group.labels, metric, axis, scale=100, clip=(0.0, 1.0))
        if lines:
            panels.append(Panel(f"vs {AXIS_TITLES[axis]}", AXIS_TITLES[axis], f"{what} accuracy (%)", lines, logx))
    if not panels:
        return [Heading(3, "Learning curves"), Text("No accuracy curves were recorded.", note=True)]
    path = lines_figure(panels, ctx.colours, ctx.figure_path(*parts, "curves"))
    plot = LinesPlot(panels, ctx.colours, hover_info(group.labels))
    ctx.figures.append(path)
    fallback = "" if metric == VAL else " These trials recorded no validation curve, so the test curve is drawn."
    return [Heading(3, "Learning curves"), Figure(path, (
        f"{what.capitalize()} accuracy ({metric}) against training seconds, examples seen and nominal FLOPs: mean "
        "over seeds with a shaded Student-t 95% band (clipped to 0-100%). Seeds evaluate at different x values, so "
        "each curve is linearly interpolated onto a common grid over the range every seed covers (log-spaced on "
        "log axes, used when costs span more than two decades)." + fallback),
        alt=f"learning curves, {' '.join(parts)}", interactive=plot)]


def target_reaches(labels: Groups, target: float) -> dict[str, stats.Reach]:
    """Per label: time-to-target on the validation curve over all its trials (no curve: not reached)."""
    return {label: stats.time_to_target([t.curves.get(VAL) for t in trials], target)
            for label, trials in labels.items()}


def target_text(fraction: float, value: float) -> str:
    """`90% (87.75)`: the fraction of the reference and the validation accuracy (%) it means."""
    return f"{100 * fraction:g}% ({pct(value)})"


def time_to_target_section(group: Group) -> list[Block]:
    """Per target, the ranked algorithms that reached it (the rest are named in one row)."""
    head: list[Block] = [Heading(3, "Time to target")]
    goal = targets(group)
    if not goal.levels:
        return head + [Text(f"No targets: {goal.source}.", note=True)]
    rows: list[list[Cell]] = []
    for fraction, target in goal.levels:
        rows += _target_rows(group.ranked_labels(), fraction, target)
    return head + [Table(["target", "algorithm", "reached", "seconds", "examples", "FLOPs"], rows, align_left=2,
                         caption=_ttt_caption(goal))]


def _target_rows(labels: Groups, fraction: float, target: float) -> list[list[Cell]]:
    reaches = {k: r for k, r in target_reaches(labels, target).items() if r.reached}
    block: list[list[Cell]] = [["", label, f"{r.reached}/{r.n}", secs(r.seconds), si(r.examples), si(r.flops)]
                               for label, r in reaches.items()]
    for col, axis in ((3, "seconds"), (4, "examples"), (5, "flops")):
        mark_best(block, col, [getattr(r, axis) for r in reaches.values()], higher=False)
    missed = [k for k in labels if k not in reaches]
    if missed:
        block.append(["", "not reached: " + ", ".join(missed), "0", "–", "–", "–"])
    block[0][0] = target_text(fraction, target)
    return block


def _ttt_caption(goal: Targets) -> str:
    fractions = ", ".join(f"{100 * f:g}%" for f, _ in goal.levels)
    return (f"Targets are {fractions} of {goal.source}; the bracket gives the validation accuracy (%) each means. "
            "Cost (training seconds, examples seen, nominal FLOPs) at the first evaluation whose validation "
            "accuracy reaches the target (AlgoPerf style): median over the seeds that reached it; 'reached' counts "
            "them among all the algorithm's trials. Ranked algorithms only. Bold: cheapest per target.")


def pareto_section(ctx: Context, parts: tuple[str, ...], group: Group) -> list[Block]:
    """Final validation accuracy against cost, ranked labels only."""
    axes = {"flops": "nominal FLOPs", "seconds": "training seconds"}
    clouds = []
    for label, trials in group.ranked_labels().items():
        trials = [t for t in done(trials) if t.metrics.get(VAL) is not None
                  and all(t.metrics.get(COST_METRICS[a]) is not None for a in axes)]
        if trials:
            costs = {a: np.array([t.metrics[COST_METRICS[a]] for t in trials], float) for a in axes}
            clouds.append(Cloud(label, costs, np.array([t.metrics[VAL] for t in trials], float),
                                [t.seed for t in trials]))
    if not clouds:
        return []
    path = pareto_figure(clouds, axes, ctx.colours, ctx.figure_path(*parts, "pareto"), "validation accuracy (%)")
    ctx.figures.append(path)
    plot = ParetoPlot(clouds, axes, ctx.colours, "validation accuracy (%)", hover_info(group.ranked_labels()))
    fronts = []
    for axis, title in axes.items():
        mc = [float(c.costs[axis].mean()) for c in clouds]
        ma = [float(c.acc.mean()) for c in clouds]
        fronts.append(f"{title}: " + ", ".join(clouds[i].label for i in stats.pareto_front(mc, ma)))
    return [Heading(3, "Cost versus accuracy"), Figure(path, (
        "Final validation accuracy against nominal FLOPs and training seconds, ranked algorithms: small dots are "
        "seeds, large dots the mean with its 95% CI; the dashed line joins the Pareto-optimal means (no other "
        "algorithm is both cheaper and more accurate)."), alt=f"cost versus accuracy, {' '.join(parts)}",
        interactive=plot),
        Text("Pareto-optimal, cheapest first: " + "; ".join(fronts) + ".")]
