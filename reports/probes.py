"""Sections for the probes' data, drawn only when a run recorded it: alignment angles (`align/*`, the
feedback-alignment family) and the training diagnostics (`grad/`, `update/`, `cos/`, `influence/`, and the
`flag/vanishing`, `flag/exploding` flags).

Probe curves are plotted against examples seen (one panel per metric, so per layer), mean over seeds with a 95%
band; their last values (the final metrics) are tabulated with one row per metric and one column per algorithm.
"""

from __future__ import annotations

import re

from . import stats
from .data import curve_names, done, metric_names, metric_values
from .document import Block, Cell, Figure, Heading, Table
from .figures import Panel, lines_figure
from .sections import Context, Groups, curve_lines

MAX_PANELS = 12  # per figure; a model with many layers lists the rest in the table only

ALIGNMENT = ("align/", "Alignment angles", "angle (degrees)", (
    "Angles between what the algorithm applies and what backprop would (update-grad: the weight update against "
    "the true gradient; B-W: feedback weights against the forward weights' transpose), per layer, against "
    "examples seen. 90° means no alignment; feedback alignment works when the angle falls well below it."))
DIAGNOSTICS = (
    ("grad/", "Gradient flow", "value", "Per-layer gradient statistics against examples seen."),
    ("update/", "Updates", "value", "Per-layer update statistics against examples seen."),
    ("cos/", "Cosine similarities", "cosine", "Per-layer cosine similarities against examples seen."),
    ("influence/", "Influence", "value", "Per-layer influence measures against examples seen."),
)
FLAGS = ("flag/vanishing", "flag/exploding")


def family_blocks(ctx: Context, problem: tuple[str, str], groups: Groups, prefix: str, ylabel: str,
                  caption: str) -> list[Block]:
    """A figure of a metric family's curves and a table of its final values; [] when the run has neither."""
    trials = [t for g in groups.values() for t in g]
    out: list[Block] = []
    names = sorted(curve_names(trials, prefix), key=_natural)
    panels = []
    for name in names[:MAX_PANELS]:
        lines, logx = curve_lines(groups, name, "examples")
        if lines:
            panels.append(Panel(name.removeprefix(prefix), "examples seen", ylabel, lines, logx))
    if panels:
        path = lines_figure(panels, ctx.colours, ctx.figure_path(*problem, prefix.strip("/")))
        ctx.figures.append(path)
        extra = len(names) - MAX_PANELS
        more = f" {extra} more curves are in the store, not drawn." if extra > 0 else ""
        out.append(Figure(path, caption + " Mean over seeds, shaded 95% band." + more,
                          alt=f"{prefix.strip('/')} curves, {problem[0]} {problem[1]}"))
    finals = sorted(metric_names(trials, prefix), key=_natural)
    if finals:
        out.append(_final_table(groups, finals, prefix))
    return out


def _natural(name: str) -> list:
    """Sort key that puts layer 10 after layer 9: 'align/B-W/10' -> ['align/b-w/', 10, '']."""
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def _final_table(groups: Groups, names: list[str], prefix: str) -> Table:
    labels = [k for k, g in groups.items() if any(n in t["metrics"] for t in done(g) for n in names)]
    rows: list[list[Cell]] = []
    for name in names:
        row: list[Cell] = [name.removeprefix(prefix)]
        for label in labels:
            s = stats.summarize(metric_values(groups[label], name))
            row.append("–" if s.n == 0 else f"{s.mean:.3g}" + (f" ± {s.hi - s.mean:.2g}" if s.n > 1 else ""))
        rows.append(row)
    return Table(["metric", *labels], rows, caption=(
        f"Final values of {prefix}* (last probe reading): mean ± Student-t 95% half-width over done seeds."))


def alignment_section(ctx: Context, problem: tuple[str, str], groups: Groups) -> list[Block]:
    prefix, title, ylabel, caption = ALIGNMENT
    blocks = family_blocks(ctx, problem, groups, prefix, ylabel, caption)
    return [Heading(3, title)] + blocks if blocks else []


def diagnostics_section(ctx: Context, problem: tuple[str, str], groups: Groups) -> list[Block]:
    out: list[Block] = []
    for prefix, title, ylabel, caption in DIAGNOSTICS:
        blocks = family_blocks(ctx, problem, groups, prefix, ylabel, caption)
        if blocks:
            out += [Heading(4, title)] + blocks
    flags = _flags_table(groups)
    if flags:
        out += [Heading(4, "Vanishing and exploding gradients"), flags]
    return [Heading(3, "Diagnostics")] + out if out else []


def _flag_count(group: list, flag: str) -> str:
    """'k/n': seeds raising the flag among the done seeds that measured it; '–' when none measured it."""
    measured = [t for t in done(group) if t["metrics"].get(flag) is not None]
    if not measured:
        return "–"
    return f"{sum(1 for t in measured if t['metrics'][flag] >= 0.5)}/{len(measured)}"


def _flags_table(groups: Groups) -> Table | None:
    trials = [t for g in groups.values() for t in g]
    present = [f for f in FLAGS if any(f in t["metrics"] for t in trials)]
    if not present:
        return None
    rows: list[list[Cell]] = []
    for label, group in groups.items():
        rows.append([label] + [_flag_count(group, f) for f in present])
    return Table(["algorithm", *(f.removeprefix("flag/") for f in present)], rows, caption=(
        "Seeds whose diagnostics raised the flag (done trials)."))

