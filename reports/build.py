"""`build_report`: one or more run directories -> `report.md`, a self-contained `report.html` and `figures/`.

The report is assembled once as blocks (`document.py`) and rendered twice, so the Markdown and the HTML always
show the same numbers. Sections, per group (a problem, dataset x model, under one budget; a problem run under
several budgets gets one subsection per budget, never compared with each other): final accuracy, learning curves,
sweeps (a figure per swept hyper-parameter, sweeps.py), tuning (after `learnbench tune`), accuracy at equal cost,
time-to-target, cost vs accuracy, pairwise significance, robustness, the robustness verdict (each rule against the
reference, verdict.py), alignment, diagnostics; then the performance profiles across the ranked groups, and the
provenance of every run.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from learnbench.errors import UsageError
from learnbench.trial import StoredTrial

from .comparison import profiles_section, significance_section
from .data import ReportData, load_runs, status_counts, suite_name, suite_names
from .document import Block, Heading, Table, Text, to_markdown
from .equal_cost import equal_cost_section
from .figures import palette
from .groups import Group, all_groups, budget_text, group_trials
from .html import to_html
from .probes import alignment_section, diagnostics_section
from .robustness import robustness_section
from .sections import Context, accuracy_section, curves_section, pareto_section, time_to_target_section
from .sweeps import sweep_section
from .tuning import tuning_section
from .verdict import verdict_section

# Provenance keys shown first, in this order (the runner's names and common spellings); the rest follow sorted.
PROVENANCE_ORDER = ("learnbench", "version", "git_commit", "git", "commit", "python", "torch", "numpy", "deap",
                    "device", "device_name", "gpu", "cuda", "threads", "torch_threads", "platform", "hostname")


def build_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.md, report.html and figures/ for the merged runs into out_dir (default: the first run
    directory). Returns {relative name: path} of every file written. UsageError if a path is not a run or the
    output folder cannot be written."""
    if not run_dirs:
        raise UsageError("report needs at least one run directory")
    data = load_runs(run_dirs)
    out = Path(out_dir) if out_dir is not None else Path(run_dirs[0])
    try:
        (out / "figures").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    ctx = Context(data, palette(data.labels()), out / "figures")
    blocks = report_blocks(ctx)
    title = "learnbench report: " + ", ".join(suite_names(data)) if suite_names(data) else "learnbench report"
    written = {}
    try:
        md, page = out / "report.md", out / "report.html"
        md.write_text(f"# {title}\n\n" + to_markdown(blocks), encoding="utf-8")
        page.write_text(to_html([Heading(1, title)] + blocks, title), encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    written["report.md"], written["report.html"] = md, page
    for path in ctx.figures:
        written[f"figures/{path.name}"] = path
    return written


def report_blocks(ctx: Context) -> list[Block]:
    blocks = overview(ctx.data)
    problems = group_trials(ctx.data.trials)
    for (dataset, model), groups in problems.items():
        blocks.append(Heading(2, f"{dataset} / {model}"))
        if len(groups) == 1:
            blocks += group_blocks(ctx, (dataset, model), groups[0])
            continue
        budgets = "; ".join(g.budget_text for g in groups)
        blocks.append(Text(f"This problem ran under {len(groups)} budgets ({budgets}): each has its own subsection, "
                           "and trials under different budgets are not compared with each other.", note=True))
        for g in groups:
            blocks.append(Heading(3, g.budget_text))
            blocks += demote(group_blocks(ctx, (dataset, model, g.tag), g))  # figures/toy-cnn-time_s-300-*.svg
    if ctx.data.trials:
        blocks += profiles_section(ctx, [g for groups in problems.values() for g in groups])
    return blocks + provenance_section(ctx.data)


def group_blocks(ctx: Context, parts: tuple[str, ...], group: Group) -> list[Block]:
    """Every section of one group; `parts` name its figures. Comparisons see only the ranked labels."""
    shared = "shared by every algorithm" if len(group.labels) > 1 else "of its only algorithm"
    out: list[Block] = [Text(f"Budget {shared}: {group.budget_text}.", note=True)]
    out += [Text(note) for note in group.notes]
    out += accuracy_section(group)
    out += curves_section(ctx, parts, group)
    out += sweep_section(ctx, parts, group)
    out += tuning_section(ctx, parts, group)
    out += equal_cost_section(group)
    if group.ranked:
        out += time_to_target_section(group)
        out += pareto_section(ctx, parts, group)
    out += significance_section(group)
    out += robustness_section(ctx, parts, group.labels)
    out += verdict_section(group)
    out += alignment_section(ctx, parts, group.labels)
    out += diagnostics_section(ctx, parts, group.labels)
    return out


def demote(blocks: list[Block]) -> list[Block]:
    """The same blocks with every heading one level down (a budget subsection's sections)."""
    return [replace(b, level=b.level + 1) if isinstance(b, Heading) else b for b in blocks]


def overview(data: ReportData) -> list[Block]:
    counts = status_counts(data.trials)
    status = ", ".join(f"{v} {k}" for k, v in counts.items()) or "none"
    problems = ", ".join(f"{g.dataset}/{g.model} ({g.budget_text})" for g in all_groups(data.trials)) or "none"
    runs = ", ".join(str(p) for p in data.run_dirs)
    text = (f"{_count(len(data.trials), 'trial')} ({status}) of {_count(len(data.labels()), 'algorithm')} from "
            f"{_count(len(data.run_dirs), 'run')}: {runs}. Datasets / models (budget): {problems}.")
    if data.search:
        text += (f" Tuning also ran {_count(len(data.search), 'search configuration')} "
                 f"({', '.join(f'{v} {k}' for k, v in status_counts(data.search).items())}), scored on validation "
                 "only; they appear only in the Tuning sections.")
    note = ("Statistics are over seeds: mean, sample standard deviation and Student-t 95% confidence intervals. "
            "Trials that appear in several runs (same config id) count once. Accuracies are in percent. Only trials "
            "of the same problem and budget are compared; validation accuracy makes every choice (best marks, "
            "targets, profiles) and the test set gives the final numbers.")
    out: list[Block] = [Heading(2, "Overview"), Text(text), Text(note, note=True)]
    if data.trials:
        out += [Heading(3, "Algorithms compared"), configurations(data.trials)]
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def configurations(trials: Sequence[StoredTrial]) -> Table:
    """Each label's algorithm, hyper-parameters and budget, from the trial configs (every distinct setting). An
    installed trainer class with a `hparams_in_effect(hparams)` classmethod narrows its hyper-parameters to those
    that act on the entry (backprop leaves out the knobs of optimizers it does not use); the store keeps them all."""
    seen: dict[str, dict[str, set[str]]] = {}  # label -> column -> its distinct cells
    classes = _trainer_classes({t.algorithm for t in trials})
    for t in trials:
        entry = seen.setdefault(t.label, {"algorithm": set(), "hparams": set(), "budget": set()})
        entry["algorithm"].add(t.algorithm)
        entry["hparams"].add(_settings(_in_effect(classes.get(t.algorithm), t.hparams)))
        entry["budget"].add(budget_text(t.budget) + (" (unranked)" if t.unranked else ""))
    rows = [[label, *(" | ".join(sorted(e[k])) for k in ("algorithm", "hparams", "budget"))]
            for label, e in seen.items()]
    return Table(["label", "algorithm", "hyper-parameters", "budget"], rows, align_left=4, caption=(
        "From the resolved trial configs; where seeds or datasets differ (e.g. a schedule length filled in from "
        "the budget), every distinct setting is listed, separated by |."))


def _trainer_classes(names: set[str]) -> dict[str, type]:
    """The installed trainer classes of these algorithm names (those that load; a report needs none of them)."""
    from learnbench.registry import discover

    try:
        entries = discover().entries
    except UsageError:  # two plugins claiming one name: report without narrowing
        return {}
    return {name: entries[name].cls for name in names if name in entries and entries[name].cls is not None}


def _in_effect(cls: type | None, hparams: Any) -> Any:
    """`cls.hparams_in_effect(hparams)` where the class has one and it answers a mapping; else hparams as stored
    (the narrowing only shortens what the table shows: a plugin's hook that fails must not stop a report)."""
    narrow = getattr(cls, "hparams_in_effect", None)
    if not callable(narrow) or not isinstance(hparams, Mapping):
        return hparams
    try:
        shown = narrow(hparams)
    except Exception:  # noqa: BLE001 - any error in third-party code: show everything
        return hparams
    return shown if isinstance(shown, Mapping) else hparams


def _settings(d: Any) -> str:
    if not isinstance(d, Mapping):
        return "–"
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items()) if v is not None) or "–"


