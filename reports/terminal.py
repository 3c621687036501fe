"""`show_table`: the terminal summary of `learnbench show RUN_DIR`, one row per dataset / model / label, then the
trials that did not finish cleanly with the telling line of their error. Reads only the trial dicts of
`Store.trials()` (final metrics, no curves), so it is instant on any run.
"""

from __future__ import annotations

import math
from typing import Any

from tabulate import tabulate

from . import stats
from .data import ACCURACY, COST_METRICS, by_problem, done, first_line, metric_names, metric_values, status_text
from .document import pct, secs, si
from .robustness import attack_grid, robust_values, standard_eps

# The attack shown in the summary: the first of these the run has (strongest common white-box attack first).
HEADLINE_ATTACKS = ("pgd-linf", "apgd-ce", "fgsm", "pgd-l2", "square")


def _acc_text(values) -> str:
    s = stats.summarize(values)
    if s.n == 0:
        return "–"
    half = s.hi - s.mean
    return pct(s.mean) + (f" ± {100 * half:.2f}" if math.isfinite(half) else "")


def headline_attack(trials: list[dict[str, Any]]) -> tuple[str, float] | None:
    grid = attack_grid(trials)
    for attack in HEADLINE_ATTACKS + tuple(grid):
        if attack in grid:
            return attack, standard_eps(attack, grid[attack], trials)
    return None


def _robust_text(group: list[dict[str, Any]], attack: str, eps: float) -> str:
    return _acc_text(robust_values(group, attack, eps))


def _flags(group: list[dict[str, Any]], names: list[str]) -> str:
    raised = []
    for name in names:
        k = sum(1 for t in done(group) if (t["metrics"].get(name) or 0) >= 0.5)
        if k:
            raised.append(f"!{name.removeprefix('flag/masking/').removeprefix('flag/')} {k}/{len(done(group))}")
    return " ".join(raised)


def _mean(values) -> float:
    return float(values.mean()) if values.size else math.nan


def show_table(trials: list[dict[str, Any]]) -> str:
    """The summary table (tabulate 'simple') and the failed/diverged/unfinished trials below it."""
    if not trials:
        return "no trials in this run"
    headline = headline_attack(trials)
    flag_names = metric_names(trials, "flag/")
    headers = ["dataset", "model", "algorithm", "test acc % (95% CI)", "n", "trials", "seconds", "FLOPs",
               "examples"]
    if headline:
        headers.append(f"{headline[0]} ε={headline[1]:g} %")
    if flag_names:
        headers.append("flags")
    rows = []
    for (dataset, model), groups in by_problem(trials).items():
        for label, group in groups.items():
            acc = metric_values(group, ACCURACY)
            row = [dataset, model, label, _acc_text(acc), acc.size, status_text(group),
                   secs(_mean(metric_values(group, COST_METRICS["seconds"]))),
                   si(_mean(metric_values(group, COST_METRICS["flops"]))),
                   si(_mean(metric_values(group, COST_METRICS["examples"])))]
            if headline:
                row.append(_robust_text(group, *headline))
            if flag_names:
                row.append(_flags(group, flag_names))
            rows.append(row)
    text = tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)
    notes = "mean ± Student-t 95% half-width over done seeds; costs are means"
    bad = [t for t in trials if t["status"] != "done"]
    if bad:
        lines = [f"  {t['dataset']}/{t['model']} {t['label']} seed {t['seed']} [{t['status']}] {t['id'][:12]}: "
                 f"{first_line(t.get('error'))}" for t in bad]
        return f"{text}\n({notes})\n\nnot done ({len(bad)}):\n" + "\n".join(lines)
    return f"{text}\n({notes})"
