"""The compact summaries: `show_table`, the terminal table of `learnbench show RUN_DIR` (one row per dataset /
model / label, then the trials that did not finish cleanly with the telling line of their error), and the README's
results section, generated from real runs (`learnbench report RUN_DIR --readme README.md`), never typed by hand:
`readme_section` renders the Markdown, `update_readme` puts it between the README's markers

    <!-- results:start -->
    ...generated text...
    <!-- results:end -->

and leaves every other byte of the file as it was. Both read final metrics only (no curves): instant on any run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tabulate import tabulate

from learnbench.errors import UsageError

from . import stats
from .data import (ACCURACY, COST_METRICS, ReportData, by_problem, done, first_line, load_runs, metric_names,
                   metric_values, status_counts, status_text, suite_names)
from .document import Table, md_table, pct, secs, si
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


# --- the README's results section ----------------------------------------------------------------------------------
START, END = "<!-- results:start -->", "<!-- results:end -->"


def readme_section(run_dirs: list[str | Path]) -> str:
    """A short Markdown block: where the numbers come from, and one table of final accuracy and costs."""
    data = load_runs(run_dirs, curves=False)
    if not data.trials:
        raise UsageError(f"no trials in {', '.join(str(d) for d in run_dirs)}: nothing to put in the README")
    robust = _robust_table(data)
    robust_text = ("\n\nRobust test accuracy (%) on the first `robustness.examples` test points, through each model's true "
                   "input gradient; `pseudo` columns attack feedback-alignment models through their own backward "
                   "pass, as tools such as BioTorch do.\n\n" + md_table(robust)) if robust else ""
    return f"{_source_line(data)}\n\n{md_table(_table(data))}{robust_text}\n\n{_footer(data)}\n"


def _table(data: ReportData) -> Table:
    headline = headline_attack(data.trials)
    headers = ["dataset", "model", "algorithm", "test accuracy (%)", "95% CI", "seeds", "train seconds", "FLOPs"]
    if headline:
        headers.append(f"{headline[0]} ε={headline[1]:g} (%)")
    rows = []
    for (dataset, model), groups in by_problem(data.trials).items():
        for label, group in groups.items():
            s = stats.summarize(metric_values(group, ACCURACY))
            counts = status_counts(group)
            seeds = str(s.n) + "".join(f", {v} {k}" for k, v in counts.items() if k != "done")
            row = [dataset, model, label, pct(s.mean), _ci(s), seeds,
                   secs(_mean(metric_values(group, COST_METRICS["seconds"]))),
                   si(_mean(metric_values(group, COST_METRICS["flops"])))]
            if headline:
                row.append(pct(_mean(robust_values(group, *headline))))
            rows.append(row)
    return Table(headers, rows, align_left=3)


README_ATTACKS = ("pgd-linf", "pgd-linf-pseudo", "square")  # at the Linf radii below, where the run has them
README_EPS = (0.1, 0.3)


def _robust_table(data: ReportData) -> Table | None:
    """Robust accuracy per algorithm at README_EPS for README_ATTACKS, the pseudo-gradient beside the true one."""
    columns = [(a, e) for e in README_EPS for a in README_ATTACKS
               if any(robust_values(g, a, e).size for groups in by_problem(data.trials).values()
                      for g in groups.values())]
    if not columns:
        return None
    rows = []
    for (dataset, model), groups in by_problem(data.trials).items():
        for label, group in groups.items():
            values = [robust_values(group, a, e) for a, e in columns]
            if any(v.size for v in values):
                rows.append([dataset, model, label, *(pct(v.mean()) if v.size else "–" for v in values)])
    return Table(["dataset", "model", "algorithm", *(f"{a} ε={e:g}" for a, e in columns)], rows, align_left=3)


def _ci(s: stats.Summary) -> str:
    return "–" if not math.isfinite(s.lo) else f"{pct(s.lo)}–{pct(s.hi)}"


def _first(trials: list[dict[str, Any]], *keys: str) -> str | None:
    for t in trials:
        prov = t.get("provenance") or {}
        for key in keys:
            if prov.get(key) not in (None, ""):
                return str(prov[key])
    return None


def _source_line(data: ReportData) -> str:
    suites = ", ".join(f"`{s}`" for s in suite_names(data)) or "the"
    bits = [b for b in (_device(data.trials), _threads(data.trials),
                        _version(data), _commit(data.trials)) if b]
    return (f"Measured with the {suites} suite" + (f" ({'; '.join(bits)})" if bits else "") + ". Test accuracy in "
            "percent: mean and Student-t 95% confidence interval over seeds; costs are means per trial.")


def _device(trials: list[dict[str, Any]]) -> str | None:
    kind, name = _first(trials, "device"), _first(trials, "device_name")
    return f"{kind}: {name}" if kind and name and name != kind else kind or name


def _threads(trials: list[dict[str, Any]]) -> str | None:
    n = _first(trials, "threads", "torch_threads")
    return f"{n} thread(s)" if n else None


def _version(data: ReportData) -> str | None:
    v = _first(data.trials, "learnbench") or next(
        (str(r[k]) for r in data.runs for k in ("learnbench", "learnbench_version") if r.get(k)), None)
    return f"learnbench {v}" if v else None


def _commit(trials: list[dict[str, Any]]) -> str | None:
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