# --- provenance ----------------------------------------------------------------------------------------------
def provenance_section(data: ReportData) -> list[Block]:
    out: list[Block] = [Heading(2, "Provenance")]
    run_rows = [[str(r.get("run_dir", "")), suite_name(r.get("suite")) or "–",
                 str(r.get("learnbench", r.get("learnbench_version", r.get("version", "–")))),
                 _when(r.get("created"))] for r in data.runs]
    out.append(Table(["run", "suite", "learnbench", "created"], run_rows, align_left=4))
    rows = [[key, value] for key, value in _trial_provenance(data.trials)]
    finished = [t.finished for t in data.trials if isinstance(t.finished, (int, float))]
    if finished:
        rows.append(["trials finished", f"{_when(min(finished))} – {_when(max(finished))}"])
    plugins = _plugins(data.trials)
    if plugins:
        rows.append(["plugin distributions", plugins])
    rows.append(["report generated", dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")])
    out.append(Table(["what", "value"], rows, align_left=2, caption=(
        "From each trial's recorded provenance and config; where trials differ, every value is listed with the "
        "number of trials that had it.")))
    return out


def _when(stamp: Any) -> str:
    if isinstance(stamp, (int, float)):
        return dt.datetime.fromtimestamp(stamp).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return str(stamp) if stamp else "–"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, str]]:
    for key, value in d.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            text = "–" if value is None or value == "" else str(value)
            yield f"{prefix}{key}", text if len(text) <= 300 else text[:299] + "…"


def _trial_provenance(trials: Sequence[StoredTrial]) -> list[tuple[str, str]]:
    values: dict[str, dict[str, int]] = {}
    for t in trials:
        for key, value in _flatten({k: v for k, v in t.provenance.items() if k != "plugin"}):
            values.setdefault(key, {}).setdefault(value, 0)
            values[key][value] += 1
    rank = {k: i for i, k in enumerate(PROVENANCE_ORDER)}
    keys = sorted(values, key=lambda k: (rank.get(k.split(".")[0], len(rank)), k))
    return [(k, _distinct(values[k])) for k in keys]


def _distinct(counts: dict[str, int]) -> str:
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{v} ({n} trials)" for v, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _plugins(trials: Sequence[StoredTrial]) -> str:
    used: dict[str, set[str]] = {}
    for t in trials:  # what the worker actually imported (provenance), else what the config resolved
        plugin = t.provenance.get("plugin") or t.plugin or {}
        if isinstance(plugin, Mapping) and plugin.get("distribution"):
            name = f"{plugin['distribution']} {plugin.get('version', '')}".strip()
            used.setdefault(name, set()).add(t.algorithm)
    return "; ".join(f"{name} ({', '.join(sorted(algos))})" for name, algos in used.items())
