"""Figures: matplotlib through its object API (`matplotlib.figure.Figure`; PNG goes through Agg, SVG through the
SVG backend), never pyplot, so no GUI backend and no global figure state. One colour per algorithm label in every
figure (`palette`), one style (`STYLE`). Files are written to the report's `figures/` folder; the HTML embeds them.

Three shapes cover every plot: a grid of line panels (learning curves, performance profiles, robustness, alignment,
diagnostics), a grid of grouped bar panels (influence-distance histograms) and the cost-vs-accuracy scatter with its
Pareto front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, FuncFormatter, NullFormatter

from .stats import pareto_front

STYLE = {
    "svg.fonttype": "none",  # text stays text: small files, selectable labels; the viewer's sans-serif is used
    "svg.hashsalt": "learnbench",  # stable element ids, so reruns give byte-identical figures
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 9,
    "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6,
    "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
    "lines.linewidth": 1.6, "figure.dpi": 100, "savefig.dpi": 150,
}
FORMAT = "svg"
PANEL_W, PANEL_H = 3.9, 2.9  # inches per panel


@dataclass
class Line:
    """One line in a panel. `label` picks the colour; `name` (default: label) is its legend entry."""

    label: str
    x: np.ndarray
    y: np.ndarray
    lo: np.ndarray | None = None  # CI band (same shape as y)
    hi: np.ndarray | None = None
    style: str = "-"
    name: str = ""
    step: bool = False
    marker: str | None = None
    thin: bool = False  # a single seed's raw curve
    hover: str = ""  # extra hover text in the interactive page (a raw curve's seed)


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    lines: list[Line]
    logx: bool = False
    ylim: tuple[float, float] | None = None
    logy: bool = False
    xticks: list[str] | None = None  # names of the x positions 0, 1, ... (layers), drawn as tick labels


def palette(labels: list[str]) -> dict[str, tuple]:
    """A fixed colour per label, in the order given (tab10; tab20 beyond ten labels)."""
    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _figure(n_panels: int, ncols: int) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n_panels))
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(PANEL_W * ncols, PANEL_H * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"Date": None} if path.suffix == ".svg" else {}
    fig.savefig(path, format=path.suffix[1:], metadata=meta)  # constrained layout already fits the legend
    return path


def plain(text: str) -> str:
    """Text from configs shown literally: a '$' would otherwise start matplotlib mathtext."""
    return text.replace("$", r"\$")


def _legend(fig: Figure, entries: dict[str, Line2D]) -> None:
    if entries:
        fig.legend(list(entries.values()), [plain(k) for k in entries], loc="outside lower center",
                   ncol=min(5, len(entries)), handlelength=2.2)


def _xscale(ax, log: bool) -> None:
    """Log axes for costs spanning decades; otherwise large numbers get SI ticks (40k, not 40000)."""
    if log:
        ax.set_xscale("log")
        ax.relim()  # limits autoscaled on the linear axis may reach 0 or below: recompute them in log space
        ax.autoscale_view()
        lo, hi = ax.get_xlim()
        if hi / lo < 100:  # a narrow log range: plain labels at 1, 2, 5 x 10^k (1 2 5, 200M 500M), not 2x10^0
            for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
                axis(FuncFormatter(_one_two_five))
        else:
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.xaxis.set_minor_formatter(NullFormatter())  # matplotlib labels minor ticks on short ranges: overlaps
    elif max(abs(v) for v in ax.get_xlim()) >= 1e4:
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def _one_two_five(value: float, _pos) -> str:
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value))
    if not any(abs(mantissa - m) < 1e-6 for m in (1, 2, 5)):
        return ""
    return EngFormatter(sep="")(value) if value >= 1e4 else f"{value:g}"


def _draw(ax, line: Line, colour) -> Line2D:
    kw = dict(color=colour, linestyle=line.style, marker=line.marker, markersize=4)
    if line.thin:
        kw.update(linewidth=0.8, alpha=0.6)
    if line.step:
        (h,) = ax.step(line.x, line.y, where="post", **kw)
    else:
        (h,) = ax.plot(line.x, line.y, **kw)
    if line.lo is not None and line.hi is not None:
        ax.fill_between(line.x, line.lo, line.hi, color=colour, alpha=0.18, linewidth=0,
                        step="post" if line.step else None)
    return h


def lines_figure(panels: list[Panel], colours: dict[str, tuple], path: Path, ncols: int = 3) -> Path:
    """A grid of line panels sharing one legend below them."""
    with matplotlib.rc_context(STYLE):
        fig, axes = _figure(len(panels), ncols)
        entries: dict[str, Line2D] = {}
        for ax, panel in zip(axes, panels):
            for line in panel.lines:
                handle = _draw(ax, line, colours.get(line.label, "grey"))
                entries.setdefault(line.name or line.label, handle)
            ax.set_title(plain(panel.title))
            ax.set_xlabel(panel.xlabel)
            ax.set_ylabel(panel.ylabel)
            _xscale(ax, panel.logx)
            if panel.logy:
                ax.set_yscale("log")
            if panel.xticks is not None:
                _ticks(ax, panel.xticks)
            if panel.ylim:
                ax.set_ylim(*panel.ylim)
        _legend(fig, entries)
        return _save(fig, path)


def _ticks(ax, names: list[str]) -> None:
    """Categorical x ticks at 0, 1, ...; at most ~14 labelled, so deep models stay legible."""
    every = max(1, -(-len(names) // 14))
    long = any(len(n) > 4 for n in names)
    ax.set_xticks(range(0, len(names), every), [plain(n) for n in names[::every]], rotation=90 if long else 0)


@dataclass
class Bars:
    """One label's bars in a bar panel: heights [K] at the panel's categories, optional 95% CI [K]."""

    label: str
    heights: np.ndarray
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None


@dataclass
class BarPanel:
    title: str
    xlabel: str
    ylabel: str
    categories: list[str]
    bars: list[Bars]
    ylim: tuple[float, float] | None = None


def bars_figure(panels: list[BarPanel], colours: dict[str, tuple], path: Path, ncols: int = 3) -> Path:
    """A grid of grouped bar panels (one bar per label at each category, CI whiskers when given), one legend."""
    with matplotlib.rc_context(STYLE):
        fig, axes = _figure(len(panels), ncols)
        entries: dict[str, object] = {}
        for ax, panel in zip(axes, panels):
            n, at = max(1, len(panel.bars)), np.arange(len(panel.categories))
            width = 0.8 / n
            for i, bars in enumerate(panel.bars):
                err = None if bars.lo is None else np.abs(np.stack([bars.heights - bars.lo, bars.hi - bars.heights]))
                h = ax.bar(at - 0.4 + width * (i + 0.5), bars.heights, width, yerr=err, capsize=2,
                           color=colours.get(bars.label, "grey"), error_kw={"linewidth": 0.8})
                entries.setdefault(bars.label, h)
            _ticks(ax, panel.categories)
            ax.set_title(plain(panel.title))
            ax.set_xlabel(panel.xlabel)
            ax.set_ylabel(panel.ylabel)
            if panel.ylim:
                ax.set_ylim(*panel.ylim)
        _legend(fig, entries)
        return _save(fig, path)


@dataclass
class Cloud:
    """One label's trials for the Pareto plot: per-seed costs ({axis: [n]}) and accuracies [n] (the figure's
    y label says which split)."""

    label: str
    costs: dict[str, np.ndarray]
    acc: np.ndarray
    seeds: list[int] | None = None  # the seed of each point, for the interactive page's hover


def pareto_figure(clouds: list[Cloud], axes_titles: dict[str, str], colours: dict[str, tuple],
                  path: Path, ylabel: str = "accuracy (%)") -> Path:
    """Per cost axis: every seed (small), each label's mean (large, with its 95% CI on accuracy), and the Pareto
    front of the means (dashed)."""
    from .stats import summarize

    with matplotlib.rc_context(STYLE):
        fig, axes = _figure(len(axes_titles), len(axes_titles))
        entries: dict[str, Line2D] = {}
        for ax, (axis, title) in zip(axes, axes_titles.items()):
            means_c, means_a = [], []
            for cloud in clouds:
                colour = colours.get(cloud.label, "grey")
                c, a = cloud.costs[axis], 100 * cloud.acc
                ax.scatter(c, a, s=12, color=colour, alpha=0.45, linewidths=0)
                s = summarize(a)
                err = None if not np.isfinite(s.hi) else [[s.mean - s.lo], [s.hi - s.mean]]
                h = ax.errorbar(np.mean(c), s.mean, yerr=err, fmt="o", color=colour, markersize=7,
                                markeredgecolor="white", capsize=3)
                entries.setdefault(cloud.label, h.lines[0])
                means_c.append(float(np.mean(c)))
                means_a.append(s.mean)
            front = pareto_front(means_c, means_a)
            if len(front) > 1:
                ax.step([means_c[i] for i in front], [means_a[i] for i in front], where="post",
                        color="0.35", linestyle="--", linewidth=1, zorder=0)
            positive = [v for v in means_c if v > 0]
            _xscale(ax, bool(positive) and max(positive) / min(positive) > 10)
            ax.set_xlabel(title)
            ax.set_ylabel(ylabel)
            ax.set_title(f"accuracy vs {title}")
        _legend(fig, entries)
        return _save(fig, path)
