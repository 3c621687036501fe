"""Interactive figures for report.html, drawn with plotly (the optional extra `learnbench[interactive]`) from the
very data the matplotlib figure drew (`figures.Panel` / `figures.Cloud`), so the page and figures/*.svg always
agree. Without plotly the page embeds the SVGs, as before.

A section attaches a `LinesPlot` or `ParetoPlot` to its `document.Figure`; `html.py` asks `render` for each and
embeds plotly.js once, inline, before the first one: the page stays one offline file (no CDN request). Hover
shows the label, its seeds (the seed of a single-seed point) and hyper-parameters; clicking a legend entry hides
that algorithm in every panel (one legend group per label). On the cost-vs-accuracy plot, where several
gradient-based methods land on the same point, every label gets its own marker symbol, markers are
semi-transparent, and each mean's hover names every other mean drawn at the same place. Every piece of text from
configs or plugins is HTML-escaped: plotly renders a few tags (<b>, <a>, <br>) in text, and an escaped label is
shown literally, never interpreted.
"""

from __future__ import annotations

import html
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from learnbench.trial import StoredTrial

from .figures import Cloud, Panel
from .stats import pareto_front

SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "triangle-down", "star", "pentagon",
           "hexagon", "triangle-left", "triangle-right", "hourglass", "bowtie")
DASH = {"-": "solid", "--": "dash", ":": "dot", "-.": "dashdot"}
ROW_PX = 330  # height of one row of panels
CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "svg"}}


def available() -> bool:
    """Whether plotly is installed (the report then draws its main figures interactively)."""
    return importlib.util.find_spec("plotly") is not None


@dataclass
class LinesPlot:
    """A `figures.lines_figure` grid. `info`: label -> hover text (seeds, hyper-parameters)."""

    panels: list[Panel]
    colours: Mapping[str, tuple]
    info: Mapping[str, str] = field(default_factory=dict)
    ncols: int = 3


@dataclass
class ParetoPlot:
    """A `figures.pareto_figure`: one panel per cost axis."""

    clouds: list[Cloud]
    axes_titles: Mapping[str, str]
    colours: Mapping[str, tuple]
    ylabel: str
    info: Mapping[str, str] = field(default_factory=dict)


def hover_info(labels: Mapping[str, Sequence[StoredTrial]]) -> dict[str, str]:
    """label -> 'algorithm a, seeds 0, 1, 2<br>lr=0.1, ...' (every distinct setting, ' | ' between them)."""
    out = {}
    for label, trials in labels.items():
        algos = sorted({t.algorithm for t in trials})
        seeds = ", ".join(str(s) for s in sorted({t.seed for t in trials}))
        settings = sorted({_settings(t.hparams) for t in trials})
        text = " | ".join(settings)
        text = text if len(text) <= 240 else text[:239] + "…"
        out[label] = _esc(f"{', '.join(algos)}; seeds {seeds}") + "<br>" + _wrap(_esc(text))
    return out


def _settings(hparams: Any) -> str:
    if not isinstance(hparams, Mapping):
        return "–"
    return ", ".join(f"{k}={v}" for k, v in sorted(hparams.items()) if v is not None) or "–"


def _wrap(text: str, width: int = 80) -> str:
    """Long hyper-parameter lists broken at ', ' into hover lines of about `width` characters."""
    lines, line = [], ""
    for part in text.split(", "):
        if line and len(line) + len(part) > width:
            lines.append(line + ",")
            line = part
        else:
            line = f"{line}, {part}" if line else part
    return "<br>".join(lines + [line])


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def _rgb(colour: Any, alpha: float = 1.0) -> str:
    if isinstance(colour, str):  # a named matplotlib colour ('grey')
        from matplotlib.colors import to_rgba

        colour = to_rgba(colour)
    r, g, b = (int(round(255 * c)) for c in colour[:3])
    return f"rgba({r},{g},{b},{alpha:g})"


def _floats(values: Any) -> list[float | None]:
    """JSON-safe numbers: NaN and inf become None (a gap), never invalid JSON."""
    return [float(v) if math.isfinite(float(v)) else None for v in np.asarray(values, float).ravel()]


def _xfmt(values: Sequence[float]) -> str:
    """Hover format of x: SI prefixes for large costs (2.001G FLOPs), plain digits below 10^4 (0.167 seconds, not
    the SI '166.6m', which reads as minutes)."""
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    return "%{x:.4~s}" if finite and max(finite) >= 1e4 else "%{x:.3~g}"


