"""The robustness verdict, per group (one problem, dataset x model, under one budget): is each learning rule more
or less robust than the suite's reference (`reference`, e.g. backprop)? Shown only when the trials recorded the
per-example worst case `robust/worst-case/linf/<eps>` (learnbench.attacks.ensemble).

Layout: one table per Linf epsilon of the worst-case grid, rules as rows (the reference first). Each row gives, over
seeds, mean ± Student-t 95% half-width of the clean accuracy on the attacked points, the worst-case robust accuracy
(every in-trial Linf attack through the true gradient or black box, per example), the pseudo-gradient attack's
(`pgd-linf-pseudo`, PGD through the trainer's own backward pass), Square alone (`square`, black box) and the
transfer attack's (`transfer`, PGD crafted on the reference model of the same seed) where a rule has them; then the
paired difference rule - reference in worst-case robust accuracy (seed s against seed s), its t interval, and the
paired t-test's p Holm-adjusted over every rule x epsilon comparison of the group (reports/stats.py). Below the
tables, one generated sentence per rule and epsilon says what those numbers support, and one per rule whose
pseudo-gradient accuracy exceeds its worst case by more than PSEUDO_GAP notes that the attack's gradient, not the
model, makes that figure.

Only ranked labels are compared (groups.py: a step budget, or an entry with its own budget, is shown, not tested).
The figures are test-set numbers: they report, they never choose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from learnbench.trial import StoredTrial

from . import stats
from .data import done, metric_names
from .document import Block, Cell, Heading, Items, Strong, Table, Text, pct, pval
from .groups import Group, reference_label

WORST = "robust/worst-case/linf/"
CLEAN = "robust/clean"
# Columns besides the worst case, where any rule of the group has them: (metric prefix, header).
OTHERS = (("robust/pgd-linf-pseudo/", "pseudo-gradient"), ("robust/square/", "Square alone"),
          ("robust/transfer/", "transfer"))
PSEUDO = OTHERS[0][0]
PSEUDO_GAP = 0.05  # pseudo-gradient accuracy this far (5 points) above the worst case earns a sentence


@dataclass(frozen=True)
class Comparison:
    """One rule against the reference at one epsilon, on the seeds both have: n pairs; `test` (with p_holm filled
    in) from two pairs on, else None; `diff` the mean of rule - reference (NaN without a pair)."""

    label: str
    eps: float
    n: int
    diff: float
    test: stats.Paired | None


# --- reading the metrics ---------------------------------------------------------------------------------------
def eps_grid(trials: Sequence[StoredTrial], prefix: str = WORST) -> list[float]:
    """The sorted epsilons of metric names `<prefix><eps>` (names that do not end in a number are skipped)."""
    grid = set()
    for name in metric_names(trials, prefix):
        eps = _number(name[len(prefix):])
        if eps is not None:
            grid.add(eps)
    return sorted(grid)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _at(trial: StoredTrial, prefix: str, eps: float | None) -> float | None:
    """The trial's finite value of `<prefix><eps>` (any spelling of eps: 0.1 / 0.10), or of `prefix` itself when
    eps is None."""
    for name, v in trial.metrics.items():
        if v is None or not math.isfinite(v):
            continue
        if eps is None and name == prefix:
            return float(v)
        if eps is not None and name.startswith(prefix):
            x = _number(name[len(prefix):])
            if x is not None and math.isclose(x, eps, rel_tol=1e-9, abs_tol=1e-12):
                return float(v)
    return None


def seed_values(trials: Sequence[StoredTrial], prefix: str, eps: float | None = None) -> dict[int, float]:
    """seed -> the metric over the done trials that have it; the mean where a label has several trials of one seed
    (a tuned label: one per tuning study), as the pairwise tests of comparison.py do."""
    values: dict[int, list[float]] = {}
    for t in done(trials):
        v = _at(t, prefix, eps)
        if v is not None:
            values.setdefault(t.seed, []).append(v)
    return {seed: sum(vs) / len(vs) for seed, vs in values.items()}


# --- the comparisons ----------------------------------------------------------------------------------------------
def comparisons(group: Group, reference: str, grid: list[float]) -> list[Comparison]:
    """Every ranked rule but the reference at every epsilon, the t-tests Holm-adjusted together."""
    out = []
    for label in group.ranked:
        if label == reference:
            continue
        for eps in grid:
            x, y = stats.paired_by_seed(seed_values(group.labels[label], WORST, eps),
                                        seed_values(group.labels[reference], WORST, eps))
            test = stats.paired_test(label, reference, x, y) if x.size >= 2 else None
            out.append(Comparison(label, eps, int(x.size), float((x - y).mean()) if x.size else math.nan, test))
    adjusted = iter(stats.holm([c.test.p_t for c in out if c.test is not None]))
    return [replace(c, test=replace(c.test, p_holm=float(next(adjusted)))) if c.test is not None else c
            for c in out]


# --- text ---------------------------------------------------------------------------------------------------------
def _points(x: float) -> str:
    """A difference of accuracies in percentage points, signed: +12.30, -0.40."""
    return ("+" if x >= 0 else "") + pct(x)


def _interval(s: stats.Summary) -> str:
    return f"[{pct(s.lo)}, {pct(s.hi)}]"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def sentence(c: Comparison, reference: str, m: int) -> str:
    """What one comparison supports, from its numbers: more robust, less robust, more/less by the CI but not after
    Holm's correction over the m tests, no difference detectable, or no CI below two seeds."""
    where = f"at ε = {c.eps:g}"
    if c.n == 0:
        return (f"{c.label} vs {reference} {where}: no seed has a worst-case robust accuracy for both, so there is "
                "nothing to compare.")
    if c.test is None:
        return (f"{c.label} vs {reference} {where}: only {_seeds(c.n)} finished by both, so no confidence interval "
                f"and no verdict ({_points(c.diff)} points of worst-case robust accuracy on that seed).")
    t = c.test
    numbers = f"{_points(t.diff.mean)} points of worst-case robust accuracy"
    stat = f"95% CI {_interval(t.diff)}, Holm {_p(t.p_holm)}, {_seeds(t.n)}"
    if t.diff.lo > 0 or t.diff.hi < 0:
        side = "more" if t.diff.lo > 0 else "less"
        if t.p_holm < stats.ALPHA:
            return f"{c.label} is {side} robust than {reference} {where}: {numbers} ({stat})."
        return (f"{c.label} is {side} robust than {reference} {where} by the 95% CI {_interval(t.diff)} but not "
                f"after Holm's correction over the {m} comparisons (Holm {_p(t.p_holm)}): {numbers}, "
                f"{_seeds(t.n)}.")
    if t.diff.lo == t.diff.hi == 0.0:  # no spread, no test: e.g. both at 0% once the eps breaks every point
        return (f"No difference between {c.label} and {reference} {where}: the same worst-case robust accuracy on "
                f"each of the {_seeds(t.n)}.")
    return (f"No difference detectable between {c.label} and {reference} {where} with {_seeds(t.n)}: {numbers} "
            f"(95% CI {_interval(t.diff)}, Holm {_p(t.p_holm)}).")


