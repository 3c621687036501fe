"""The Sweeps section: a suite entry's `sweep = { lr = [0.05, 0.1, 0.2] }` (`config._swept_entries`, `Trial.sweep`),
per group (one problem under one budget), as one figure per swept hyper-parameter: the final validation accuracy
against the swept value, one line per swept entry (per value of its other swept keys, when it sweeps several), the
mean over the done seeds joined by a line and each seed drawn as a small point. A log x axis when every value is
positive and they span more than a factor 10; values that are not numbers (an optimizer's name) sit at evenly
spaced, named positions. Drawn with the figure code of the tuning sensitivity plot (`figures.lines_figure` with one
`Panel` of `Line`s; choices at named positions as there), never a second plotting routine.

Validation, not test: a sweep is a choice of hyper-parameters, and the test split makes none. Every swept trial is
also an ordinary label in the group's other sections (`backprop lr=0.05`).
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np

from .data import ReportTrial, metric_values
from .document import Block, Figure, Heading, Text
from .figures import Line, Panel, lines_figure, palette
from .groups import VAL, Group
from .sections import Context


def sweep_section(ctx: Context, parts: tuple[str, ...], group: Group) -> list[Block]:
    trials = [t for label_trials in group.labels.values() for t in label_trials if t.sweep]
    keys = list(dict.fromkeys(key for t in trials for key in t.sweep["values"]))
    if not keys:
        return []
    out: list[Block] = [Heading(3, "Sweeps"), Text(
        "Each figure plots the final validation accuracy (%) against one swept hyper-parameter: per swept entry "
        "(and per value of its other swept hyper-parameters), the mean over seeds of the done trials, each seed a "
        "small point; failed or diverged trials are left out (see Final accuracy). A log x axis where every value "
        "is positive and they span more than a factor 10.", note=True)]
    for key in keys:
        out += sweep_figure(ctx, parts, key, [t for t in trials if key in t.sweep["values"]])
    return out


def sweep_figure(ctx: Context, parts: tuple[str, ...], key: str, trials: Sequence[ReportTrial]) -> list[Block]:
    """The figure of one swept hyper-parameter `key` over the trials that sweep it."""
    values = list({_id(t.sweep["values"][key]): t.sweep["values"][key] for t in trials}.values())
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    names = None if numeric else [text(v) for v in values]

    def at(value: Any) -> float:
        return float(value) if numeric else float(names.index(text(value)))

    series: dict[str, dict[float, list[ReportTrial]]] = {}  # line name -> x -> trials (seeds)
    for t in trials:
        others = " ".join(f"{k}={text(v)}" for k, v in t.sweep["values"].items() if k != key)
        name = f"{t.sweep['entry']} {others}".strip()
        series.setdefault(name, {}).setdefault(at(t.sweep["values"][key]), []).append(t)
    lines = []
    for name, points in series.items():
        xs = sorted(points)
        seeds = [(x, 100 * v) for x in xs for v in metric_values(points[x], VAL)]
        means = [(x, 100 * float(metric_values(points[x], VAL).mean())) for x in xs
                 if metric_values(points[x], VAL).size]
        lines += [Line(name, np.array([x for x, _ in means]), np.array([y for _, y in means]), marker="o"),
                  Line(name, np.array([x for x, _ in seeds]), np.array([y for _, y in seeds]), style="none",
                       marker=".", thin=True)]
    positive = [float(v) for v in values if numeric and float(v) > 0]
    logx = numeric and len(positive) == len(values) and max(positive) / min(positive) > 10
    lines = [line for line in lines if line.x.size]
    if not lines:  # no done trial: nothing to draw (Final accuracy lists them)
        return []
    panel = Panel(f"sweep of {key}", key + (" (log scale)" if logx else ""), "validation accuracy (%)", lines,
                  logx=logx, xticks=names)
    path = lines_figure([panel], palette(list(series)), ctx.figure_path(*parts, "sweep", key), ncols=1)
    ctx.figures.append(path)
    return [Figure(path, f"Final validation accuracy against {key} ({len(values)} values: "
                         f"{', '.join(text(v) for v in values)}); mean over seeds, seeds as points.",
                   alt=f"sweep of {key}")]


def text(value: Any) -> str:
    """A swept value as the trial labels write it: floats with %g, booleans as TOML, the rest as str."""
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _id(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
