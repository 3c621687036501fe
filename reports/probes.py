"""Sections for the probes' data, drawn only when a run recorded it: alignment angles (`align/*`, the
feedback-alignment family) and the training diagnostics (`grad/`, `update/`, `cos/` from the gradient-flow and
update-grad probes, `influence/` from `learnbench diagnose`, and the `flag/vanishing`, `flag/exploding` flags).

Probe curves are plotted against examples seen (one panel per metric, so per layer; a deep model's layers are
sampled evenly, first and last included), mean over seeds with a 95% band; their last values (the final metrics)
are tabulated with one row per metric and one column per algorithm. Gradient and update norms also get a depth
profile (norm against layer, log scale) and influence distances a histogram per layer.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Sequence

import numpy as np

from learnbench.trial import StoredTrial

from . import stats
from .data import Curve, curve_names, done, metric_names, metric_values
from .document import Block, Cell, Figure, Heading, Table, Text
from .figures import BarPanel, Bars, Line, Panel, bars_figure, lines_figure
from .sections import Context, Groups, curve_lines

MAX_PANELS = 12  # per figure; a model with more layers shows an even sample of them (the table lists all)
INFLUENCE_KINDS = ("mlp", "resmlp")

ALIGNMENT = ("align/", "Alignment angles", "angle (degrees)", (
    "Angles between what the algorithm applies and what backprop would (update-grad: the weight update against "
    "the true gradient; B-W: feedback weights against the forward weights' transpose), per layer, against "
    "examples seen. 90° means no alignment; feedback alignment works when the angle falls well below it."))
DIAGNOSTICS = (  # prefix, title, y label, caption, log y
    ("grad/", "Gradient flow", "norm", (
        "Norm of the true loss gradient per layer (weight and bias, on the probed step's batch, at the parameters "
        "before the step), and the first-over-last-layer ratio, against examples seen; log scale. A first layer "
        "1000 times weaker than the last raises the vanishing flag."), True),
    ("update/", "Updates", "norm", (
        "Norm of the parameter change each probed step (ES, GA: generation) applied per layer, against examples "
        "seen; log scale."), True),
    ("cos/", "Update-gradient alignment", "cosine", (
        "Cosine between the parameter change of a step and the negative true gradient on the same batch, for the "
        "whole model (update-grad) and per layer. 1: steepest descent (backprop with plain SGD); Adam's per-"
        "coordinate scaling lowers it; 0: no better than a random direction."), False),
)
FLAGS = ("flag/vanishing", "flag/exploding")
UPDATE, PARTS = "cos/update-grad", "cos/part-grad/"
PART_STYLES = ("--", "-.", ":")  # the parts of one algorithm's update; its update itself is drawn solid


def family_blocks(ctx: Context, problem: tuple[str, ...], groups: Groups, prefix: str, ylabel: str,
                  caption: str, logy: bool = False, clip: tuple[float, float] | None = None) -> list[Block]:
    """A figure of a metric family's curves and a table of its final values; [] when the run has neither.
    `logy`: log axis, geometric mean and band; `clip`: the range a t band is clipped to (cosines: -1..1)."""
    trials = [t for g in groups.values() for t in g]
    out: list[Block] = []
    names = sorted(curve_names(trials, prefix), key=_natural)
    panels = []
    for name in _sample(names, MAX_PANELS):
        lines, logx = _log_curve_lines(groups, name) if logy else curve_lines(groups, name, "examples", clip=clip)
        if lines:
            panels.append(Panel(name.removeprefix(prefix), "examples seen", ylabel, lines, logx, logy=logy))
    if panels:
        path = lines_figure(panels, ctx.colours, ctx.figure_path(*problem, prefix.strip("/")))
        ctx.figures.append(path)
        extra = len(names) - len(panels)
        more = f" {extra} more curves (layers between those drawn) are in the table and the store." if extra > 0 \
            else ""
        summary = " Geometric mean over seeds, shaded 95% band (a t interval on log values)." if logy \
            else " Mean over seeds, shaded 95% band."
        out.append(Figure(path, caption + summary + more,
                          alt=f"{prefix.strip('/')} curves, {' '.join(problem)}"))
    finals = sorted(metric_names(trials, prefix), key=_natural)
    if finals:
        out.append(_final_table(groups, finals, prefix))
    return out


def _log_curve_lines(groups: Groups, metric: str) -> tuple[list[Line], bool]:
    """`curve_lines` on log10 of the values (norms span decades): geometric mean over seeds and a band that stays
    positive on a log axis."""
    logged = {label: [replace(t, curves={metric: _log10(t.curves[metric])}) for t in group if metric in t.curves]
              for label, group in groups.items()}
    lines, logx = curve_lines(logged, metric, "examples")
    return [replace(line, y=10**line.y, lo=None if line.lo is None else 10**line.lo,
                    hi=None if line.hi is None else 10**line.hi) for line in lines], logx


def _log10(curve: Curve) -> Curve:
    return replace(curve, value=np.log10(np.clip(curve.value, 1e-300, None)))


def _natural(name: str) -> list:
    """Sort key that puts layer 10 after layer 9: 'align/B-W/10' -> ['align/b-w/', 10, '']."""
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def _sample(names: list[str], n: int) -> list[str]:
    """At most n of the names, evenly spaced, first and last included (the shallowest and deepest layers)."""
    if len(names) <= n:
        return names
    return [names[i] for i in sorted(set(np.linspace(0, len(names) - 1, n).round().astype(int)))]


def _final_table(groups: Groups, names: list[str], prefix: str, source: str = "last probe reading") -> Table:
    labels = [k for k, g in groups.items() if any(n in t.metrics for t in done(g) for n in names)]
    rows: list[list[Cell]] = []
    for name in names:
        row: list[Cell] = [name.removeprefix(prefix)]
        for label in labels:
            s = stats.summarize(metric_values(groups[label], name))
            row.append("–" if s.n == 0 else f"{s.mean:.3g}" + (f" ± {s.hi - s.mean:.2g}" if s.n > 1 else ""))
        rows.append(row)
    return Table(["metric", *labels], rows, caption=(
        f"Final values of {prefix}* ({source}): mean ± Student-t 95% half-width over done seeds."))


def alignment_section(ctx: Context, problem: tuple[str, ...], groups: Groups) -> list[Block]:
    prefix, title, ylabel, caption = ALIGNMENT
    blocks = family_blocks(ctx, problem, groups, prefix, ylabel, caption)
    return [Heading(3, title)] + blocks if blocks else []


def diagnostics_section(ctx: Context, problem: tuple[str, ...], groups: Groups) -> list[Block]:
    out: list[Block] = []
    for prefix, title, ylabel, caption, logy in DIAGNOSTICS:
        clip = (-1.0, 1.0) if prefix == "cos/" else None
        blocks = family_blocks(ctx, problem, groups, prefix, ylabel, caption, logy, clip)
        if prefix == "grad/":
            blocks = _profile_blocks(ctx, problem, groups) + blocks
        if prefix == "cos/":
            blocks += hybrid_alignment_blocks(ctx, problem, groups)
        if blocks:
            out += [Heading(4, title)] + blocks
    out += influence_blocks(ctx, problem, groups)
    flags = _flags_table(groups)
    if flags:
        out += [Heading(4, "Vanishing and exploding gradients"), flags]
    return [Heading(3, "Diagnostics")] + out if out else []


def hybrid_alignment_blocks(ctx: Context, problem: tuple[str, ...], groups: Groups) -> list[Block]:
    """One panel per algorithm whose update combines parts (`cos/part-grad/<part>`: guided-es's surrogate and ES
    estimate, openai-es's estimate before Adam): its parts and its update against the true gradient, beside every
    algorithm's update on the problem, so a reader sees whether the combination beats either part."""
    updates = curve_lines(groups, UPDATE, "examples", clip=(-1.0, 1.0))[0]  # every algorithm's, solid
    panels = []
    for label, group in groups.items():
        parts = sorted({name for t in done(group) for name in t.curves if name.startswith(PARTS)})
        if not parts:
            continue
        lines, logx = [], False
        for name, style in zip(parts, PART_STYLES):
            part_lines, logx = curve_lines({label: group}, name, "examples", clip=(-1.0, 1.0))
            lines += [replace(line, style=style, name=f"{label}: {name.removeprefix(PARTS)}") for line in part_lines]
        lines += [replace(line, name=f"{line.label}: update") for line in updates]
        panels.append(Panel(label, "examples seen", "cosine to -grad", lines, logx))
    return _figure_blocks(ctx, problem, "hybrid-alignment", panels, (
        "Hybrid alignment: per algorithm that builds its update from parts, the cosine of each part (dashed: the "
        "surrogate gradient or the ES estimate, as a descent direction) and of every algorithm's applied update "
        "(solid) to the negative true gradient on the probed step's batch, against examples seen. Mean over seeds."),
        "hybrid alignment curves")


def _figure_blocks(ctx: Context, problem: tuple[str, ...], name: str, panels: list[Panel], caption: str,
                   alt: str, ncols: int = 3) -> list[Block]:
    """The panels drawn as one figure of the problem named `name`, with its caption; [] without panels."""
    if not panels:
        return []
    path = lines_figure(panels, ctx.colours, ctx.figure_path(*problem, name), ncols=ncols)
    ctx.figures.append(path)
    return [Figure(path, caption, alt=f"{alt}, {' '.join(problem)}")]


# --- depth profiles ----------------------------------------------------------------------------------------------

def _layers(trials: Sequence[StoredTrial], prefix: str) -> list[str]:
    return sorted({n.removeprefix(prefix) for n in metric_names(trials, prefix)}, key=_natural)


def _short(layer: str) -> str:
    """'blocks.11.0' -> '11' (the built-in MLPs' block index); other names as they are."""
    match = re.fullmatch(r"blocks\.(\d+)\.\d+", layer)
    return match.group(1) if match else layer


def _log_band(values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Geometric mean over seeds and its 95% band (a t interval on log10), for positive values [S, K]."""
    logs = np.log10(np.clip(np.stack(values), 1e-300, None))
    mean, lo, hi = logs.mean(0), logs.mean(0), logs.mean(0)
    if len(values) > 1:
        half = stats.t_halfwidth(logs.std(0, ddof=1), len(values))
        lo, hi = mean - half, mean + half
    return 10**mean, 10**lo, 10**hi


def _profile_lines(groups: Groups, prefix: str, layers: list[str], first: bool) -> list[Line]:
    """Per label: the norm per layer at the first probe reading (from the curves) or the last (final metrics)."""
    lines = []
    for label, group in groups.items():
        rows = []
        for t in done(group):
            names = [prefix + layer for layer in layers]
            if first:
                if all(n in t.curves and t.curves[n].value.size for n in names):
                    rows.append(np.array([t.curves[n].value[0] for n in names]))
            elif all(t.metrics.get(n) is not None for n in names):
                rows.append(np.array([t.metrics[n] for n in names]))
        if rows:
            mean, lo, hi = _log_band(rows)
            x = np.arange(len(layers), dtype=float)
            lines.append(Line(label, x, mean, *((lo, hi) if len(rows) > 1 else (None, None)), marker="o"))
    return lines


def _profile_blocks(ctx: Context, problem: tuple[str, ...], groups: Groups) -> list[Block]:
    trials = [t for g in groups.values() for t in g]
    panels = []
    for prefix, what in (("grad/norm/", "true-gradient norm"), ("update/norm/", "update norm")):
        layers = _layers(trials, prefix)
        if not layers:
            continue
        ticks = [_short(layer) for layer in layers]
        for first, when in ((True, "first probe reading"), (False, "last probe reading")):
            lines = _profile_lines(groups, prefix, layers, first)
            if lines:
                panels.append(Panel(f"{what}, {when}", "layer (input side first)", "norm", lines,
                                    logy=True, xticks=ticks))
    return _figure_blocks(ctx, problem, "gradient-profile", panels, (
        "Depth profile: per layer, the norm of the true loss gradient and of the update each algorithm applied, at "
        "the first and the last probe reading; log scale, geometric mean over seeds with a 95% band. A profile "
        "falling towards the input (left) is a vanishing gradient."), "gradient and update norms by layer", ncols=2)


# --- influence locality ------------------------------------------------------------------------------------------

def influence_blocks(ctx: Context, problem: tuple[str, ...], groups: Groups) -> list[Block]:
    """Histograms of influence distance per layer, a mean-distance profile and table; a hint when the trials are
    MLPs that `learnbench diagnose` has not seen yet."""
    trials = [t for g in groups.values() for t in g]
    layers = _layers(trials, "influence/mean-distance/")
    if not layers:
        kinds = {t.model.get("kind") for t in done(trials)}
        if kinds and kinds <= set(INFLUENCE_KINDS):
            return [Heading(4, "Influence locality"), Text(
                "No influence metrics yet: `learnbench diagnose RUN_DIR` adds them for mlp and resmlp models.",
                note=True)]
        return []
    out: list[Block] = [Heading(4, "Influence locality")]
    panels = []
    for layer in _sample(layers, MAX_PANELS):
        distances = sorted({int(n.rsplit("/", 1)[1]) for n in metric_names(trials, f"influence/share/{layer}/")})
        bars = _share_bars(groups, layer, distances)
        if bars:
            title = f"layer {_short(layer)}" if _short(layer).isdigit() else layer
            panels.append(BarPanel(title, "distance (layers back)", "share of top units",
                                   [str(d) for d in distances], bars, ylim=(0, 1)))
    if panels:
        path = bars_figure(panels, ctx.colours, ctx.figure_path(*problem, "influence"))
        ctx.figures.append(path)
        out.append(Figure(path, (
            "Influence distance per layer: for every unit of the layer, its most influential upstream units (mean "
            "|activation x gradient| over test points, through the residual stream's per-layer components), and the "
            "share of them sitting d layers back. Without skips every unit reads the layer before (d = 1). Mean over "
            "seeds; whiskers: Student-t 95% interval when there are several."),
            alt=f"influence distance histograms, {' '.join(problem)}"))
    out.append(_final_table(groups, sorted(
        (n for n in metric_names(trials, "influence/") if not n.startswith("influence/share/")), key=_natural),
        "influence/", "of the final model, by `learnbench diagnose`"))
    return out


def _share_bars(groups: Groups, layer: str, distances: list[int]) -> list[Bars]:
    bars = []
    for label, group in groups.items():
        per_d = [stats.summarize(metric_values(group, f"influence/share/{layer}/{d}")) for d in distances]
        if any(s.n for s in per_d):
            heights = np.array([s.mean if s.n else 0.0 for s in per_d])
            if all(s.n > 1 for s in per_d):
                lo, hi = np.array([s.lo for s in per_d]), np.array([s.hi for s in per_d])
                bars.append(Bars(label, heights, np.clip(lo, 0, 1), np.clip(hi, 0, 1)))
            else:
                bars.append(Bars(label, heights))
    return bars


# --- flags -------------------------------------------------------------------------------------------------------

def _flag_count(group: Sequence[StoredTrial], flag: str) -> str:
    """'k/n': seeds raising the flag among the done seeds that measured it; '–' when none measured it."""
    measured = [t for t in done(group) if t.metrics.get(flag) is not None]
    if not measured:
        return "–"
    return f"{sum(1 for t in measured if t.metrics[flag] >= 0.5)}/{len(measured)}"


def _flags_table(groups: Groups) -> Table | None:
    trials = [t for g in groups.values() for t in g]
    present = [f for f in FLAGS if any(f in t.metrics for t in trials)]
    if not present:
        return None
    rows: list[list[Cell]] = []
    for label, group in groups.items():
        rows.append([label] + [_flag_count(group, f) for f in present])
    return Table(["algorithm", *(f.removeprefix("flag/") for f in present)], rows, caption=(
        "Seeds whose diagnostics raised the flag at the last probe reading (done trials): the first layer's "
        "true-gradient norm below 1e-3 (vanishing) or above 1e3 (exploding) times the last layer's."))
