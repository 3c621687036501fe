"""The Tuning section (`learnbench tune`), per group (one problem under one budget), for every entry that was tuned:

* default vs tuned: the suite's own configuration (`LABEL (default)`) and each study's best configuration
  (`LABEL (tuned)`), both on the suite's seeds; per study the mean test accuracy over seeds with its Student-t 95%
  CI, and the median over studies of those means (AlgoPerf's score over tuning studies), validation beside test;
* the tuning cost each algorithm spent: its search configurations (by status), the sum of their training seconds
  and nominal FLOPs, and the share of configurations that reach the group's validation targets (`groups.targets`):
  how hard the algorithm is to tune;
* per algorithm, a figure of each search configuration's final validation accuracy against each tuned
  hyper-parameter (log axis where the dimension is log-uniform, read from the trial config's `tuning.space`), so a
  reader sees how sensitive the algorithm is to each.

Search configurations were scored on validation only; they appear nowhere else in the report (`ReportData.search`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from learnbench.trial import TUNED

from . import stats
from .data import COST_METRICS, ReportTrial, done, metric_values, status_text
from .document import Block, Cell, Figure, Heading, Table, Text, ci, mark_best, pct, si, secs
from .figures import Line, Panel, lines_figure
from .groups import TEST, VAL, Group, mean_final, targets
from .sections import Context, target_text

TUNING_TARGETS = (0.95, 0.99)  # fractions of the group's reference (groups.targets) whose reach the table counts
MISSED = "failed or diverged (scores 0)"


@dataclass(frozen=True)
class Tuned:
    """One tuned entry of a group: its default and tuned runs (suite seeds) and its search configurations."""

    name: str
    default: list[ReportTrial]
    tuned: list[ReportTrial]
    search: list[ReportTrial]

    def studies(self) -> dict[int, list[ReportTrial]]:
        """Tuned runs by study, in study order."""
        out: dict[int, list[ReportTrial]] = {}
        for t in self.tuned:
            out.setdefault(int(t.tuning["study"]), []).append(t)
        return dict(sorted(out.items()))


def tuned_entries(group: Group, search: Sequence[ReportTrial]) -> list[Tuned]:
    """The group's tuned entries, in order of appearance, with the search configurations of its problem and
    budget."""
    trials = [t for g in group.labels.values() for t in g]
    mine = [t for t in search if (t.dataset, t.model_label, t.budget) == (group.dataset, group.model, group.budget)]
    names = list(dict.fromkeys([t.tuning["entry"] for t in trials if t.tuning] + [t.tuning["entry"] for t in mine]))
    return [Tuned(name, group.labels.get(f"{name} (default)", []),
                  [t for t in trials if t.tuning_role == TUNED and t.tuning["entry"] == name],
                  [t for t in mine if t.tuning["entry"] == name]) for name in names]


def tuning_section(ctx: Context, parts: tuple[str, ...], group: Group) -> list[Block]:
    entries = tuned_entries(group, ctx.data.search)
    if not entries:
        return []
    out: list[Block] = [Heading(3, "Tuning"), Text(_protocol(entries), note=True), score_table(group, entries),
                        cost_table(group, entries)]
    figures = [block for entry in entries for block in sensitivity_figure(ctx, parts, group, entry)]
    if figures:
        out += [Text("Sensitivity: each figure plots the final validation accuracy of every search configuration of "
                     "one algorithm (all studies) against each hyper-parameter it tunes, on a log axis where the "
                     "search space is log-uniform; failed or diverged configurations lie at 0, the score they were "
                     "given. Dotted: the default configuration's mean validation accuracy; dashed: the "
                     f"{100 * max(TUNING_TARGETS):g}% target. A flat cloud means the algorithm is insensitive to that "
                     "hyper-parameter; a narrow peak, that it is hard to tune.", note=True), *figures]
    return out


def _protocol(entries: list[Tuned]) -> str:
    search = [t for e in entries for t in e.search]
    samplers = ", ".join(sorted({str(t.tuning.get("sampler")) for t in search})) or "–"
    chosen = next((t.tuning for e in entries for t in e.tuned), {})
    objective = "final validation accuracy"
    if chosen.get("objective") == "time-to-target":
        objective = (f"time to reach {pct(chosen.get('target'))}% validation accuracy, in "
                     f"{chosen.get('currency')}; a configuration that never reached it scored the worst")
    budgets = {tuple(sorted(_study_sizes(e).values())) for e in entries}
    if len(budgets) == 1 and len(set(next(iter(budgets)))) == 1:
        studies = next(iter(budgets))
        budget = (f"Every algorithm had the same tuning budget: {len(studies)} studies of {studies[0]} "
                  "configurations")
    else:
        budget = ("The algorithms' tuning budgets differ (an interrupted or extended tune; see the cost table): "
                  "studies of configurations")
    return (f"{budget} drawn from its declared search space (sampler: {samplers}), each trained under this group's "
            f"budget on the study's own seed (never one of the suite's) and scored on validation only "
            f"({objective}). Each study's best configuration was re-run on the suite's seeds with test metrics: "
            "LABEL (tuned); LABEL (default) is the suite's own configuration on the same seeds.")


def _study_sizes(entry: Tuned) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for t in entry.search:
        sizes[int(t.tuning["study"])] = sizes.get(int(t.tuning["study"]), 0) + 1
    return sizes


def score_table(group: Group, entries: list[Tuned]) -> Table:
    rows: list[list[Cell]] = []
    tuned_val = []
    for e in entries:
        d = stats.summarize(metric_values(e.default, TEST))
        studies = {s: (mean_final(ts, VAL), stats.summarize(metric_values(ts, TEST))) for s, ts in e.studies().items()}
        val_score = _median([v for v, _ in studies.values()])
        score = _median([m.mean for _, m in studies.values()])
        tuned_val.append(val_score)
        per_study = "; ".join(f"s{s}: {pct(m.mean)} {ci(m.lo, m.hi)}" for s, (_, m) in studies.items()) or "–"
        delta = f"{100 * (score - d.mean):+.2f}" if math.isfinite(score - d.mean) else "–"
        rows.append([e.name, pct(mean_final(e.default, VAL)), f"{pct(d.mean)} {ci(d.lo, d.hi)}", str(d.n),
                     pct(val_score), pct(score), per_study, delta])
    mark_best(rows, 4, tuned_val, higher=True, eligible=[f"{e.name} (tuned)" in group.ranked for e in entries])
    headers = ["algorithm", "default val (%)", "default test (%) [95% CI]", "seeds", "tuned val (%)",
               "tuned test (%)", "tuned test per study (%) [95% CI]", "Δ test (points)"]
    return Table(headers, rows, text_columns=(2, 6), caption=(
        "Default: the suite's configuration on the suite's seeds, mean over seeds with its Student-t 95% CI. Tuned: "
        "each study's best configuration on the same seeds; per study, the mean over seeds with its 95% CI; the "
        "tuned columns give the median over studies of those per-study means (AlgoPerf's score over tuning "
        "studies), on validation and on test. Δ: tuned test median minus default test mean, in percentage points. "
        "Bold: the best tuned validation median among ranked algorithms (validation makes every choice)."))


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else math.nan


def cost_table(group: Group, entries: list[Tuned]) -> Table:
    goal = targets(group)
    levels = [(f, v) for f, v in goal.levels if any(math.isclose(f, x) for x in TUNING_TARGETS)]
    rows: list[list[Cell]] = []
    for e in entries:
        sizes = _study_sizes(e)
        row: list[Cell] = [e.name, status_text(e.search) or "0", str(len(sizes)),
                           secs(_total(e.search, COST_METRICS["seconds"])),
                           si(_total(e.search, COST_METRICS["flops"]))]
        for _, target in levels:
            hits = sum(reaches(t, target) for t in e.search)
            row.append(f"{hits}/{len(e.search)} ({100 * hits / len(e.search):.0f}%)" if e.search else "–")
        rows.append(row)
    headers = ["algorithm", "configurations", "studies", "train seconds", "nominal FLOPs",
               *(f"reach {target_text(f, v)}" for f, v in levels)]
    reach = (f" Reach: configurations whose run finished and whose validation accuracy reached the target at some "
             f"evaluation; targets are fractions of {goal.source}." if levels else f" No targets: {goal.source}.")
    return Table(headers, rows, align_left=2, caption=(
        "Tuning cost: every search configuration of the algorithm on this problem (all studies), by status; train "
        "seconds and nominal FLOPs summed over them (the default and tuned runs are not counted)." + reach))


def _total(trials: Sequence[ReportTrial], metric: str) -> float:
    values = [t.metrics.get(metric) for t in trials]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(sum(finite)) if finite else math.nan


def reaches(trial: ReportTrial, target: float) -> bool:
    """A done configuration whose validation accuracy reached `target` at some evaluation (the final value when
    no curve was recorded)."""
    if trial.status != "done":
        return False
    curve = trial.curves.get(VAL)
    if curve is not None and curve.value.size:
        return bool((curve.value >= target).any())
    final = trial.metrics.get(VAL)
    return final is not None and final >= target


def sensitivity_figure(ctx: Context, parts: tuple[str, ...], group: Group, entry: Tuned) -> list[Block]:
    """Validation accuracy of every search configuration against each tuned hyper-parameter."""
    space = next((t.tuning.get("space") for t in entry.search if t.tuning.get("space")), None)
    if not space:
        return []
    default = mean_final(entry.default, VAL)
    top = max((v for f, v in targets(group).levels if math.isclose(f, max(TUNING_TARGETS))), default=math.nan)
    panels = [_panel(name, dim, entry.search, default, top) for name, dim in space.items()]
    colour = ctx.colours.get(f"{entry.name} (tuned)", ctx.colours.get(f"{entry.name} (default)", "C0"))
    colours = {"done": colour, MISSED: (0.1, 0.1, 0.1, 1.0), "default": (0.35, 0.35, 0.35, 1.0),
               "target": (0.6, 0.1, 0.1, 1.0)}
    path = lines_figure(panels, colours, ctx.figure_path(*parts, "tuning", entry.name), ncols=min(3, len(panels)))
    ctx.figures.append(path)
    return [Figure(path, f"{entry.name}: validation accuracy of its {len(entry.search)} search configurations "
                         "against each tuned hyper-parameter.", alt=f"tuning sensitivity, {entry.name}")]


def _panel(name: str, dim: Mapping[str, Any], search: Sequence[ReportTrial], default: float,
           top: float) -> Panel:
    options = list(dim.get("options", [])) if dim.get("kind") == "choice" else None

    def at(value: Any) -> float:
        return float(options.index(value)) if options is not None and value in options else float(value)

    ok = [t for t in done(search) if t.metrics.get(VAL) is not None and name in t.hparams]
    missed = [t for t in search if t not in ok and name in t.hparams]
    lines = [Line("done", np.array([at(t.hparams[name]) for t in ok]), np.array([100 * t.metrics[VAL] for t in ok]),
                  style="none", marker="o", name="configuration"),
             Line(MISSED, np.array([at(t.hparams[name]) for t in missed]), np.zeros(len(missed)), style="none",
                  marker="x")]
    span = np.array([-0.5, len(options) - 0.5]) if options is not None else np.array([dim["low"], dim["high"]], float)
    for label, value, style, legend in (("default", default, ":", "default configuration"),
                                        ("target", top, "--", f"{100 * max(TUNING_TARGETS):g}% target")):
        if math.isfinite(value):
            lines.append(Line(label, span, np.full(2, 100 * value), style=style, name=legend))
    return Panel(name, name + (" (log scale)" if dim.get("kind") == "log-uniform" else ""),
                 "validation accuracy (%)", [line for line in lines if line.x.size],
                 logx=dim.get("kind") == "log-uniform", xticks=[str(o) for o in options] if options else None)
