"""The compact summaries: `show_table`, the terminal table of `learnbench show RUN_DIR` (one row per dataset /
model / budget / label, then the trials that did not finish cleanly with the telling line of their error), and the
README's results section, generated from real runs (`learnbench report RUN_DIR --readme README.md`), never typed by
hand: `readme_section` renders the Markdown, `update_readme` puts it between the README's markers

    <!-- results:start -->
    ...generated text...
    <!-- results:end -->

and leaves every other byte of the file as it was. Both follow the report's rules (groups.py): rows are grouped by
problem and budget, only ranked labels are marked, and validation accuracy is what marks. The README leads with the
group that has the most algorithms (the head-to-head problem) and adds its accuracy-at-equal-cost table in nominal
FLOPs; it reads the validation curves only, `show_table` reads no curve at all.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from tabulate import tabulate

from learnbench.errors import UsageError
from learnbench.trial import StoredTrial

from . import stats
from .data import (COST_METRICS, ReportData, ReportTrial, display_labels, done, load_runs, metric_names,
                   metric_values, split_search, status_counts, status_text, suite_names, trouble)
from .document import Cell, Table, mark_best, md_table, md_text, pct, secs, si
from .equal_cost import as_table, cost_table
from .groups import TEST, VAL, Group, all_groups, mean_final
from .robustness import attack_grid, robust_values, standard_eps

# The attack shown in the summary: the first of these the run has (strongest common white-box attack first).
HEADLINE_ATTACKS = ("pgd-linf", "apgd-ce", "fgsm", "pgd-l2", "square")


def _acc_text(values: np.ndarray) -> str:
    s = stats.summarize(values)
    if s.n == 0:
        return "–"
    half = s.hi - s.mean
    return pct(s.mean) + (f" ± {100 * half:.2f}" if math.isfinite(half) else "")


def headline_attack(trials: Sequence[StoredTrial]) -> tuple[str, float] | None:
    grid = attack_grid(trials)
    for attack in HEADLINE_ATTACKS + tuple(grid):
        if attack in grid:
            return attack, standard_eps(attack, grid[attack], trials)
    return None


def _robust_text(group: Sequence[StoredTrial], attack: str, eps: float) -> str:
    return _acc_text(robust_values(group, attack, eps))


def _flags(group: Sequence[StoredTrial], names: list[str]) -> str:
    raised = []
    for name in names:
        k = sum(1 for t in done(group) if (t.metrics.get(name) or 0) >= 0.5)
        if k:
            raised.append(f"!{name.removeprefix('flag/masking/').removeprefix('flag/')} {k}/{len(done(group))}")
    return " ".join(raised)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def _budget_cell(group: Group, label: str) -> str:
    return group.budget_text + ("" if label in group.ranked else " (unranked)")


def show_table(trials: Sequence[StoredTrial]) -> str:
    """The summary table (tabulate 'simple') and the failed/diverged/unfinished trials below it (`store.trials()`;
    no curve is read). Tuned entries show `LABEL (default)` and `LABEL (tuned)` rows; tuning search configurations
    are only counted, in a line below."""
    trials, search = split_search(display_labels(trials))
    if not trials:
        return "no trials in this run" + (f"\n{_search_line(search)}" if search else "")
    headline = headline_attack(trials)
    flag_names = metric_names(trials, "flag/")
    headers = ["dataset", "model", "budget", "algorithm", "val acc %", "test acc % (95% CI)", "n", "trials",
               "seconds", "FLOPs", "examples"]
    if headline:
        headers.append(f"{headline[0]} ε={headline[1]:g} %")
    if flag_names:
        headers.append("flags")
    rows = []
    for g in all_groups([ReportTrial.of(t) for t in trials]):
        for label, group in g.labels.items():
            acc = metric_values(group, TEST)
            row = [g.dataset, g.model, _budget_cell(g, label), label, pct(mean_final(group, VAL)), _acc_text(acc),
                   acc.size, status_text(group), secs(_mean(metric_values(group, COST_METRICS["seconds"]))),
                   si(_mean(metric_values(group, COST_METRICS["flops"]))),
                   si(_mean(metric_values(group, COST_METRICS["examples"])))]
            if headline:
                row.append(_robust_text(group, *headline))
            if flag_names:
                row.append(_flags(group, flag_names))
            rows.append(row)
    text = tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)
    notes = ("mean ± Student-t 95% half-width over done seeds; costs are means; only rows of one dataset, model and "
             "budget compare; (unranked): shown, never ranked")
    tail = f"\n{_search_line(search)}" if search else ""
    bad = [t for t in trials if t.status != "done"]
    if bad:
        lines = [f"  {t.dataset}/{t.model_label} {t.label} seed {t.seed} [{t.status}] {t.id[:12]}: "
                 f"{trouble(t)}" for t in bad]
        return f"{text}\n({notes}){tail}\n\nnot done ({len(bad)}):\n" + "\n".join(lines)
    return f"{text}\n({notes}){tail}"


def _search_line(search: Sequence[StoredTrial]) -> str:
    """How many tuning search configurations ran (validation only; the report's Tuning section shows them)."""
    studies = {(t.dataset, t.model_label, t.tuning.get("entry"), t.tuning.get("study")) for t in search if t.tuning}
    entries = {study[:3] for study in studies}
    return (f"tuning: {len(search)} search configuration(s) ({status_text(search)}) in {len(studies)} "
            f"studies of {len(entries)} algorithm(s) x problem(s), scored on validation only; see the report's "
            "Tuning section")


# --- the README's results section ----------------------------------------------------------------------------------
START, END = "<!-- results:start -->", "<!-- results:end -->"


def readme_section(run_dirs: list[str | Path]) -> str:
    """A short Markdown block: where the numbers come from, one table of final accuracy and costs by group (the
    head-to-head group first), that group's accuracy at equal nominal FLOPs, and the robust accuracies."""
    data = load_runs(run_dirs, curves=(VAL,))
    if not data.trials:
        raise UsageError(f"no trials in {', '.join(str(d) for d in run_dirs)}: nothing to put in the README")
    groups = lead_first(all_groups(data.trials))
    parts = [_source_line(data), md_table(_table(groups))]
    parts += [f"*{md_text(f'{g.name}: {note}')}*" for g in groups for note in g.notes]
    parts += _equal_cost_parts(groups[0])
    robust = _robust_table(groups)
    if robust:
        parts += ["Robust test accuracy (%) on the first `robustness.examples` test points, through each model's "
                  "true input gradient; `pseudo` columns attack feedback-alignment models through their own "
                  "backward pass, as tools such as BioTorch do.", md_table(robust)]
    return "\n\n".join(parts + [_footer(data)]) + "\n"


def lead_first(groups: list[Group]) -> list[Group]:
    """The group with the most algorithms (the first such) first, then the rest in order of appearance."""
    lead = max(groups, key=lambda g: len(g.labels))
    return [lead] + [g for g in groups if g is not lead]


def _table(groups: list[Group]) -> Table:
    headline = headline_attack([t for g in groups for trials in g.labels.values() for t in trials])
    headers = ["dataset", "model", "budget", "algorithm", "val accuracy (%)", "test accuracy (%)", "95% CI",
               "seeds", "train seconds", "FLOPs"]
    if headline:
        headers.append(f"{headline[0]} ε={headline[1]:g} (%)")
    rows: list[list[Cell]] = []
    for g in groups:
        block: list[list[Cell]] = []
        for label, group in g.labels.items():
            s = stats.summarize(metric_values(group, TEST))
            counts = status_counts(group)
            seeds = str(s.n) + "".join(f", {v} {k}" for k, v in counts.items() if k != "done")
            row: list[Cell] = [g.dataset, g.model, _budget_cell(g, label), label, pct(mean_final(group, VAL)),
                               pct(s.mean), _ci(s), seeds, secs(_mean(metric_values(group, COST_METRICS["seconds"]))),
                               si(_mean(metric_values(group, COST_METRICS["flops"])))]
            if headline:
                row.append(pct(_mean(robust_values(group, *headline))))
            block.append(row)
        mark_best(block, 4, [mean_final(t, VAL) for t in g.labels.values()], higher=True,
                  eligible=[k in g.ranked for k in g.labels])
        rows += block
    return Table(headers, rows, align_left=4)


def _equal_cost_parts(group: Group) -> list[str]:
    """The head-to-head group's validation accuracy at equal nominal FLOPs (means only: compact)."""
    table = cost_table(group.labels, "flops")
    if not table.levels:
        return []
    return [f"Validation accuracy (%) at equal nominal FLOPs on {md_text(group.name)}: at each level, every seed's "
            "`val/accuracy` at its last evaluation costing no more (no interpolation), mean over done seeds; '–' "
            "where a seed's run stopped short of the level. Bold: best per level among ranked algorithms.",
            md_table(as_table(table, group.ranked, compact=True))]


README_ATTACKS = ("pgd-linf", "pgd-linf-pseudo", "square")  # at the Linf radii below, where the run has them
README_EPS = (0.1, 0.3)


def _robust_table(groups: list[Group]) -> Table | None:
    """Robust accuracy per algorithm at README_EPS for README_ATTACKS, the pseudo-gradient beside the true one."""
    columns = [(a, e) for e in README_EPS for a in README_ATTACKS
               if any(robust_values(trials, a, e).size for g in groups for trials in g.labels.values())]
    if not columns:
        return None
    rows = []
    for g in groups:
        for label, group in g.labels.items():
            values = [robust_values(group, a, e) for a, e in columns]
            if any(v.size for v in values):
                rows.append([g.dataset, g.model, _budget_cell(g, label), label,
                             *(pct(v.mean()) if v.size else "–" for v in values)])
    return Table(["dataset", "model", "budget", "algorithm", *(f"{a} ε={e:g}" for a, e in columns)], rows,
                 align_left=4)


def _ci(s: stats.Summary) -> str:
    return "–" if not math.isfinite(s.lo) else f"{pct(s.lo)}–{pct(s.hi)}"


def _first(trials: Sequence[StoredTrial], *keys: str) -> str | None:
    for t in trials:
        for key in keys:
            if t.provenance.get(key) not in (None, ""):
                return str(t.provenance[key])
    return None


def _source_line(data: ReportData) -> str:
    suites = ", ".join(f"`{s}`" for s in suite_names(data)) or "the"
    bits = [b for b in (_device(data.trials), _threads(data.trials),
                        _version(data), _commit(data.trials)) if b]
    return (f"Measured with the {suites} suite" + (f" ({'; '.join(bits)})" if bits else "") + ". One block of rows "
            "per problem (dataset x model) and budget; rows compare only within their block, and `(unranked)` rows "
            "are never compared. Accuracies in percent: validation accuracy (mean over seeds) ranks, bold is the "
            "best of a block; test accuracy is the final number, mean and Student-t 95% confidence interval over "
            "seeds; costs are means per trial (FLOPs: nominal).")


def _device(trials: Sequence[StoredTrial]) -> str | None:
    kind, name = _first(trials, "device"), _first(trials, "device_name")
    return f"{kind}: {name}" if kind and name and name != kind else kind or name


def _threads(trials: Sequence[StoredTrial]) -> str | None:
    n = _first(trials, "threads", "torch_threads")
    return f"{n} thread(s)" if n else None


def _version(data: ReportData) -> str | None:
    v = _first(data.trials, "learnbench") or next(
        (str(r[k]) for r in data.runs for k in ("learnbench", "learnbench_version") if r.get(k)), None)
    return f"learnbench {v}" if v else None


def _commit(trials: Sequence[StoredTrial]) -> str | None:
    c = _first(trials, "git_commit", "commit", "git")
    return f"commit {c[:10]}" if c else None


def _footer(data: ReportData) -> str:
    return ("*Generated by `learnbench report RUN_DIR --readme README.md` from "
            + ", ".join(f"`{Path(d).name}`" for d in data.run_dirs) + "; do not edit by hand.*")


def update_readme(path: str | Path, text: str) -> None:
    """Replace what lies between the results markers of the file at path with text (markers kept)."""
    path = Path(path)
    try:
        old = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    start, end = old.find(START), old.find(END)
    if start < 0 or end < 0 or end < start or old.count(START) != 1 or old.count(END) != 1:
        raise UsageError(f"{path} needs exactly one '{START}' followed by one '{END}' line around its results")
    new = old[:start + len(START)] + "\n" + text.strip("\n") + "\n" + old[end:]
    try:
        path.write_text(new, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
