"""Fair comparison in the report: groups by problem and budget, unranked trials, accuracy at equal cost, targets
and time-to-target on the validation curve, profiles over attempted problems, and paired tests. Expected values
are worked out by hand from the hand-written curves of `report_fixtures.FAIR_ENTRIES`, or computed with scipy."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from learnbench.reports import build_report, readme_section, show_table, stats
from learnbench.reports.comparison import profile_problems
from learnbench.reports.data import Curve, load_runs
from learnbench.reports.equal_cost import cost_table
from learnbench.reports.groups import all_groups, group_trials, targets
from learnbench.store import Store
from learnbench.trial import Budget
from report_fixtures import fairness_store, holm_by_hand, md_row, md_rows, report_trial, trial_config, write_trial

HEAD = "toy / cnn / time_s = 300"  # the head-to-head group: bp, es, ga ranked; bp-own shown unranked


@pytest.fixture(scope="module")
def fair(tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("fair") / "run"
    fairness_store(run)
    return run, build_report([run])["report.md"].read_text()


@pytest.fixture(scope="module")
def fair_groups(fair) -> dict[str, object]:
    return {g.name: g for g in all_groups(load_runs([fair[0]]).trials)}


def section(markdown: str, start: str, end: str) -> str:
    """The Markdown from the line `start` up to the next line `end`."""
    lines = markdown.splitlines()
    i = lines.index(start)
    j = lines.index(end, i + 1)
    return "\n".join(lines[i:j])


def _ci_cell(values: list[float]) -> str:
    """mean ± t half-width in percent, as the table shows it; the mean alone for one seed."""
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    lo, hi = sps.t.interval(0.95, df=len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
    return f"{100 * np.mean(values):.2f} ± {100 * (hi - np.mean(values)):.2f}"


# --- groups ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_groups_split_problems_by_budget_and_rank_only_one_currency(fair_groups):
    assert list(fair_groups) == ["toy2 / cnn / epochs = 5", HEAD, "toy / cnn / time_s = 900",
                                 "toy / mlp / steps = 100"]
    assert fair_groups[HEAD].ranked == ["bp", "es", "ga"] and list(fair_groups[HEAD].labels)[-1] == "bp-own"
    assert fair_groups["toy / cnn / time_s = 900"].ranked == []  # its only label is unranked
    assert fair_groups["toy / mlp / steps = 100"].ranked == []  # a step is not a cost currency
    assert [Budget(**b).currency() for b in ({"epochs": 5.0}, {"time_s": 1.0}, {"flops": 1e12}, {"steps": 10.0},
                                  {"epochs": 5.0, "time_s": 60.0}, {})] == ["epochs", "time_s", "flops", None,
                                                                            None, None]


def test_budgets_written_as_int_or_float_are_one_group(tmp_path: Path):
    store = Store(tmp_path)
    for seed, budget in enumerate(({"time_s": 300}, {"time_s": 300.0, "epochs": None})):
        write_trial(store, trial_config("a", "a", seed, budget=budget), metrics={"test/accuracy": 0.5})
    store.close()
    assert [len(gs) for gs in group_trials(load_runs([tmp_path]).trials).values()] == [1]


# --- accuracy at equal cost --------------------------------------------------------------------------------------
# Per level, each seed's validation accuracy at its last evaluation costing no more (hand-read from FAIR_ENTRIES);
# None: some done seed stopped short of the level.
EQUAL_COST = {  # the decades, and the largest cost every run reached (the shortest run's end: 2.6e11, 290 s, 120k)
    "flops": (["1e10", "1e11", "2.6e11", "1e12"], {
        "bp": [[0.50, 0.55], [0.80, 0.78], [0.80, 0.88], None],
        "es": [[0.10, 0.11], [0.10, 0.11], [0.10, 0.11], [0.40, 0.45]],
        "ga": [[0.10], [0.10], [0.10], [0.30]],
        "bp-own": [[0.90, 0.91], [0.90, 0.91], [0.90, 0.91], None]}, ["bp", "bp", "bp", "es"]),
    "seconds": (["10 s", "100 s", "290 s"], {
        "bp": [[0.50, 0.12], [0.80, 0.55], [0.80, 0.88]], "es": [[0.10, 0.11], [0.40, 0.45], [0.60, 0.62]],
        "ga": [[0.10], [0.30], [0.30]], "bp-own": [[0.90, 0.91], [0.90, 0.91], [0.90, 0.91]]}, ["bp", "bp", "bp"]),
    "examples": (["10k", "100k", "120k"], {
        "bp": [[0.50, 0.55], [0.80, 0.78], [0.80, 0.78]], "es": [[0.10, 0.11], [0.60, 0.62], [0.70, 0.72]],
        "ga": [[0.10], [0.30], [0.30]], "bp-own": [[0.90, 0.91], [0.90, 0.91], [0.90, 0.91]]}, ["bp", "bp", "bp"]),
}


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table in text: (headers, body rows), cells stripped, bold markers kept."""
    out, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            out.append((block[0], block[2:]))
            block = []
    return out