def render(plot: LinesPlot | ParetoPlot, div_id: str, include_plotlyjs: bool) -> str:
    """The plot as an HTML fragment (a div and its script); plotly.js itself inline when `include_plotlyjs`."""
    import plotly.io as pio

    fig = _lines(plot) if isinstance(plot, LinesPlot) else _pareto(plot)
    return pio.to_html(fig, full_html=False, include_plotlyjs=include_plotlyjs, div_id=div_id, config=CONFIG,
                       default_width="100%")


def _grid(n_panels: int, ncols: int, titles: list[str]):
    from plotly.subplots import make_subplots

    ncols = max(1, min(ncols, n_panels))
    nrows = -(-n_panels // ncols)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=[_esc(t) for t in titles],
                        horizontal_spacing=0.08, vertical_spacing=min(0.3, 0.45 / nrows))
    fig.update_layout(template="plotly_white", height=ROW_PX * nrows + 90, margin=dict(l=50, r=20, t=40, b=40),
                      legend=dict(orientation="h", yanchor="top", y=-62 / (ROW_PX * nrows),  # below the x titles
                                  groupclick="togglegroup"),
                      hoverlabel=dict(align="left"), font=dict(size=12))
    fig.update_annotations(font_size=13)
    return fig, [(1 + i // ncols, 1 + i % ncols) for i in range(n_panels)]


def _lines(plot: LinesPlot):
    import plotly.graph_objects as go

    fig, cells = _grid(len(plot.panels), plot.ncols, [p.title for p in plot.panels])
    shown: set[str] = set()
    for panel, (row, col) in zip(plot.panels, cells):
        for line in panel.lines:
            name = line.name or line.label
            colour = plot.colours.get(line.label, "grey")
            where = dict(row=row, col=col)
            if line.lo is not None and line.hi is not None:  # the CI band: hi, then lo filled up to it
                band = dict(mode="lines", line=dict(width=0, shape="hv" if line.step else "linear"),
                            legendgroup=name, showlegend=False, hoverinfo="skip")
                fig.add_trace(go.Scatter(x=_floats(line.x), y=_floats(line.hi), **band), **where)
                fig.add_trace(go.Scatter(x=_floats(line.x), y=_floats(line.lo), fill="tonexty",
                                         fillcolor=_rgb(colour, 0.18), **band), **where)
            extra = f"<br>{_esc(line.hover)}" if line.hover else ""
            hover = (f"<b>{_esc(name)}</b>{extra}<br>{_esc(panel.xlabel)}: {_xfmt(_floats(line.x))}<br>"
                     f"{_esc(panel.ylabel)}: %{{y:.2f}}<br>{plot.info.get(line.label, '')}<extra></extra>")
            fig.add_trace(go.Scatter(
                x=_floats(line.x), y=_floats(line.y), name=_esc(name), legendgroup=name,
                showlegend=name not in shown, mode="lines+markers" if line.marker else "lines",
                line=dict(color=_rgb(colour, 0.6 if line.thin else 1.0), width=1 if line.thin else 2,
                          dash=DASH.get(line.style, "solid"), shape="hv" if line.step else "linear"),
                marker=dict(size=6), hovertemplate=hover), **where)
            shown.add(name)
        _axes(fig, panel, row, col)
    return fig


def _axes(fig, panel: Panel, row: int, col: int) -> None:
    x = dict(title_text=_esc(panel.xlabel), type="log" if panel.logx else "linear", exponentformat="SI")
    if panel.xticks is not None:
        x.update(tickvals=list(range(len(panel.xticks))), ticktext=[_esc(t) for t in panel.xticks])
    fig.update_xaxes(row=row, col=col, **x)
    y = dict(title_text=_esc(panel.ylabel), type="log" if panel.logy else "linear")
    if panel.ylim:
        y["range"] = list(panel.ylim)
    fig.update_yaxes(row=row, col=col, **y)


def _pareto(plot: ParetoPlot):
    import plotly.graph_objects as go

    from .stats import summarize

    fig, cells = _grid(len(plot.axes_titles), len(plot.axes_titles),
                       [f"accuracy vs {t}" for t in plot.axes_titles.values()])
    symbol = {c.label: SYMBOLS[i % len(SYMBOLS)] for i, c in enumerate(plot.clouds)}
    for i, ((axis, title), (row, col)) in enumerate(zip(plot.axes_titles.items(), cells)):
        means = []  # per cloud: (mean cost, mean accuracy %, CI lo, CI hi)
        for cloud in plot.clouds:
            s = summarize(100 * cloud.acc)
            means.append((float(np.mean(cloud.costs[axis])), s.mean, s.lo, s.hi))
        logx = _log_costs([m[0] for m in means])
        xfmt = _xfmt([m[0] for m in means])
        for k, cloud in enumerate(plot.clouds):
            colour, info, name = plot.colours.get(cloud.label, "grey"), plot.info.get(cloud.label, ""), cloud.label
            seeds = list(cloud.seeds) if cloud.seeds else [None] * len(cloud.acc)
            seed_text = [f"seed {s}" if s is not None else "one seed" for s in seeds]
            fig.add_trace(go.Scatter(
                x=_floats(cloud.costs[axis]), y=_floats(100 * cloud.acc), mode="markers", legendgroup=name,
                showlegend=False, text=seed_text, name=_esc(name),
                marker=dict(symbol=symbol[name] + "-open", size=7, color=_rgb(colour, 0.7)),
                hovertemplate=(f"<b>{_esc(name)}</b> %{{text}}<br>{_esc(title)}: {xfmt}<br>"
                               f"{_esc(plot.ylabel)}: %{{y:.2f}}<br>{info}<extra></extra>")), row=row, col=col)
            c, m, lo, hi = means[k]
            ci = f" [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) and math.isfinite(hi) else ""
            near = _coinciding(means, k, logx)
            also = ("<br>same place: " + ", ".join(_esc(plot.clouds[j].label) for j in near)) if near else ""
            err = dict(type="data", symmetric=False, array=[max(0.0, hi - m)], arrayminus=[max(0.0, m - lo)],
                       color=_rgb(colour, 0.8), thickness=1.2, width=4) if ci else None
            fig.add_trace(go.Scatter(
                x=[c], y=[m], mode="markers", name=_esc(name), legendgroup=name, showlegend=i == 0, error_y=err,
                marker=dict(symbol=symbol[name], size=12, color=_rgb(colour, 0.75),
                            line=dict(color="white", width=1)),
                hovertemplate=(f"<b>{_esc(name)}</b>: mean of {len(cloud.acc)} seeds<br>{_esc(title)}: "
                               f"{xfmt}<br>{_esc(plot.ylabel)}: %{{y:.2f}}{ci}{also}<br>{info}<extra></extra>")),
                row=row, col=col)
        front = pareto_front([m[0] for m in means], [m[1] for m in means])
        if len(front) > 1:
            fig.add_trace(go.Scatter(x=[means[j][0] for j in front], y=[means[j][1] for j in front], mode="lines",
                                     line=dict(color="rgb(90,90,90)", dash="dash", width=1, shape="hv"),
                                     name="Pareto front", legendgroup="Pareto front", showlegend=i == 0,
                                     hoverinfo="skip"), row=row, col=col)
        fig.update_xaxes(row=row, col=col, title_text=_esc(title), type="log" if logx else "linear",
                         exponentformat="SI")
        fig.update_yaxes(row=row, col=col, title_text=_esc(plot.ylabel))
    return fig


def _log_costs(costs: list[float]) -> bool:
    """The matplotlib figure's rule: a log cost axis when the positive means span more than a factor 10."""
    positive = [v for v in costs if math.isfinite(v) and v > 0]
    return bool(positive) and len(positive) == len(costs) and max(positive) / min(positive) > 10


def _coinciding(means: list[tuple[float, float, float, float]], k: int, logx: bool) -> list[int]:
    """Other means drawn on top of mean k: within 2% of the x range (of its decades on a log axis) and half a
    percentage point of accuracy."""
    xs = [math.log10(m[0]) if logx and m[0] > 0 else m[0] for m in means]
    finite = [x for x in xs if math.isfinite(x)]
    span = (max(finite) - min(finite)) if finite else 0.0
    tol = 0.02 * span if span > 0 else 1e-9 + 1e-6 * abs(xs[k])
    return [j for j in range(len(means)) if j != k and abs(xs[j] - xs[k]) <= tol
            and abs(means[j][1] - means[k][1]) <= 0.5]
