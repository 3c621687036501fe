"""Reports: numbers checked against independent computations (scipy.stats and hand formulas), merging, escaping,
a self-contained HTML page, and a headless-Chromium render of it."""

from __future__ import annotations

import base64
import math
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from scipy import interpolate
from scipy import stats as sps

from learnbench.errors import UsageError
from learnbench.reports import build_report, readme_section, show_table, update_readme
from learnbench.reports import interactive, stats
from learnbench.reports.data import Curve, load_runs
from learnbench.reports.document import si
from learnbench.store import Store
from browser import CHROMIUM, visit
from report_fixtures import holm_by_hand, md_row, md_rows, realistic_store, trial_config, write_trial

# Known final accuracies per label (three seeds each): test accuracies FINAL, validation accuracies VALID. For
# label A, validation curves whose first crossings of the targets the tests work out by hand; every test curve is
# its validation curve minus TEST_GAP, so a report that read the test curve would give other answers.
FINAL = {"A": [0.90, 0.92, 0.94], "B": [0.80, 0.85, 0.83], "C": [0.91, 0.915, 0.925]}
VALID = {"A": [0.90, 0.92, 0.94], "B": [0.82, 0.84, 0.86], "C": [0.93, 0.921, 0.925]}
TEST_GAP = 0.1
A_CURVES = [  # per seed: (seconds, examples, flops, validation accuracy) at each evaluation
    [(1.0, 100, 1e6, 0.50), (2.0, 200, 2e6, 0.91), (3.0, 300, 3e6, 0.96), (4.0, 400, 4e6, 0.90)],
    [(1.5, 100, 1e6, 0.60), (2.5, 200, 2e6, 0.89), (3.5, 300, 3e6, 0.93), (4.5, 400, 4e6, 0.92)],
    [(0.9, 100, 1e6, 0.70), (1.9, 200, 2e6, 0.90), (2.9, 300, 3e6, 0.95), (3.9, 400, 4e6, 0.94)],
]


