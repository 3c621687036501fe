"""The interactive report: plotly.js inlined once, hover text with label, seeds and hyper-parameters, one legend
group per label, coinciding Pareto means named in each other's hover, and the static fallback without plotly."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from learnbench.reports import build_report, interactive
from learnbench.reports.figures import Cloud, Line, Panel
from learnbench.store import Store
from report_fixtures import trial_config, write_trial

needs_plotly = pytest.mark.skipif(not interactive.available(),
                                  reason="plotly is not installed (pip install 'learnbench[interactive]')")


def small_run(run: Path) -> Path:
    """Two labels with two seeds each, curves and costs; B's hyper-parameters carry markup."""
    run.mkdir(parents=True)
    store = Store(run)
    store.set_run_info({"suite": "toy", "learnbench": "0.1.0", "created": 1.7e9})
    for label, hp in (("A", {"lr": 0.1}), ("B<i>", {"lr": 0.2, "note": "<b>x</b>"})):
        for seed in (0, 1):
            acc = 0.8 + 0.05 * seed + (0.1 if label == "A" else 0.0)
            points = [(1.0, 100, 1e6, acc / 2), (2.0, 200, 2e6, acc)]
            write_trial(store, trial_config(label, label[0].lower(), seed, dataset="toy", model="mlp-8", suite="toy",
                                            reference="a", hparams=hp),
                        metrics={"test/accuracy": acc, "val/accuracy": acc, "cost/train_seconds": 2.0 + seed,
                                 "cost/flops": 2e6, "cost/examples": 200.0, "robust/clean": acc,
                                 "robust/pgd-linf/0.1": acc / 2, "robust/pgd-linf/0.2": acc / 4},
                        curves={"val/accuracy": points, "test/accuracy": points})
    store.close()
    return run


def plot_specs(page: str) -> list[dict]:
    """The data and layout of every Plotly.newPlot call in the page."""
    specs = []
    for m in re.finditer(r'Plotly\.newPlot\(\s*"([^"]+)",\s*(\[.*?\]),\s*(\{.*?\}),\s*\{"displaylogo"', page, re.S):
        specs.append({"id": m.group(1), "data": json.loads(m.group(2)), "layout": json.loads(m.group(3))})
    return specs


@needs_plotly
def test_interactive_page_inlines_plotly_once_and_keeps_svgs(tmp_path: Path):
    written = build_report([small_run(tmp_path / "run")])
    page = written["report.html"].read_text()
    assert page.count("* plotly.js v") == 1  # the library's banner: inlined once
    assert not re.search(r"<script[^>]*\bsrc=", page) and "cdn.plot.ly/plotly" not in page
    specs = plot_specs(page)
    assert [s["id"] for s in specs] == ["plot-1", "plot-2", "plot-3"]  # curves, Pareto, robustness
    # figures/*.svg are still written and referenced by report.md, and kept for viewers without JavaScript
    assert {"toy-mlp-8-curves.svg", "toy-mlp-8-pareto.svg", "toy-mlp-8-robustness.svg"} <= {
        p.name for p in written.values()}
    assert page.count("<noscript><img") == 3 and "figures/toy-mlp-8-pareto.svg" in written["report.md"].read_text()
    assert "Interactive figures (plotly)" in page


@needs_plotly
def test_hover_shows_label_seeds_and_escaped_hyperparameters(tmp_path: Path):
    page = build_report([small_run(tmp_path / "run")])["report.html"].read_text()
    curves, pareto, robust = plot_specs(page)
    mean_a = next(t for t in curves["data"] if t.get("name") == "A" and t.get("hovertemplate"))
    assert "seeds 0, 1" in mean_a["hovertemplate"] and "lr=0.1" in mean_a["hovertemplate"]
    seeds_b = next(t for t in pareto["data"] if t.get("name") == "B&lt;i&gt;" and t.get("text"))
    assert seeds_b["text"] == ["seed 0", "seed 1"]
    assert "note=&lt;b&gt;x&lt;/b&gt;" in seeds_b["hovertemplate"] and "<b>x</b>" not in seeds_b["hovertemplate"]
    assert any("pgd-linf" in a["text"] for a in robust["layout"]["annotations"])  # one panel per attack
    for spec in (curves, pareto, robust):  # one legend entry per label; every trace of a label in its group
        legend = [t["name"] for t in spec["data"] if t.get("showlegend") is not False and "name" in t]
        assert {"A", "B&lt;i&gt;"} <= set(legend) and len(legend) == len(set(legend))


@needs_plotly
def test_coinciding_pareto_means_name_each_other():
    same = {"flops": np.array([1e9, 1e9]), "seconds": np.array([5.0, 5.1])}
    clouds = [Cloud(k, same, np.array([0.9, 0.91]), [0, 1]) for k in ("bp", "fa", "dfa")]
    clouds.append(Cloud("es", {"flops": np.array([1e12, 1e12]), "seconds": np.array([50.0, 60.0])},
                        np.array([0.7, 0.72]), [0, 1]))
    plot = interactive.ParetoPlot(clouds, {"flops": "FLOPs", "seconds": "seconds"}, {}, "accuracy (%)")
    fig = interactive._pareto(plot)
    means = [t for t in fig.data if t.name == "bp" and t.error_y and t.error_y.array is not None]
    assert len(means) == 2 and all("same place: fa, dfa" in t.hovertemplate for t in means)
    es = next(t for t in fig.data if t.name == "es" and t.showlegend)
    assert "same place" not in es.hovertemplate
    assert fig.layout.xaxis.type == "log"  # costs span three decades
    assert len({t.marker.symbol for t in fig.data if t.showlegend and t.name != "Pareto front"}) == 4


@needs_plotly
def test_nan_points_become_gaps_not_invalid_json():
    panel = Panel("p", "x", "y", [Line("A", np.array([1.0, 2.0, 3.0]), np.array([1.0, np.nan, np.inf]))])
    html = interactive.render(interactive.LinesPlot([panel], {"A": (0, 0, 1, 1)}), "plot-x", False)
    assert "NaN" not in html and "Infinity" not in html and "null" in html


def test_without_plotly_the_page_embeds_svgs_and_says_so(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly", None)  # as if not installed: importing it raises ImportError
    assert not interactive.available()
    written = build_report([small_run(tmp_path / "run")])
    page = written["report.html"].read_text()
    assert "<script" not in page.lower() and "<noscript" not in page
    assert page.count("<img ") == len([k for k in written if k.startswith("figures/")])
    notes = [line for line in page.splitlines() if "Static figures: install plotly" in line]
    assert len(notes) == 1