def pseudo_sentences(group: Group, grid: list[float]) -> list[str]:
    """One sentence per rule whose mean pseudo-gradient robust accuracy exceeds its mean worst case by more than
    PSEUDO_GAP at some epsilon, naming every such epsilon."""
    out = []
    for label, trials in group.labels.items():
        gaps = []
        for eps in grid:
            pseudo, worst = seed_values(trials, PSEUDO, eps), seed_values(trials, WORST, eps)
            if pseudo and worst:
                p, w = _mean(pseudo.values()), _mean(worst.values())
                if p - w > PSEUDO_GAP:
                    gaps.append(f"ε = {eps:g} ({pct(p)}% against {pct(w)}%, {_points(p - w)} points)")
        if gaps:
            out.append(
                f"{label} looks robust under its own pseudo-gradient (PGD through its training signal's route to the "
                "input) at "
                + _join(gaps) + ", well above its worst case through the true gradient: that apparent robustness "
                "is the attack's choice of gradient, not the model's (Akrout et al. 2019 report 98% adversarial "
                "accuracy for feedback alignment against 0.03% for backprop on MNIST when each model is attacked "
                "through its own training gradient).")
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# --- the section --------------------------------------------------------------------------------------------------
def _acc(values: dict[int, float]) -> str:
    """mean ± t half-width over seeds; one seed: its value and no CI, said in the cell."""
    s = stats.summarize(list(values.values()))
    if s.n == 0:
        return "–"
    if s.n == 1:
        return f"{pct(s.mean)} (1 seed, no CI)"
    return f"{pct(s.mean)} ± {100 * (s.hi - s.mean):.2f}"