def known_store(run_dir: Path) -> None:
    """Labels A, B, C with algorithm ids a, b, c; the suite's reference is `a` (so label A)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    store = Store(run_dir)
    store.set_run_info({"suite": "toy", "learnbench": "0.1.0", "created": 1.7e9})
    for label, accs in FINAL.items():
        for seed, acc in enumerate(accs):
            trial = trial_config(label, label.lower(), seed, dataset="toy", model="mlp-8", suite="toy", reference="a")
            val = VALID[label][seed]
            points = A_CURVES[seed] if label == "A" else [(1.0, 100, 1e6, val / 2), (2.0, 200, 2e6, val)]
            curves = {"val/accuracy": points, "test/accuracy": [(*p[:3], p[3] - TEST_GAP) for p in points]}
            metrics = {"test/accuracy": acc, "val/accuracy": val, "cost/train_seconds": 10.0 + seed,
                       "cost/flops": 1e9, "cost/examples": 400.0}
            write_trial(store, trial, metrics=metrics, curves=curves)
    write_trial(store, trial_config("B", "b", 3, dataset="toy", model="mlp-8", suite="toy", reference="a"), "failed",
                error="Traceback (most recent call last):\n  File \"x.py\"\nValueError: bad <script>alert(1)</script>")
    store.close()


@pytest.fixture(scope="module")
def known_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("known") / "run"
    known_store(run)
    return run


@pytest.fixture(scope="module")
def known_md(known_run: Path) -> str:
    return build_report([known_run])["report.md"].read_text()


@pytest.fixture(scope="module")
def realistic(tmp_path_factory) -> tuple[Path, dict[str, Path], float]:
    run = tmp_path_factory.mktemp("realistic") / "run"
    realistic_store(run).close()
    start = time.perf_counter()
    written = build_report([run])
    return run, written, time.perf_counter() - start


# --- statistics against independent computations ------------------------------------------------------------
def test_summary_is_the_student_t_interval():
    values = FINAL["A"]
    s = stats.summarize(values)
    lo, hi = sps.t.interval(0.95, df=2, loc=np.mean(values), scale=sps.sem(values))
    assert (s.mean, s.n) == (pytest.approx(0.92), 3)
    assert s.std == pytest.approx(math.sqrt(sum((v - 0.92) ** 2 for v in values) / 2))
    assert (s.lo, s.hi) == (pytest.approx(lo), pytest.approx(hi))
    assert math.isnan(stats.summarize([0.5]).lo) and stats.summarize([]).n == 0


@pytest.mark.slow
def test_report_table_shows_known_means_and_cis(known_md: str):
    for label, values in FINAL.items():
        row = md_row(known_md, label, after="### Final accuracy")
        lo, hi = sps.t.interval(0.95, df=2, loc=np.mean(values), scale=sps.sem(values))
        assert float(row[1]) == pytest.approx(100 * np.mean(VALID[label]), abs=0.005)
        assert float(row[2]) == pytest.approx(100 * np.mean(values), abs=0.005)
        assert float(row[3]) == pytest.approx(100 * np.std(values, ddof=1), abs=0.005)
        assert row[4] == f"[{100 * lo:.2f}, {100 * hi:.2f}]"
        assert row[5] == "3"
    assert md_row(known_md, "B", after="### Final accuracy")[6] == "3 done, 1 failed"
    raw = {r[0]: r for r in md_rows(known_md, "### Final accuracy", raw=True)}
    # validation marks the best (C: 92.53 > A: 92.00); test accuracy is never marked, though A's is the highest
    assert raw["C"][1].startswith("**") and not raw["A"][1].startswith("**")
    assert not any(r[c].startswith("**") for r in raw.values() for c in (2, 3, 4))
    assert "`ValueError: bad <script>alert(1)</script>`" in known_md  # the failed trial, listed with its error


def test_band_matches_independent_interpolation():
    curves = [Curve(np.arange(4), np.array(s) * 1.0, np.array(e) * 1.0, np.zeros(4), np.array(v))
              for s, e, v in (([0, 1, 2, 4], [0, 10, 20, 40], [0.1, 0.5, 0.7, 0.9]),
                              ([0.5, 1.5, 2.5, 3.5], [5, 15, 25, 35], [0.2, 0.4, 0.8, 0.85]),
                              ([0, 2, 3, 3.8], [0, 20, 30, 38], [0.0, 0.6, 0.7, 0.95]))]
    grid = stats.common_grid(curves, "seconds")
    assert grid[0] == 0.5 and grid[-1] == 3.5  # the range every seed covers, no extrapolation
    mean, lo, hi = stats.band(curves, "seconds", grid)
    ys = np.stack([interpolate.interp1d(c.seconds, c.value)(grid) for c in curves])
    half = sps.t.ppf(0.975, 2) * ys.std(axis=0, ddof=1) / math.sqrt(3)
    np.testing.assert_allclose(mean, ys.mean(axis=0))
    np.testing.assert_allclose(hi - mean, half)
    np.testing.assert_allclose(mean - lo, half)


def test_time_to_target_matches_hand_computation(known_md: str):
    curves = [Curve(np.arange(4), *(np.array(c, dtype=float).T)) for c in A_CURVES]
    # seeds reach 90% at their 2nd, 3rd and 2nd evaluations: seconds 2.0, 3.5, 1.9 -> median 2.0
    r90 = stats.time_to_target(curves, 0.90)
    assert (r90.reached, r90.n, r90.seconds, r90.examples, r90.flops) == (3, 3, 2.0, 200.0, 2e6)
    # 95%: only seeds 0 (3.0 s) and 2 (2.9 s): median over those two; the profile cost needs a majority
    r95 = stats.time_to_target(curves, 0.95)
    assert (r95.reached, r95.seconds, r95.examples) == (2, pytest.approx(2.95), 300.0)
    assert r95.profile_costs["seconds"] == 3.0  # median of [3.0, inf, 2.9]
    assert stats.time_to_target(curves, 0.97).reached == 0
    assert stats.time_to_target(curves[:2], 0.95).profile_costs["seconds"] == math.inf  # 1 of 2 is no majority
    # In the report, targets are fractions of the reference A's mean final validation accuracy (92%), read off the
    # validation curves. 90% of it = 82.8%: A's seeds cross at their 2nd evaluations (2.0, 2.5, 1.9 s -> median
    # 2.0), B's seeds 1 and 2 at 2.0 s (0.82 < 0.828; of 4 trials, one failed); 99% = 91.08%: A's 3rd evaluations
    # (3.0, 3.5, 2.9 s).
    base = np.mean(VALID["A"])
    assert "of the final validation accuracy of the reference A (suite reference 'a')" in known_md
    rows = md_rows(known_md, "### Time to target")
    at = [r[0] for r in rows]
    block90 = rows[at.index(f"90% ({100 * 0.9 * base:.2f})"):at.index(f"95% ({100 * 0.95 * base:.2f})")]
    assert [r[1:6] for r in block90] == [["A", "3/3", "2", "200", "2M"], ["B", "2/4", "2", "200", "2M"],
                                         ["C", "3/3", "2", "200", "2M"]]
    block99 = rows[at.index(f"99% ({100 * 0.99 * base:.2f})"):at.index(f"100% ({100 * base:.2f})")]
    assert [r[1:6] for r in block99] == [["A", "3/3", "3", "300", "3M"], ["C", "3/3", "2", "200", "2M"],
                                         ["not reached: B", "0", "–", "–", "–"]]


def test_paired_tests_with_holm_match_scipy(known_md: str):
    # seeds 0-2 are done for every label (B's seed 3 failed): pairs are seed s against seed s
    raw = {(a, b): sps.ttest_rel(FINAL[a], FINAL[b]).pvalue for a, b in (("A", "B"), ("A", "C"), ("B", "C"))}
    holm = holm_by_hand(raw)
    tests, untested = stats.paired_tests({k: dict(enumerate(v)) for k, v in FINAL.items()})
    assert untested == [] and [(t.a, t.b) for t in tests] == list(raw)
    for t in tests:
        d = np.subtract(FINAL[t.a], FINAL[t.b])
        lo, hi = sps.t.interval(0.95, df=2, loc=d.mean(), scale=sps.sem(d))
        assert (t.n, t.p_t, t.p_holm) == (3, pytest.approx(raw[t.a, t.b]), pytest.approx(holm[t.a, t.b]))
        assert (t.diff.mean, t.diff.lo, t.diff.hi) == (pytest.approx(d.mean()), pytest.approx(lo), pytest.approx(hi))
        assert math.isnan(t.p_wilcoxon)  # three pairs: too few for the signed-rank test
    row = md_rows(known_md, "### Pairwise significance")[0]
    d = np.subtract(FINAL["A"], FINAL["B"])
    lo, hi = sps.t.interval(0.95, df=2, loc=d.mean(), scale=sps.sem(d))
    assert row[:8] == ["A", "B", "3", f"{100 * d.mean():+.2f}", f"[{100 * lo:+.2f}, {100 * hi:+.2f}]",
                       f"{raw['A', 'B']:.3f}", "–", f"{holm['A', 'B']:.3f}"]


def test_holm_and_profiles_and_pareto_on_hand_examples():
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, np.nan]), [0.03, 0.06, 0.06, np.nan])
    ratios = stats.performance_ratios({"A": np.array([1.0, 2.0, np.inf, np.inf]),
                                       "B": np.array([2.0, 1.0, 4.0, np.inf])})
    np.testing.assert_allclose(ratios["A"], [1, 2, np.inf, np.inf])  # the problem nobody solved stays
    np.testing.assert_allclose(ratios["B"], [2, 1, 1, np.inf])
    taus = np.array([1.0, 1.5, 2.0, 10.0])
    np.testing.assert_allclose(stats.profile(ratios["A"], taus), [1 / 4, 1 / 4, 2 / 4, 2 / 4])
    np.testing.assert_allclose(stats.profile(ratios["B"], taus), [2 / 4, 2 / 4, 3 / 4, 3 / 4])
    assert stats.pareto_front([1, 2, 3, 2, 4], [0.8, 0.9, 0.85, 0.7, 0.95]) == [0, 1, 4]
    assert [si(v) for v in (9.996e11, 1.234e12, 48_000, 999.6, 0.5)] == ["1T", "1.23T", "48k", "1k", "0.5"]


# --- merging, terminal summary, README -------------------------------------------------------------------------
def test_merging_runs_counts_a_shared_trial_once(tmp_path: Path):
    first, second = Store(_mk(tmp_path / "r1")), Store(_mk(tmp_path / "r2"))
    accs = {0: 0.90, 1: 0.92, 2: 0.97}
    for store, seeds in ((first, (0, 1)), (second, (1, 2))):  # seed 1 is the same trial in both runs
        for seed in seeds:
            write_trial(store, trial_config("A", "a", seed), metrics={"test/accuracy": accs[seed]})
    write_trial(first, trial_config("B", "b", 0), "failed", error="boom")
    write_trial(second, trial_config("B", "b", 0), metrics={"test/accuracy": 0.5})  # the rerun that finished
    first.close(), second.close()
    data = load_runs([tmp_path / "r1", tmp_path / "r2"])
    assert len(data.trials) == 4 and [t.status for t in data.trials if t.label == "B"] == ["done"]
    md = build_report([tmp_path / "r1", tmp_path / "r2"], tmp_path / "out")["report.md"].read_text()
    row = md_row(md, "A", after="### Final accuracy")
    assert row[5] == "3" and float(row[2]) == pytest.approx(100 * np.mean(list(accs.values())), abs=0.005)
    assert (tmp_path / "out" / "report.html").is_file() and not (tmp_path / "r1" / "report.md").exists()


def _mk(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_show_table_summarises_and_lists_failures(known_run: Path):
    text = show_table(Store.open(known_run).trials())
    half = sps.t.ppf(0.975, 2) * np.std(FINAL["A"], ddof=1) / math.sqrt(3)
    assert re.search(rf"toy\s+mlp-8\s+epochs = 20\s+A\s+92\.00\s+92\.00 ± {100 * half:.2f}\s+3\s+3 done", text)
    assert "3 done, 1 failed" in text
    assert "B seed 3 [failed]" in text and "ValueError: bad <script>alert(1)</script>" in text


@pytest.mark.slow
def test_show_table_flags_and_robust_column(realistic):
    run, _, _ = realistic
    text = show_table(Store.open(run).trials())
    assert "pgd-linf ε=0.1 %" in text and "!zero-grad" in text
    assert "dfa seed 1 [diverged]" in text and "non-finite loss at step 412" in text


def test_readme_section_and_update(known_run: Path, tmp_path: Path):
    section = readme_section([known_run])
    assert "`toy` suite" in section and md_row(section, "toy")[2:4] == ["epochs = 20", "A"]
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nintro\n\n<!-- results:start -->\nold table\n<!-- results:end -->\n\nmore\n")
    update_readme(readme, section)
    once = readme.read_text()
    assert "old table" not in once and section.strip() in once
    assert once.startswith("# x\n\nintro\n\n<!-- results:start -->\n")
    assert once.endswith("<!-- results:end -->\n\nmore\n")
    update_readme(readme, section)
    assert readme.read_text() == once  # idempotent
    readme.write_text("no markers here\n")
    with pytest.raises(UsageError, match="results:start"):
        update_readme(readme, section)


def test_not_a_run_directory_is_a_usage_error(tmp_path: Path):
    with pytest.raises(UsageError, match="not a learnbench run"):
        build_report([tmp_path])
    with pytest.raises(UsageError):
        readme_section([tmp_path / "missing"])


def test_empty_run_gives_a_report(tmp_path: Path):
    Store(_mk(tmp_path / "empty")).close()
    written = build_report([tmp_path / "empty"])
    assert "0 trials" in written["report.md"].read_text()


# --- the HTML page ---------------------------------------------------------------------------------------------
class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_self_contained_escaped_and_has_every_figure(realistic):
    _, written, _ = realistic
    page = written["report.html"].read_text()
    parser = _Collector()
    parser.feed(page)
    parser.close()
    figures = {k: p for k, p in written.items() if k.startswith("figures/")}
    names = {"curves", "pareto", "robustness", "align", "grad"}
    assert all(any(n in k for k in figures) for n in names) and "figures/performance-profiles.svg" in figures
    images = [a for tag, a in parser.tags if tag == "img"]
    assert len(images) == len(figures)
    embedded = {base64.b64decode(a["src"].split(",", 1)[1]) for a in images}
    assert embedded == {p.read_bytes() for p in figures.values()}  # every figure file, byte for byte
    assert all(a["src"].startswith("data:image/svg+xml;base64,") for a in images)
    assert not [t for t, _ in parser.tags if t in ("link", "iframe", "object", "embed")]
    refs = [v for _, a in parser.tags for k, v in a.items() if k in ("src", "href") and v]
    assert all(v.startswith(("data:", "#")) for v in refs)  # inline scripts only: plotly.js is in the page
    outside = _without_scripts(page)  # plotly.js names map-tile URLs that plots of this kind never load
    assert "url(" not in outside and "@import" not in outside and "http://" not in outside
    assert "https://" not in outside
    assert ("<script" in page.lower()) == interactive.available()
    assert "population &lt;script&gt;alert(1)&lt;/script&gt; collapsed" in page
    assert "population <script>alert(1)</script> collapsed" in "".join(parser.text)  # shown as text


def _without_scripts(page: str) -> str:
    return re.sub(r"<script\b.*?</script>", "", page, flags=re.S | re.I)


@pytest.mark.parametrize("live", [False, True], ids=["static", "interactive"])
def test_html_escapes_config_text(tmp_path: Path, monkeypatch, live: bool):
    if live and not interactive.available():
        pytest.skip("plotly is not installed (pip install 'learnbench[interactive]')")
    monkeypatch.setattr(interactive, "available", lambda: live)
    store = Store(_mk(tmp_path / "run"))
    trial = trial_config("x<i>y</i>$", "a", 0, hparams={"note": "<script>alert(2)</script>"},
                         plugin={"distribution": "<b>plug</b>", "version": "1"})
    write_trial(store, trial, metrics={"test/accuracy": 0.5},
                curves={"test/accuracy": [(1.0, 10, 1e3, 0.2), (2.0, 20, 2e3, 0.5)]})
    store.close()
    page = build_report([tmp_path / "run"])["report.html"].read_text()
    assert "x&lt;i&gt;y&lt;/i&gt;$" in page and "&lt;b&gt;plug&lt;/b&gt; 1" in page
    outside = _without_scripts(page)
    assert "<script" not in outside.lower() and "<i>" not in outside and "<b>" not in outside
    assert ("<script" in page.lower()) == live
    hits = [m.start() for m in re.finditer(r"alert\(2\)", page)]  # the plots' hover text escapes it too
    assert hits and all(page[i - len("&lt;script&gt;"):i] == "&lt;script&gt;" for i in hits)


def test_realistic_report_is_fast_and_complete(realistic):
    _, written, seconds = realistic
    assert seconds < 20, f"report took {seconds:.1f} s"
    md = written["report.md"].read_text()
    for section in ("Final accuracy", "Learning curves", "Accuracy at equal cost", "Time to target",
                    "Cost versus accuracy",
                    "Pairwise significance", "Robustness", "Alignment angles", "Diagnostics",
                    "Performance profiles", "Provenance", "Algorithms compared"):
        assert f"# {section}" in md, section
    header = next(line for line in md.splitlines() if line.startswith("| algorithm") and "masking" in line)
    assert "pgd-linf ε=0.1 | pgd-linf-pseudo ε=0.1" in re.sub(r"\s+", " ", header)
    assert "⚠ zero-grad" in md and "0123456789abcdef0123" in md and "deap" in md


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium (/usr/bin/chromium, Debian's `chromium` "
                    "package) is not installed: `apt-get install -y chromium` to run the browser test")
@pytest.mark.slow
def test_chromium_renders_the_report(realistic, tmp_path: Path):
    """Non-blank, no request leaves the file, no console error; with plotly, every interactive figure drew."""
    _, written, _ = realistic
    page = written["report.html"]
    plots = "document.querySelectorAll('.js-plotly-plot').length"
    traces = "document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length"
    seen = visit(page, (plots, traces), profile=tmp_path / "profile")
    assert not seen.errors, seen.errors
    assert seen.requests and all(u == page.resolve().as_uri() or u.startswith("data:") for u in seen.requests), \
        [u[:80] for u in seen.requests]
    if interactive.available():
        n = page.read_text().count('<figure class="interactive">')
        assert n >= 5 and seen.values[plots] == n and seen.values[traces] > 10 * n, seen.values
    else:
        assert seen.values[plots] == 0
    png = tmp_path / "report.png"
    png.write_bytes(seen.png)
    from matplotlib.image import imread

    pixels = imread(png)[..., :3]  # [H, W, 3] floats in [0, 1]
    assert pixels.shape[:2] == (2000, 1200)
    ink = (pixels.mean(axis=2) < 0.9).mean()
    colours = len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert ink > 0.02 and colours > 50, (ink, colours)  # text, tables and a coloured figure, not a blank page


def test_readme_robustness_table_puts_pseudo_beside_true_gradient(realistic):
    run, _, _ = realistic
    section = readme_section([run])
    header = next(line for line in section.splitlines() if "pgd-linf-pseudo ε=0.1" in line)
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells.index("pgd-linf-pseudo ε=0.1") == cells.index("pgd-linf ε=0.1") + 1
    row = next(line for line in section.splitlines()[section.splitlines().index(header):]
               if line.split("|")[4].strip() == "fa")
    dataset = row.split("|")[1].strip()
    fa = [t.metrics["robust/pgd-linf/0.1"] for t in Store.open(run).trials()
          if t.label == "fa" and t.status == "done" and t.dataset == dataset]
    assert fa and float(row.split("|")[5]) == pytest.approx(100 * sum(fa) / len(fa), abs=0.006)


def test_hybrid_alignment_figure_draws_each_part_and_every_update(tmp_path: Path):
    """guided-es's parts (surrogate, es-estimate) and every algorithm's update, one panel per algorithm with parts;
    the figure's data are the stored curves (an SVG path per line, the legend naming each)."""
    store = Store(_mk(tmp_path / "run"))
    curves = {"guided-es": {"cos/update-grad": 0.3, "cos/part-grad/surrogate": 0.2, "cos/part-grad/es-estimate": 0.4},
              "fa": {"cos/update-grad": 0.25}}
    for label, metrics in curves.items():
        for seed in range(2):
            trial = trial_config(label, label, seed, suite="hybrids")
            rows = {name: [(float(i), 100.0 * i, 1e6 * i, value + 0.01 * i) for i in range(1, 6)]
                    for name, value in metrics.items()}
            rows["test/accuracy"] = [(float(i), 100.0 * i, 1e6 * i, 0.5) for i in range(1, 6)]
            write_trial(store, trial, metrics={"test/accuracy": 0.5, **{m: v for m, v in metrics.items()}},
                        curves=rows)
    store.close()
    written = build_report([tmp_path / "run"])
    md = written["report.md"].read_text()
    assert "Hybrid alignment" in md
    [figure] = [path for name, path in written.items() if "hybrid-alignment" in str(name)] or \
        list((tmp_path / "run").rglob("*hybrid-alignment*"))
    svg = Path(figure).read_text()
    for entry in ("guided-es: surrogate", "guided-es: es-estimate", "guided-es: update", "fa: update"):
        assert entry in svg, entry
    assert "fa: surrogate" not in svg  # fa's update has no parts: no panel of its own


