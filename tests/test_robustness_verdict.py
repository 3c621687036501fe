"""The robustness verdict (reports/verdict.py): its numbers against scipy.stats on known per-seed robust accuracies,
its sentences where the numbers put them, and when it is left out."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from learnbench.reports import build_report, show_table
from learnbench.reports.robustness import attack_grid
from learnbench.store import Store
from report_fixtures import holm_by_hand, md_headers, md_rows, realistic_store, robustness_store

EPS = (0.1, 0.3)
SEEDS = 3
# Per label and seed: clean accuracy, worst-case robust accuracy at each eps; the differences to backprop are built
# so that fa@0.1 is clearly more robust, dfa@0.1 clearly less, fa@0.3 more by the CI (raw p ~ 0.035) but not after
# Holm over the four comparisons (x2 -> ~0.07), dfa@0.3 shows no detectable difference.
CLEAN = {"backprop": [0.98, 0.97, 0.985], "fa": [0.96, 0.955, 0.97], "dfa": [0.95, 0.94, 0.96]}
WORST = {"backprop": {0.1: [0.40, 0.42, 0.41], 0.3: [0.01, 0.02, 0.015]}}
WORST["fa"] = {0.1: list(np.add(WORST["backprop"][0.1], [0.30, 0.31, 0.32])),
               0.3: list(np.add(WORST["backprop"][0.3], [0.02, 0.03, 0.04]))}
WORST["dfa"] = {0.1: list(np.add(WORST["backprop"][0.1], [-0.20, -0.21, -0.19])),
                0.3: list(np.add(WORST["backprop"][0.3], [0.01, -0.01, 0.005]))}
PSEUDO = {"fa": {0.1: [0.97, 0.95, 0.96], 0.3: [0.90, 0.91, 0.92]},  # far above fa's worst case: a sentence
          "dfa": {0.1: [0.23, 0.22, 0.24], 0.3: [0.03, 0.02, 0.03]}}  # within 5 points of dfa's: none
SQUARE = {k: {e: [min(1.0, v + 0.1) for v in w[e]] for e in EPS} for k, w in WORST.items()}
TRANSFER = {k: {e: [min(1.0, v + 0.2) for v in w[e]] for e in EPS} for k, w in WORST.items() if k != "backprop"}
EXPECTED = {("fa", 0.1): "more", ("dfa", 0.1): "less", ("fa", 0.3): "more, not after Holm", ("dfa", 0.3): "none"}


def seed_metrics(label: str, seed: int) -> dict[str, float]:
    m = {"robust/clean": CLEAN[label][seed], "robust/auc/worst-case/linf": 0.5}
    for eps in EPS:
        key = f"{eps:g}"
        m[f"robust/worst-case/linf/{key}"] = WORST[label][eps][seed]
        m[f"robust/square/{key}"] = SQUARE[label][eps][seed]
        for attack in ("apgd-ce", "apgd-t", "fab-t", "square"):  # 4-part names the robustness section must skip
            m[f"robust/ensemble/{attack}/{key}"] = WORST[label][eps][seed]
            m[f"robust/first-break/{attack}/{key}"] = 0.1
        if label in PSEUDO:
            m[f"robust/pgd-linf-pseudo/{key}"] = PSEUDO[label][eps][seed]
        if label in TRANSFER:
            m[f"robust/transfer/{key}"] = TRANSFER[label][eps][seed]
    return m


@pytest.fixture(scope="module")
def verdict_md(tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("verdict") / "run"
    robustness_store(run, {label: (label, [seed_metrics(label, s) for s in range(SEEDS)]) for label in CLEAN})
    return build_report([run])["report.md"].read_text()


def half(values) -> float:
    """The Student-t 95% half-width, from scipy: t_{0.975, n-1} * s / sqrt(n)."""
    v = np.asarray(values, dtype=float)
    return sps.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)


def cell(values) -> str:
    return f"{100 * np.mean(values):.2f} ± {100 * half(values):.2f}"


def expected_tests() -> dict[tuple[str, float], tuple[np.ndarray, float, float]]:
    """(label, eps) -> (paired differences, raw paired-t p, Holm p over the four), independently of reports.stats."""
    diffs = {(k, e): np.subtract(WORST[k][e], WORST["backprop"][e]) for k in ("fa", "dfa") for e in EPS}
    raw = {key: sps.ttest_rel(WORST[key[0]][key[1]], WORST["backprop"][key[1]]).pvalue for key in diffs}
    holm = holm_by_hand(raw)
    return {key: (diffs[key], raw[key], holm[key]) for key in diffs}


def verdict_items(md: str) -> list[str]:
    section = md[md.index("### Robustness verdict"):]
    return [re.sub(r"\\(.)", r"\1", line[2:]) for line in section.splitlines() if line.startswith("- ")]


def test_tables_match_scipy(verdict_md: str):
    assert "### Robustness verdict: is each learning rule more robust than backprop?" in verdict_md
    tests = expected_tests()
    for eps in EPS:
        after = f"#### Verdict at ε = {eps:g}"
        headers = md_headers(verdict_md, after)
        assert headers == ["rule", "seeds", "clean", "worst case", "pseudo-gradient", "Square alone", "transfer",
                           "Δ worst case vs backprop (pp)", "95% CI (pp)", "p (Holm)"]
        rows = {r[0]: dict(zip(headers, r)) for r in md_rows(verdict_md, after)}
        assert list(rows) == ["backprop", "fa", "dfa"]  # the reference first
        for label, row in rows.items():
            assert row["seeds"] == "3"
            assert row["clean"] == cell(CLEAN[label])
            assert row["worst case"] == cell(WORST[label][eps])
            assert row["Square alone"] == cell(SQUARE[label][eps])
            assert row["pseudo-gradient"] == (cell(PSEUDO[label][eps]) if label in PSEUDO else "–")
            assert row["transfer"] == (cell(TRANSFER[label][eps]) if label in TRANSFER else "–")
        assert rows["backprop"]["Δ worst case vs backprop (pp)"] == "reference"
        for label in ("fa", "dfa"):
            d, _, holm = tests[label, eps]
            lo, hi = d.mean() - half(d), d.mean() + half(d)
            row = rows[label]
            assert row["Δ worst case vs backprop (pp)"] == f"{100 * d.mean():+.2f}"
            assert row["95% CI (pp)"] == f"[{100 * lo:.2f}, {100 * hi:.2f}]"
            assert row["p (Holm)"] == ("<0.001" if holm < 0.001 else f"{holm:.3f}")


def test_sentences_say_what_the_numbers_support(verdict_md: str):
    items = verdict_items(verdict_md)
    tests = expected_tests()
    for (label, eps), (d, raw, holm) in tests.items():
        lo, hi = d.mean() - half(d), d.mean() + half(d)
        # the category the numbers give, worked out here, must be the one the data were built for
        if lo > 0 or hi < 0:
            side = "more" if lo > 0 else "less"
            kind = side if holm < 0.05 else f"{side}, not after Holm"
        else:
            kind = "none"
        assert kind == EXPECTED[label, eps], (label, eps, raw, holm)
        about = [s for s in items if re.search(rf"(^| ){label} ", s) and f"ε = {eps:g}" in s
                 and "pseudo-gradient" not in s]
        assert len(about) == 1, about
        text = about[0]
        ci = f"[{100 * lo:.2f}, {100 * hi:.2f}]"
        points = f"{100 * d.mean():+.2f} points of worst-case robust accuracy"
        assert ci in text and points in text
        if kind in ("more", "less"):
            assert text.startswith(f"{label} is {kind} robust than backprop at ε = {eps:g}:")
            assert "not after" not in text
        elif kind.endswith("not after Holm"):
            assert text.startswith(f"{label} is {kind.split(',')[0]} robust than backprop at ε = {eps:g} by the "
                                   "95% CI")
            assert f"but not after Holm's correction over the 4 comparisons (Holm p = {holm:.3f})" in text
        else:
            assert text.startswith(f"No difference detectable between {label} and backprop at ε = {eps:g} with "
                                   "3 seeds")
            assert "more robust" not in text and "less robust" not in text
    assert sum("more robust" in s for s in items) == 2 and sum("less robust" in s for s in items) == 1


def test_pseudo_gradient_sentence_only_where_it_beats_the_worst_case(verdict_md: str):
    items = [s for s in verdict_items(verdict_md) if "own pseudo-gradient" in s]
    assert len(items) == 1 and items[0].startswith("fa looks robust under its own pseudo-gradient")
    for eps in EPS:
        p, w = np.mean(PSEUDO["fa"][eps]), np.mean(WORST["fa"][eps])
        assert f"ε = {eps:g} ({100 * p:.2f}% against {100 * w:.2f}%, +{100 * (p - w):.2f} points)" in items[0]
    assert "attack's choice of gradient" in items[0] and "Akrout et al. 2019" in items[0]


def test_four_part_names_are_no_bogus_attacks(verdict_md: str, tmp_path: Path):
    header = md_headers(verdict_md, "### Robustness\n")
    assert header == ["algorithm", "clean", "worst-case/linf ε=0.1", "square ε=0.1", "pgd-linf-pseudo ε=0.1",
                      "transfer ε=0.1", "masking flags"]
    row = {r[0]: r for r in md_rows(verdict_md, "### Robustness\n")}["fa"]
    assert row[2] == cell(WORST["fa"][0.1])
    robust_part = verdict_md[verdict_md.index("### Robustness\n"):verdict_md.index("### Robustness verdict")]
    assert "ensemble" not in robust_part and "first-break" not in robust_part
    run = tmp_path / "run"
    robustness_store(run, {"backprop": ("backprop", [seed_metrics("backprop", 0)])})
    trials = Store.open(run).trials()
    assert list(attack_grid(trials)) == ["worst-case/linf", "square"]
    assert "square ε=0.1 %" in show_table(trials)


@pytest.mark.slow
def test_absent_without_worst_case_metrics(tmp_path: Path):
    realistic_store(tmp_path / "realistic").close()  # pgd-linf, fgsm, pseudo-gradient: no worst case
    md = build_report([tmp_path / "realistic"])["report.md"].read_text()
    assert "### Robustness\n" in md and "Robustness verdict" not in md and "worst-case" not in md


def test_one_seed_gives_no_ci_and_says_so(tmp_path: Path):
    robustness_store(tmp_path / "run", {label: (label, [seed_metrics(label, 0)]) for label in ("backprop", "fa")})
    md = build_report([tmp_path / "run"])["report.md"].read_text()
    headers = md_headers(md, "#### Verdict at ε = 0.1")
    rows = {r[0]: dict(zip(headers, r)) for r in md_rows(md, "#### Verdict at ε = 0.1")}
    assert not any("±" in c for r in md_rows(md, "#### Verdict at ε = 0.1") for c in r)
    assert "here none: with one seed there is no interval and no test" in md
    assert rows["fa"]["worst case"] == f"{100 * WORST['fa'][0.1][0]:.2f} (1 seed, no CI)"
    assert rows["fa"]["95% CI (pp)"] == "no CI (1 seed)" and rows["fa"]["p (Holm)"] == "–"
    d = WORST["fa"][0.1][0] - WORST["backprop"][0.1][0]
    assert rows["fa"]["Δ worst case vs backprop (pp)"] == f"{100 * d:+.2f}"
    items = verdict_items(md)
    assert f"fa vs backprop at ε = 0.1: only 1 seed finished by both, so no confidence interval and no verdict " \
           f"({100 * d:+.2f} points of worst-case robust accuracy on that seed)." in items
    assert not any("95% CI [" in s or "more robust" in s or "less robust" in s for s in items)


def test_identical_worst_cases_on_every_seed_read_as_no_difference():
    import numpy as np

    from learnbench.reports import stats
    from learnbench.reports.verdict import Comparison, sentence

    zeros = np.zeros(3)
    test = stats.paired_test("fa", "backprop", zeros, zeros)
    text = sentence(Comparison("fa", 0.3, 3, 0.0, test), "backprop", 4)
    assert text == "No difference between fa and backprop at ε = 0.3: the same worst-case robust accuracy on each of " \
                   "the 3 seeds."
    moved = stats.paired_test("fa", "backprop", np.array([0.1, 0.2, 0.3]), np.array([0.1, 0.25, 0.3]))
    assert sentence(Comparison("fa", 0.3, 3, moved.diff.mean, moved), "backprop", 4).startswith(
        "No difference detectable")