def _table(group: Group, order: list[str], reference: str | None, eps: float,
           found: dict[str, Comparison]) -> Table:
    others = [(prefix, head) for prefix, head in OTHERS
              if any(seed_values(group.labels[k], prefix, eps) for k in order)]
    ref = reference or "the reference"
    headers = (["rule", "seeds", "clean", "worst case"] + [h for _, h in others]
               + [f"Δ worst case vs {ref} (pp)", "95% CI (pp)", "p (Holm)"])
    rows: list[list[Cell]] = []
    for label in order:
        trials = group.labels[label]
        worst = seed_values(trials, WORST, eps)
        row: list[Cell] = [label, str(len(worst)), _acc(seed_values(trials, CLEAN)), _acc(worst)]
        row += [_acc(seed_values(trials, prefix, eps)) for prefix, _ in others]
        row += _difference_cells(label, reference, found.get(label))
        rows.append(row)
    return Table(headers, rows, caption=f"Linf ε = {eps:g}: robust accuracy (%) and the difference to {ref}.")


def _difference_cells(label: str, reference: str | None, c: Comparison | None) -> list[Cell]:
    if label == reference:
        return ["reference", "–", "–"]
    if c is None:
        return ["not compared", "–", "–"]
    if c.test is None:
        return [_points(c.diff) if c.n else "–", f"no CI ({_seeds(c.n)})", "–"]
    holm: Cell = Strong(pval(c.test.p_holm)) if c.test.p_holm < stats.ALPHA else pval(c.test.p_holm)
    return [_points(c.test.diff.mean), _interval(c.test.diff), holm]


def verdict_section(group: Group) -> list[Block]:
    trials = [t for g in group.labels.values() for t in g]
    grid = eps_grid(trials)
    if not grid:
        return []
    reference = reference_label(group)
    title = reference or group.reference
    order = ([reference] if reference else []) + [k for k in group.labels if k != reference]
    found = comparisons(group, reference, grid) if reference else []
    m = sum(1 for c in found if c.test is not None)
    intro = (
        f"Worst-case robust accuracy: a test point counts as robust at ε only if no Linf attack run on the model "
        "itself broke it (AutoAttack's standard ensemble APGD-CE, APGD-T, FAB-T, Square, and every standalone Linf "
        "attack through the true gradient or black box), so it is the strictest figure and the one compared. "
        "Beside it: pseudo-gradient, PGD through the input gradient the rule's own training signal implies (its "
        "feedback weights' backward pass; PEPITA's error projection F): only rules with feedback weights, i.e. "
        "without weight transport, record it; not part of the worst case. Square alone, a black-box "
        f"attack that needs no gradient; transfer, PGD examples crafted on {title} of the same seed. Cells: mean ± "
        "Student-t 95% half-width over seeds, in percent of the attacked points (clean: accuracy on those points "
        f"without attack). Δ: rule − {title} in worst-case robust accuracy, paired by seed (percentage points), "
        "with the Student-t 95% CI of the paired differences; p: the two-sided paired t-test, Holm-adjusted over "
        + (f"the {m} rule × ε comparison(s) of this problem, bold below {stats.ALPHA:g}. " if m else
           "the comparisons with two or more paired seeds (here none: with one seed there is no interval and no "
           "test). ")
        + "Test-set figures: they report, they choose nothing.")
    out: list[Block] = [Heading(3, f"Robustness verdict: is each learning rule more robust than {title}?"),
                        Text(intro, note=True)]
    if reference is None:
        out.append(Text(f"No ranked trials of the reference {group.reference!r} in this group, so no rule is "
                        "compared with it; the numbers are shown side by side only.", note=True))
    for eps in grid:
        at = {c.label: c for c in found if c.eps == eps}
        out += [Heading(4, f"Verdict at ε = {eps:g}"), _table(group, order, reference, eps, at)]
    sentences = [sentence(c, reference, m) for c in found]
    unranked = [k for k in group.labels if k not in group.ranked and k != reference]
    if reference and unranked:
        sentences.append("Not compared with " + reference + " (not ranked in this group, see the note above): "
                         + ", ".join(unranked) + ".")
    sentences += pseudo_sentences(group, grid)
    if sentences:
        out.append(Items(sentences))
    return out