def test_accuracy_at_equal_cost_matches_hand_values(fair):
    _, md = fair
    found = tables(section(md, "#### Accuracy at equal cost", "#### Time to target"))
    assert len(found) == 3  # nominal FLOPs, training seconds, examples seen
    for (headers, rows), (axis, (levels, cells, best)) in zip(found, EQUAL_COST.items()):
        assert headers == ["algorithm", *levels], axis
        assert [r[0] for r in rows] == list(cells), axis
        for row in rows:
            expected = [_ci_cell(v) if v else "–" for v in cells[row[0]]]
            assert [c.strip("*") for c in row[1:]] == expected, (axis, row[0])
            marked = [levels[i] for i, c in enumerate(row[1:]) if c.startswith("**")]
            assert marked == [lv for lv, b in zip(levels, best) if b == row[0]], (axis, row[0])


def test_equal_cost_levels_and_dropped_columns():
    def trial(points, seed):
        arr = np.array(points, dtype=float)  # [K, 4]: seconds, examples, flops, value
        curve = Curve(np.arange(len(arr)), arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])
        return report_trial(trial_config("X", "x", seed), "done", {"val/accuracy": curve})

    # X's seeds stop at 5e3 and 2e4 examples: 1e4 is reached by one seed only, and by no other label -> no column
    labels = {"X": [trial([(0, 0, 0, 0.1), (1, 1e3, 0, 0.5), (2, 5e3, 0, 0.6)], 0),
                    trial([(0, 0, 0, 0.1), (1, 2e3, 0, 0.4), (2, 2e4, 0, 0.7)], 1)],
              "Y": [trial([(0, 0, 0, 0.1), (1, 500, 0, 0.35), (3, 3e3, 0, 0.8)], 0)]}
    table = cost_table(labels, "examples")
    # the decades from that of the first evaluation past 0 (500 -> 1e3); 1e4: no column; 3e3: where Y's run ended,
    # the largest cost every run reached
    assert table.levels == [1e3, 3e3]
    # at 1e3 examples: X's seed 0 has its 1e3 model (0.5), seed 1 still its initial one (0.1); Y its 500 model
    assert table.cells["X"][0].mean == pytest.approx(0.3) and table.cells["Y"][0].mean == pytest.approx(0.35)
    # at 3e3: X's 1e3 and 2e3 models (0.5, 0.4), Y's 3e3 model
    assert table.cells["X"][1].mean == pytest.approx(0.45) and table.cells["Y"][1].mean == pytest.approx(0.8)


