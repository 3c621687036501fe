"""The robustness section: robust accuracy against epsilon per attack (from the `robust/<attack>/<eps>` final
metrics, and `worst-case/linf` from `robust/worst-case/linf/<eps>`, the per-example worst case over the Linf
attacks), a table at each attack's standard epsilon, and the gradient-masking flags (`flag/masking/*`). The verdict
that compares each rule with the reference on the worst case is verdict.py's.

The pseudo-gradient attack on feedback-alignment models (`pgd-linf-pseudo`) is drawn dashed in the panel of its
true-gradient twin (`pgd-linf`) and sits in the column beside it: a model that resists its own pseudo-gradient but
not its true gradient owes its "robustness" to the attack's choice of gradient, not to the model.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from learnbench.trial import StoredTrial

from . import stats
from .data import done, metric_names, metric_values
from .document import Block, Cell, Figure, Heading, Table, pct
from .figures import Line, Panel, lines_figure
from .interactive import LinesPlot, hover_info
from .sections import Context, Groups

PSEUDO = "-pseudo"
WORST_CASE = "worst-case/linf"  # the per-example worst case over the Linf attacks (learnbench.attacks.ensemble)


def attack_grid(trials: Sequence[StoredTrial]) -> dict[str, list[float]]:
    """attack -> sorted epsilons, from metric names `robust/<attack>/<eps>` and the per-example worst case
    `robust/worst-case/linf/<eps>` (attack `worst-case/linf`, first); other robust/ names (the ensemble's running
    `robust/ensemble/<attack>/<eps>`, `robust/first-break/...`, `robust/auc/...`, seconds) are skipped."""
    grid: dict[str, set[float]] = {WORST_CASE: set()}
    for name in metric_names(trials, "robust/"):
        parts = name.split("/")
        if name.startswith(f"robust/{WORST_CASE}/") and len(parts) == 4:
            parts = ["robust", WORST_CASE, parts[3]]
        if len(parts) != 3 or parts[1] == "auc":
            continue
        try:
            eps = float(parts[2])
        except ValueError:
            continue
        grid.setdefault(parts[1], set()).add(eps)
    return {a: sorted(grid[a]) for a in _pseudo_beside([a for a in grid if grid[a]])}


def _pseudo_beside(attacks: list[str]) -> list[str]:
    """Order attacks so that `X-pseudo` directly follows `X`."""
    out = [a for a in attacks if not (a.endswith(PSEUDO) and a.removesuffix(PSEUDO) in attacks)]
    for a in attacks:
        if a.endswith(PSEUDO) and a.removesuffix(PSEUDO) in out:
            out.insert(out.index(a.removesuffix(PSEUDO)) + 1, a)
    return out


def standard_eps(attack: str, grid: list[float], trials: Sequence[StoredTrial]) -> float:
    """The suite's `robustness.standard_eps` (a number, or a table by attack) when given; otherwise the lower
    median of the attack's grid (MNIST's 0.05/0.1/0.2/0.3 -> 0.1)."""
    for t in trials:
        named = (t.robustness or {}).get("standard_eps")
        if isinstance(named, dict):
            named = named.get(attack, named.get(attack.removesuffix(PSEUDO)))
        if isinstance(named, (int, float)) and float(named) in grid:
            return float(named)
    return grid[(len(grid) - 1) // 2]


def robust_values(group: Sequence[StoredTrial], attack: str, eps: float) -> np.ndarray:
    """Robust accuracy at (attack, eps) over done trials; metric names may spell eps either way (0.1 / 0.10)."""
    vals = []
    for t in done(group):
        for name, v in t.metrics.items():
            parts = name.split("/")
            if (len(parts) >= 3 and parts[0] == "robust" and "/".join(parts[1:-1]) == attack
                    and _is_eps(parts[-1], eps) and v is not None and math.isfinite(v)):
                vals.append(v)
                break
    return np.array(vals, dtype=float)


def _is_eps(text: str, eps: float) -> bool:
    try:
        return math.isclose(float(text), eps, rel_tol=1e-9, abs_tol=1e-12)
    except ValueError:
        return False


def _panels(groups: Groups, grid: dict[str, list[float]]) -> list[Panel]:
    panels: dict[str, Panel] = {}
    for attack, eps_list in grid.items():
        base = attack.removesuffix(PSEUDO)
        pseudo = attack != base and base in grid
        if not pseudo:
            panels[attack] = Panel(attack, "ε", "robust accuracy (%)", [], ylim=(-2, 102))
        elif "dashed" not in panels[base].title:
            panels[base].title += " (dashed: pseudo-gradient)"
        for label, group in groups.items():
            xs, means, los, his = [], [], [], []
            for eps in ([0.0] if 0.0 not in eps_list else []) + eps_list:
                vals = metric_values(group, "robust/clean") if eps == 0.0 and 0.0 not in eps_list \
                    else robust_values(group, attack, eps)
                if vals.size:
                    s = stats.summarize(100 * vals)
                    xs.append(eps), means.append(s.mean)
                    los.append(s.lo if math.isfinite(s.lo) else s.mean)
                    his.append(s.hi if math.isfinite(s.hi) else s.mean)
            if xs:
                panels[base if pseudo else attack].lines.append(Line(
                    label, np.array(xs), np.array(means), np.array(los), np.array(his),
                    style="--" if pseudo else "-", marker="o"))
    return list(panels.values())


def _table(groups: Groups, grid: dict[str, list[float]], trials: Sequence[StoredTrial]) -> Table:
    std = {a: standard_eps(a, eps, trials) for a, eps in grid.items()}
    flags = metric_names(trials, "flag/masking/")
    headers = ["algorithm", "clean"] + [f"{a} ε={std[a]:g}" for a in grid] + ["masking flags"]
    rows: list[list[Cell]] = []
    for label, group in groups.items():
        cells = [metric_values(group, "robust/clean")] + [robust_values(group, a, std[a]) for a in grid]
        row: list[Cell] = [label]
        for vals in cells:
            s = stats.summarize(vals)
            half = (s.hi - s.mean) if math.isfinite(s.hi) else math.nan
            row.append(pct(s.mean) + (f" ± {100 * half:.2f}" if math.isfinite(half) else ""))
        row.append(_flag_text(group, flags))
        rows.append(row)
    return Table(headers, rows, text_columns=(len(headers) - 1,), caption=(
        "Robust accuracy (%) on the attacked test points: mean ± Student-t 95% half-width over seeds, at each "
        "attack's standard ε (the suite's choice, else the lower median of its grid). 'clean' is the accuracy on "
        "the same points without attack. Masking flags: how many seeds raised each gradient-masking check "
        "(AutoAttack-style: black-box beats white-box, zero input gradients, accuracy not falling with ε); a "
        "flagged model's white-box numbers overstate its robustness. No best marks: these are test-set figures, and "
        "the test set only reports, it never chooses."))


def _flag_text(group: Sequence[StoredTrial], flags: list[str]) -> str:
    n = len(done(group))
    raised = []
    for name in flags:
        k = sum(1 for t in done(group) if (t.metrics.get(name) or 0) >= 0.5)
        if k:
            raised.append(f"⚠ {name.removeprefix('flag/masking/')} {k}/{n}")
    return ", ".join(raised) if raised else ("none" if flags else "–")


def robustness_section(ctx: Context, problem: tuple[str, ...], groups: Groups) -> list[Block]:
    """`problem` names the figure."""
    trials = [t for g in groups.values() for t in g]
    grid = attack_grid(trials)
    if not grid:
        return []
    panels = _panels(groups, grid)
    path = lines_figure(panels, ctx.colours, ctx.figure_path(*problem, "robustness"))
    ctx.figures.append(path)
    out: list[Block] = [Heading(3, "Robustness"), Figure(path, (
        "Robust test accuracy against the attack budget ε, per attack (ε = 0: clean accuracy on the attacked "
        "points): mean over seeds with a 95% band."), alt=f"robustness, {' '.join(problem)}",
        interactive=LinesPlot(panels, ctx.colours, hover_info(groups))),
        _table(groups, grid, trials)]
    auc = metric_names(trials, "robust/auc/")
    if auc:
        out.append(_auc_table(groups, auc))
    return out


def _auc_table(groups: Groups, names: list[str]) -> Table:
    """Mean area under each attack's accuracy-vs-ε curve per algorithm ('–' where the attack did not run)."""
    rows: list[list[Cell]] = []
    for label, group in groups.items():
        means = [_mean(group, n) for n in names]
        rows.append([label, *("–" if math.isnan(m) else f"{m:.3f}" for m in means)])
    return Table(["algorithm", *(n.removeprefix("robust/auc/") for n in names)], rows, caption=(
        "Area under the accuracy-vs-ε curve from (0, clean accuracy) to the largest ε, divided by that ε, mean over "
        "seeds: 1 = accurate and robust at every ε; it summarises the whole curve where the table above reads one "
        "ε (test points: no best marks)."))


def _mean(group: Sequence[StoredTrial], name: str) -> float:
    vals = metric_values(group, name)
    return float(vals.mean()) if vals.size else math.nan
