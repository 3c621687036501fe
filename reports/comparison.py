"""The sections that compare algorithms against each other: paired significance tests within one group, and the
performance profiles across groups. Only ranked labels take part (groups.py says which and why).

Pairwise tests pair seeds: seed s of one algorithm against seed s of the other (same data split, same initial
draw where the models agree), which removes the between-seed variance both share; a seed that one of them did not
finish is left out of that pair; a tuned label (`learnbench tune`) has one trial per study on each seed, and its
value for the seed is their mean. Profiles (Dolan & Moré 2002, as in AlgoPerf) run over (group, target) problems;
an algorithm's profile counts only the problems it attempted, and a problem nobody solved stays in every
attempting algorithm's denominator (it is listed by name, never dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from learnbench.trial import StoredTrial

from . import stats
from .data import AXES, AXIS_TITLES, done
from .document import Block, Cell, Figure, Heading, Strong, Table, Text, pval
from .figures import Line, Panel, lines_figure
from .groups import TEST, Group, targets
from .sections import Context, target_reaches


# --- paired tests within a group --------------------------------------------------------------------------------
def seed_values(trials: Sequence[StoredTrial], metric: str = TEST) -> dict[int, float]:
    """seed -> the final metric of the done trials that have a finite value; the mean where a label has several
    trials of one seed (a tuned label: one per tuning study)."""
    values: dict[int, list[float]] = {}
    for t in done(trials):
        v = t.metrics.get(metric)
        if v is not None and math.isfinite(v):
            values.setdefault(t.seed, []).append(float(v))
    return {seed: sum(vs) / len(vs) for seed, vs in values.items()}


def significance_section(group: Group) -> list[Block]:
    if not group.ranked:
        return []  # the group's note says why nothing here is compared
    head: list[Block] = [Heading(3, "Pairwise significance")]
    samples = {k: seed_values(group.labels[k]) for k in group.ranked}
    tests, untested = stats.paired_tests(samples)
    out = head + ([_paired_table(tests)] if tests else [
        Text("No two ranked algorithms share two finished seeds: no test.", note=True)])
    if untested:
        out.append(Text("Not tested (fewer than two seeds finished by both): "
                        + ", ".join(f"{a} vs {b}" for a, b in untested) + ".", note=True))
    return out


def _paired_table(tests: list[stats.Paired]) -> Table:
    rows: list[list[Cell]] = []
    for t in tests:
        holm: Cell = Strong(pval(t.p_holm)) if t.p_holm < stats.ALPHA else pval(t.p_holm)
        rows.append([t.a, t.b, str(t.n), _pp(t.diff.mean), f"[{_pp(t.diff.lo)}, {_pp(t.diff.hi)}]", pval(t.p_t),
                     "–" if math.isnan(t.p_wilcoxon) else pval(t.p_wilcoxon), holm, _seeds(t.seeds_needed)])
    headers = ["A", "B", "pairs", "A − B (pp)", "95% CI (pp)", "p (paired t)", "p (Wilcoxon)", "p (Holm)",
               "seeds for 80% power"]
    return Table(headers, rows, align_left=2, caption=(
        "Final test accuracy compared on the seeds both algorithms finished (pairs; a seed either lacks is left "
        "out): mean difference A − B in percentage points with the Student-t 95% CI of the paired differences; "
        f"two-sided paired t-test; Wilcoxon signed-rank test from {stats.WILCOXON_MIN} pairs on ('–' below); the "
        f"t-test p Holm-corrected over the {len(tests)} pair(s) of this group, bold below {stats.ALPHA:g}. For a "
        "pair that is not significant after correction, the seeds a two-sided paired t-test would need for 80% "
        f"power at α = {stats.ALPHA:g}/{max(len(tests), 1)} (the Bonferroni level, which stays significant after "
        "Holm's correction over this group's pairs) if the observed mean and standard deviation of the "
        "differences were the truth (noncentral t); ∞: no observed difference (or more than 10^7 seeds)."))


def _pp(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{100 * x:+.2f}"


def _seeds(n: float) -> str:
    if math.isnan(n):
        return "–"
    return "∞" if math.isinf(n) else str(int(n))


# --- performance profiles across groups ------------------------------------------------------------------------
@dataclass
class Problems:
    """The (group, target) problems of the ranked groups: per axis, label -> [P] costs (inf: attempted, not
    solved; NaN: not run), and per label the groups it was not ranked on."""

    names: list[str] = field(default_factory=list)  # [P]
    costs: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    absent: dict[str, list[str]] = field(default_factory=dict)

    def attempted(self, label: str) -> int:
        return int(np.sum(~np.isnan(self.costs[AXES[0]][label])))

    def solved(self, label: str) -> int:
        return int(np.sum(np.isfinite(self.costs[AXES[0]][label])))

    def unsolved(self) -> list[str]:
        mat = np.array([v for v in self.costs[AXES[0]].values()], dtype=float).reshape(-1, len(self.names))
        return [n for n, col in zip(self.names, mat.T) if not np.any(np.isfinite(col))]


def profile_problems(groups: list[Group], labels: list[str]) -> Problems:
    out = Problems(costs={a: {k: [] for k in labels} for a in AXES}, absent={k: [] for k in labels})
    for g in groups:
        if not g.ranked:
            continue
        for k in labels:
            if k not in g.ranked:
                out.absent[k].append(g.name + (" (unranked)" if k in g.labels else ""))
        for fraction, target in targets(g).levels:
            out.names.append(f"{g.name} @ {100 * fraction:g}%")
            reaches = target_reaches(g.ranked_labels(), target)
            for a in AXES:
                for k in labels:
                    out.costs[a][k].append(reaches[k].profile_costs[a] if k in reaches else math.nan)
    return out


def profiles_section(ctx: Context, groups: list[Group]) -> list[Block]:
    """Dolan-Moré performance profiles over every (ranked group, validation target) problem."""
    head: list[Block] = [Heading(2, "Performance profiles")]
    problems = profile_problems(groups, ctx.data.labels())
    active = [k for k in ctx.data.labels() if problems.names and problems.attempted(k)]
    if not problems.names:
        return head + [Text("No ranked group has a validation-accuracy target: no profile.", note=True)]
    if len(active) < 2:
        return head + [Text("Performance profiles compare algorithms: fewer than two attempted a ranked "
                            "problem.", note=True)]
    panels = []
    for a in AXES:
        ratios = stats.performance_ratios({k: np.array(problems.costs[a][k]) for k in active})
        taus = stats.tau_grid(ratios)
        lines = [Line(k, taus, stats.profile(r, taus), step=True) for k, r in ratios.items()]
        panels.append(Panel(f"time-to-target in {AXIS_TITLES[a]}", f"ratio τ to the best ({AXIS_TITLES[a]})",
                            "fraction of problems ρ(τ)", lines, logx=True, ylim=(-0.02, 1.02)))
    path = lines_figure(panels, ctx.colours, ctx.figure_path("performance-profiles"))
    ctx.figures.append(path)
    unsolved = problems.unsolved()
    return head + [Figure(path, (
        "Dolan & Moré performance profiles as in AlgoPerf. A problem is a ranked group (dataset, model, budget) "
        "and a validation target (a fraction of the reference's final validation accuracy); an algorithm's cost is "
        "its median time-to-target on the validation curve over seeds, seeds that missed the target counting as "
        "infinite (finite only when a majority reached it). ρ(τ) is the fraction of the problems the algorithm "
        "attempted that it solved within τ times the best cost among those that attempted it; problems it did "
        f"not run are not counted. Problems ({len(problems.names)}): " + ", ".join(problems.names) + "."),
        alt="performance profiles"),
        Text(f"Solved by no algorithm ({len(unsolved)}, kept in every attempting algorithm's denominator): "
             + (", ".join(unsolved) if unsolved else "none") + "."),
        _attempted_table(problems, ctx.data.labels())]


def _attempted_table(problems: Problems, labels: list[str]) -> Table:
    rows: list[list[Cell]] = [[k, str(problems.attempted(k)), str(problems.solved(k)),
                               "; ".join(problems.absent[k]) or "–"] for k in labels]
    return Table(["algorithm", "problems attempted", "solved", "not run (or unranked) on"], rows,
                 text_columns=(3,), caption=(
                     f"Of the {len(problems.names)} problems: how many each algorithm attempted (ranked trials in "
                     "the group) and solved (median time-to-target finite); the groups it has no ranked trials in "
                     "are listed, and its profile leaves their problems out."))