# --- targets and time to target -----------------------------------------------------------------------------------
def test_targets_come_from_the_reference_and_time_to_target_reads_validation(fair, fair_groups):
    _, md = fair
    goal = targets(fair_groups[HEAD])  # the reference is algorithm id backprop: label bp (bp-own is unranked)
    base = np.mean([0.90, 0.88])
    assert [f for f, _ in goal.levels] == [0.9, 0.95, 0.99, 1.0]
    assert [t for _, t in goal.levels] == pytest.approx([0.9 * base, 0.95 * base, 0.99 * base, base])
    head = section(md, "### time\\_s = 300", "### time\\_s = 900")
    rows = md_rows(head, "#### Time to target")
    # 80.1%: bp's seeds cross at their last evaluations (300 s / 3e5 / 3e11 and 290 s / 2.6e5 / 2.6e11): medians
    # 295 s, 280k, 280G. 88.11%: only seed 0 (0.88 < 0.8811). On the test curves (3 points lower) neither would.
    assert rows[0] == ["90% (80.10)", "bp", "2/2", "295", "280k", "280G"]
    assert rows[1] == ["", "not reached: es, ga", "0", "–", "–", "–"]
    assert rows[4] == ["99% (88.11)", "bp", "1/2", "300", "300k", "300G"]
    assert "the final validation accuracy of the reference bp (suite reference 'backprop')" in head


def test_targets_fall_back_to_the_best_ranked_label_without_a_reference(fair):
    trials = [replace(t, reference="sgd") for t in load_runs([fair[0]]).trials if t.dataset == "toy2"]
    goal = targets(all_groups(trials)[0])
    assert [t for _, t in goal.levels][-1] == pytest.approx(np.mean([0.80, 0.90]))  # bp's 85% beats ga's 80.5%
    assert "best mean final validation accuracy among ranked algorithms, bp's 85.00%" in goal.source
    assert "reference 'sgd'" in goal.source


# --- performance profiles ----------------------------------------------------------------------------------------
def test_profiles_count_only_attempted_problems_and_list_unsolved_ones(fair):
    run, md = fair
    data = load_runs([run])
    problems = profile_problems(all_groups(data.trials), data.labels())
    groups = ["toy2 / cnn / epochs = 5", HEAD]  # the step budget and the unranked group give no problems
    assert problems.names == [f"{g} @ {p}%" for g in groups for p in ("90", "95", "99", "100")]
    inf, nan = math.inf, math.nan
    # median time-to-target in seconds (unreached seeds = inf): toy2 @ 90% (76.5%): bp 10 and 12 s, ga 20 and 25 s;
    # head @ 90% and 95%: bp 300 and 290 s. es never ran toy2: NaN, not inf.
    expected = {"bp": [11, inf, inf, inf, 295, 295, inf, inf], "ga": [22.5, inf, inf, inf, inf, inf, inf, inf],
                "es": [nan] * 4 + [inf] * 4, "bp-own": [nan] * 8, "es-long": [nan] * 8}
    for label, costs in expected.items():
        np.testing.assert_array_equal(problems.costs["seconds"][label], costs)
    assert [(problems.attempted(k), problems.solved(k)) for k in expected] == [(8, 3), (8, 1), (4, 0), (0, 0),
                                                                               (0, 0)]
    unsolved = [n for n in problems.names if not n.endswith("@ 90%") and not n.startswith(HEAD + " @ 95")]
    assert problems.unsolved() == unsolved
    assert "Solved by no algorithm (5, kept in every attempting algorithm's denominator): " + ", ".join(
        unsolved).replace("_", "\\_") in md
    assert md_row(md, "es", after="## Performance profiles")[1:] == ["4", "0", "toy2 / cnn / epochs = 5"]
    assert md_row(md, "bp-own", after="## Performance profiles")[3].endswith("time_s = 300 (unranked)")