def test_algorithms_table_shows_the_knobs_of_the_entrys_own_optimizer_only():
    """Backprop's `hparams_in_effect`: L-BFGS's and K-FAC's knobs appear only on the entries that use them (the
    store keeps every hyper-parameter)."""
    from helpers import make_trials

    from learnbench.reports.build import configurations
    from learnbench.trial import StoredTrial

    configs = make_trials({"algorithms": [
        {"id": "backprop", "label": "adam", "schedule": "cosine"},
        {"id": "backprop", "label": "kfac", "optimizer": "kfac", "weight_decay": 1e-4},
        {"id": "fa", "label": "fa-lbfgs", "optimizer": "lbfgs"}]})
    trials = [StoredTrial.from_config(t.config()) for t in configs]
    assert all("damping" in t.hparams and "history_size" in t.hparams for t in trials)  # stored in full
    rows = {row[0]: row[2] for row in configurations(trials).rows}
    assert "optimizer=adam" in rows["adam"] and "betas=" in rows["adam"]
    assert not {"history_size", "damping", "momentum", "step_every"} & set(_keys(rows["adam"]))
    assert "damping=0.001" in rows["kfac"] and "fisher=mc" in rows["kfac"] and "weight_decay=0.0001" in rows["kfac"]
    assert not {"history_size", "betas"} & set(_keys(rows["kfac"]))
    assert "history_size=100" in rows["fa-lbfgs"] and not {"kl_clip", "weight_decay"} & set(_keys(rows["fa-lbfgs"]))


def _keys(settings: str) -> list[str]:
    return [part.split("=")[0] for part in settings.split(", ")]


def test_a_failing_hparams_in_effect_leaves_the_stored_hyper_parameters():
    from learnbench.reports.build import _in_effect

    class Raises:
        @classmethod
        def hparams_in_effect(cls, hparams):
            raise RuntimeError("plugin bug")

    class Narrows:
        @classmethod
        def hparams_in_effect(cls, hparams):
            return {"lr": hparams["lr"]}

    stored = {"lr": 0.1, "unused": 3}
    assert _in_effect(Raises, stored) == stored and _in_effect(None, stored) == stored
    assert _in_effect(Narrows, stored) == {"lr": 0.1}