def test_profile_denominator_is_the_attempted_problems():
    # C ran only problem 2 (ratio 3 / 2 to A's best); problem 3 nobody solved and stays in A's and B's profiles
    ratios = stats.performance_ratios({"A": np.array([1.0, 2.0, np.inf]), "B": np.array([2.0, np.nan, np.inf]),
                                       "C": np.array([np.nan, 3.0, np.nan])})
    np.testing.assert_array_equal(ratios["A"], [1.0, 1.0, np.inf])
    np.testing.assert_array_equal(ratios["B"], [2.0, np.nan, np.inf])
    np.testing.assert_array_equal(ratios["C"], [np.nan, 1.5, np.nan])
    taus = np.array([1.0, 1.5, 2.0])
    np.testing.assert_allclose(stats.profile(ratios["A"], taus), [2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(stats.profile(ratios["B"], taus), [0, 0, 1 / 2])
    np.testing.assert_allclose(stats.profile(ratios["C"], taus), [0, 1, 1])


# --- paired tests --------------------------------------------------------------------------------------------------
PAIRED = {  # final test accuracy per seed; R's seed 3 failed, Q alone has a seed 7; S equals P
    "P": [0.950, 0.960, 0.955, 0.948, 0.962, 0.958, 0.951],
    "Q": [0.940, 0.957, 0.950, 0.941, 0.955, 0.956, 0.949, 0.950],
    "R": [0.952, 0.955, 0.957, None, 0.960, 0.957, 0.953],
    "S": [0.950, 0.960, 0.955, 0.948, 0.962, 0.958, 0.951],
}


@pytest.fixture(scope="module")
def paired_md(tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("paired") / "run"
    run.mkdir()
    store = Store(run)
    for label, values in PAIRED.items():
        for seed, acc in enumerate(values):
            trial = trial_config(label, label.lower(), seed, dataset="pair", model="mlp-8")
            if acc is None:
                write_trial(store, trial, "failed", error="RuntimeError: diverged")
            else:
                write_trial(store, trial, metrics={"test/accuracy": acc, "val/accuracy": acc + 0.01})
    store.close()
    return build_report([run])["report.md"].read_text()


def _seeds_needed_by_loop(effect: float, alpha: float = 0.05) -> int:
    """The fewest pairs n >= 2 whose two-sided paired t-test has 80% power at `alpha`, counted up one by one."""
    n = 2
    while True:
        crit = sps.t.ppf(1 - alpha / 2, n - 1)
        nc = effect * math.sqrt(n)
        if sps.nct.sf(crit, n - 1, nc) + sps.nct.cdf(-crit, n - 1, nc) >= 0.8:
            return n
        n += 1


def test_paired_tests_pair_seeds_and_match_scipy(paired_md: str):
    pairs = [("P", "Q"), ("P", "R"), ("P", "S"), ("Q", "R"), ("Q", "S"), ("R", "S")]
    aligned = {}
    for a, b in pairs:  # only the seeds both finished, in seed order
        seeds = [s for s in range(8) if s < len(PAIRED[a]) and s < len(PAIRED[b])
                 and PAIRED[a][s] is not None and PAIRED[b][s] is not None]
        aligned[a, b] = (np.array([PAIRED[a][s] for s in seeds]), np.array([PAIRED[b][s] for s in seeds]))
    p_t = {k: (1.0 if not np.any(x - y) else sps.ttest_rel(x, y).pvalue) for k, (x, y) in aligned.items()}
    p_w = {k: (1.0 if not np.any(x - y) else sps.wilcoxon(x, y).pvalue) for k, (x, y) in aligned.items()}
    holm = holm_by_hand(p_t)
    rows = {(r[0], r[1]): r for r in md_rows(paired_md, "### Pairwise significance")}
    assert list(rows) == pairs
    for key, (x, y) in aligned.items():
        d = x - y
        row = rows[key]
        assert row[2] == str(d.size) and d.size == (6 if "R" in key else 7)
        assert row[3] == f"{100 * d.mean():+.2f}"
        if np.any(d):
            lo, hi = sps.t.interval(0.95, df=d.size - 1, loc=d.mean(), scale=sps.sem(d))
            assert row[4] == f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"
        assert row[5:8] == [_p(p_t[key]), _p(p_w[key]), _p(holm[key])], key
        if holm[key] < 0.05:
            assert row[8] == "–"
        elif not np.any(d):
            assert row[8] == "∞"  # no observed difference: no number of seeds detects it
        else:
            # at the Bonferroni level over the group's 6 pairs: what survives Holm's correction in this table
            assert row[8] == str(_seeds_needed_by_loop(abs(d.mean()) / d.std(ddof=1), alpha=0.05 / 6)), key


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def test_seeds_for_power_matches_published_sample_sizes():
    # two-sided paired (one-sample) t-test, alpha 0.05, power 0.8: d = 0.5 needs 34, d = 1 needs 10 (G*Power)
    assert (stats.seeds_for_power(0.5), stats.seeds_for_power(1.0)) == (34, 10)
    assert stats.seeds_for_power(0.0) == math.inf
    for effect in (0.3, 0.8, 2.0):
        assert stats.seeds_for_power(effect) == _seeds_needed_by_loop(effect)


# --- unequal budgets ---------------------------------------------------------------------------------------------
def test_unequal_budgets_on_one_problem_are_not_ranked_and_the_report_says_why(fair):
    _, md = fair
    problem = section(md, "## toy / cnn", "## toy / mlp")
    assert ("This problem ran under 2 budgets (time\\_s = 300; time\\_s = 900): each has its own subsection, and "
            "trials under different budgets are not compared with each other.") in problem
    long = section(md, "### time\\_s = 900", "## toy / mlp")
    assert "Not ranked: the suite gave es-long its own budget on this problem (unranked = true)" in long
    assert "**" not in long and "Pairwise" not in long and "Time to target" not in long
    head = section(md, "### time\\_s = 300", "### time\\_s = 900")
    assert "Not ranked: the suite gave bp-own its own budget" in head
    final = {r[0]: r for r in md_rows(head, "#### Final accuracy", raw=True)}
    assert final["bp"][1] == "**89.00**" and final["bp-own"][1] == "97.50"  # shown, never marked
    assert all("bp-own" not in (r[0], r[1]) for r in md_rows(head, "#### Pairwise significance"))
    steps = section(md, "## toy / mlp", "## Performance profiles")
    assert "Not ranked: the budget counts steps (steps = 100), and a step is a minibatch for one algorithm and a " \
           "whole generation for another" in steps
    assert "**" not in steps and "Pairwise" not in steps and "Time to target" not in steps


# --- summaries ---------------------------------------------------------------------------------------------------
def test_readme_leads_with_the_head_to_head_group_and_its_equal_cost_table(fair):
    run, _ = fair
    text = readme_section([run])
    rows = md_rows(text, "| dataset")
    assert rows[0][:4] == ["toy", "cnn", "time_s = 300", "bp"]  # first, though toy2 came first in the store
    assert [r[2] for r in rows if r[3] == "es-long"] == ["time_s = 900 (unranked)"]
    assert "Validation accuracy (%) at equal nominal FLOPs on toy / cnn / time\\_s = 300" in text
    rows = {r[0]: r[1:] for r in md_rows(text, "at equal nominal FLOPs", raw=True)}
    assert rows["bp"] == ["**52.50**", "**79.00**", "**84.00**", "–"]
    assert rows["es"] == ["10.50", "10.50", "10.50", "**42.50**"] and rows["bp-own"] == ["90.50", "90.50", "90.50", "–"]
    assert "*toy / mlp / steps = 100: Not ranked: the budget counts steps" in text.replace("\\_", "_")


def test_show_table_shows_the_budget_of_every_group(fair):
    run, _ = fair
    text = show_table(Store.open(run).trials())
    lines = text.splitlines()
    assert any(line.split()[:6] == ["toy", "cnn", "time_s", "=", "300", "bp"] for line in lines)
    assert any("time_s = 900 (unranked)" in line and "es-long" in line for line in lines)
    assert any("steps = 100 (unranked)" in line and " es " in line for line in lines)
