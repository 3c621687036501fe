"""Loading one or more run directories into the in-memory view every report section reads.

Several runs (the same suite on different days or machines) merge into one `ReportData`: trials are keyed by their
id (the hash of the resolved config), so a trial present in two runs counts once. When the copies disagree, the one
that got furthest wins (done > diverged > failed > running > pending); a tie keeps the run given first.
Each kept trial is a `ReportTrial`: the store's `StoredTrial` with the curves of the run it was kept from
(metric -> `Curve`) beside its final metrics, so every section reads a trial's curves as `trial.curves[metric]`.
Only `results.sqlite` is read (through `learnbench.store.Store`); nothing is retrained or re-evaluated.

Trials of `learnbench tune` (`Trial.tuning`): the search configurations are set apart (`ReportData.search`, read
only by the Tuning section, `tuning.py`), so no main table, curve, test or profile includes them; the suite's own
trials of an entry that was tuned are shown as `LABEL (default)` beside `LABEL (tuned)` (`display_labels`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import numpy as np

from learnbench.store import Store
from learnbench.trial import CurvePoint, StoredTrial

AXES = ("seconds", "examples", "flops")  # the cost axes every curve carries (never raw steps)
AXIS_TITLES = {"seconds": "training seconds", "examples": "examples seen", "flops": "nominal FLOPs"}
COST_METRICS = {"seconds": "cost/train_seconds", "examples": "cost/examples", "flops": "cost/flops"}
_STATUS_RANK = {"done": 4, "diverged": 3, "failed": 2, "running": 1, "pending": 0}

T = TypeVar("T", bound=StoredTrial)


@dataclass(frozen=True, eq=False)
class Curve:
    """One metric's history in one trial, sorted by step; every array has shape [K] (K evaluation points)."""

    step: np.ndarray
    seconds: np.ndarray
    examples: np.ndarray
    flops: np.ndarray
    value: np.ndarray

    def x(self, axis: str) -> np.ndarray:
        return getattr(self, axis)


@dataclass(frozen=True)
class ReportTrial(StoredTrial):
    """A stored trial with the curves the report read for it (metric -> Curve; empty when none were read)."""

    curves: Mapping[str, Curve] = field(default_factory=dict)

    @classmethod
    def of(cls, trial: StoredTrial, curves: Mapping[str, Curve] | None = None) -> ReportTrial:
        """`trial`'s fields (a StoredTrial's, whatever its class) with these curves."""
        return cls(**{f.name: getattr(trial, f.name) for f in fields(StoredTrial)}, curves=curves or {})


@dataclass(frozen=True)
class ReportData:
    """Merged trials (with their curves), and each run's `run_info()` and directory."""

    trials: list[ReportTrial]
    runs: list[dict[str, Any]] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)
    search: list[ReportTrial] = field(default_factory=list)
    """Tuning search configurations (`learnbench tune`): only the Tuning section reads them."""

    def labels(self) -> list[str]:
        """Algorithm labels in order of first appearance (suite order): fixes each label's colour."""
        return list(dict.fromkeys(t.label for t in self.trials))


def load_runs(run_dirs: Iterable[str | Path], curves: bool | tuple[str, ...] = True) -> ReportData:
    """Open every run directory (UsageError if one is not a run), merge trials by id, read curves: all of them,
    none (False), or only the named metrics' (a tuple: the README reads one curve, not every probe's)."""
    kept: dict[str, tuple[StoredTrial, int]] = {}  # trial id -> (the copy kept, index of the run it came from)
    runs, dirs, stores = [], [], []
    for index, run_dir in enumerate(run_dirs):
        store = Store.open(run_dir)
        stores.append(store)
        dirs.append(Path(run_dir))
        runs.append({**store.run_info(), "run_dir": str(run_dir)})
        for trial in store.trials():
            old = kept.get(trial.id)
            if old is None or _STATUS_RANK.get(trial.status, -1) > _STATUS_RANK.get(old[0].status, -1):
                kept[trial.id] = (trial, index)
    try:
        read = _read_curves(kept, stores, None if curves is True else curves) if curves else {}
    finally:
        for store in stores:
            store.close()
    trials, search = split_search(display_labels([ReportTrial.of(t, read.get(t.id)) for t, _ in kept.values()]))
    return ReportData(trials, runs, dirs, search)


def split_search(trials: Sequence[T]) -> tuple[list[T], list[T]]:
    """(the trials the main sections read, the tuning search configurations)."""
    return [t for t in trials if not t.is_search], [t for t in trials if t.is_search]


def display_labels(trials: Sequence[T]) -> list[T]:
    """The trials with the suite's own trials of each tuned entry (problem and label) labelled `LABEL (default)`
    (`learnbench tune` keeps them identical to `run`'s, so their stored label is the entry's); a reference named by
    such a label follows it."""
    tuned = {(t.dataset, t.model_label, t.tuning.get("entry")) for t in trials if t.tuning}
    renamed = {(t.dataset, t.model_label, t.label) for t in trials if t.tuning is None} & tuned
    out = []
    for t in trials:
        changes = {}
        if t.tuning is None and (t.dataset, t.model_label, t.label) in renamed:
            changes["label"] = f"{t.label} (default)"
        if (t.dataset, t.model_label, t.reference) in renamed:
            changes["reference"] = f"{t.reference} (default)"
        out.append(replace(t, **changes) if changes else t)
    return out


def _read_curves(kept: Mapping[str, tuple[StoredTrial, int]], stores: list[Store],
                 metrics: tuple[str, ...] | None) -> dict[str, dict[str, Curve]]:
    """{trial id: {metric: Curve}} of the kept trials, each from the run it was kept from; each store is read once
    (every metric, or only `metrics`)."""
    points: dict[str, dict[str, list[CurvePoint]]] = {}
    for index, store in enumerate(stores):
        for trial_id, trial_points in _store_curves(store, metrics):
            if trial_id in kept and kept[trial_id][1] == index:
                for point in trial_points:
                    points.setdefault(trial_id, {}).setdefault(point.metric, []).append(point)
    return {trial_id: {metric: _curve(p) for metric, p in by_metric.items()} for trial_id, by_metric in points.items()}


def _store_curves(store: Store, metrics: tuple[str, ...] | None) -> Iterable[tuple[str, list[CurvePoint]]]:
    if metrics is None:
        yield from store.curves().items()
    for metric in metrics or ():
        yield from store.curves(metric=metric).items()


def _curve(points: list[CurvePoint]) -> Curve:
    arr = np.array([(p.step, p.train_seconds, p.examples, p.flops, p.value) for p in points], dtype=float)  # [K, 5]
    arr = arr[np.argsort(arr[:, 0], kind="stable")]
    return Curve(*(arr[:, i] for i in range(5)))


def done(group: Sequence[T]) -> list[T]:
    return [t for t in group if t.status == "done"]


def metric_values(group: Sequence[StoredTrial], name: str) -> np.ndarray:
    """The finite values of a final metric over the done trials of a group: [n]."""
    vals = [t.metrics.get(name) for t in done(group)]
    return np.array([v for v in vals if v is not None and np.isfinite(v)], dtype=float)


def status_counts(group: Sequence[StoredTrial]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in group:
        counts[t.status] = counts.get(t.status, 0) + 1
    return counts


def status_text(group: Sequence[StoredTrial]) -> str:
    """`3 done` or `2 done, 1 failed`, in a fixed status order."""
    counts = status_counts(group)
    order = sorted(counts, key=lambda s: -_STATUS_RANK.get(s, -1))
    return ", ".join(f"{counts[s]} {s}" for s in order)


def unsuccessful(trials: Sequence[T]) -> list[T]:
    """Trials that did not finish cleanly (failed, diverged, or left running/pending): never dropped silently."""
    return [t for t in trials if t.status != "done"]


def first_line(text: str | None) -> str:
    """The most telling line of an error: the last non-empty line of a traceback (the exception), else the first."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    if not lines:
        return "(no error message)"
    if lines[0].startswith("Traceback"):
        return lines[-1]
    return lines[0]


def trouble(trial: StoredTrial) -> str:
    """What to say about a trial that is not done: its error, or why it has none (not started yet, still running)."""
    if trial.error:
        return first_line(trial.error)
    return {"pending": "not started yet", "running": "still running, or interrupted (a rerun resumes it)"}.get(
        trial.status, "(no error message)")


def metric_names(trials: Sequence[StoredTrial], prefix: str) -> list[str]:
    """Final-metric names starting with prefix, in first-appearance order."""
    return list(dict.fromkeys(n for t in trials for n in t.metrics if n.startswith(prefix)))


def curve_names(trials: Sequence[ReportTrial], prefix: str) -> list[str]:
    return list(dict.fromkeys(n for t in trials for n in t.curves if n.startswith(prefix)))


def slug(*parts: str) -> str:
    """A file-name-safe id for figure files: lowercase letters, digits, '-' and '_'."""
    text = "-".join(parts).lower()
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text).strip("_") or "figure"


def suite_names(data: ReportData) -> list[str]:
    names = [suite_name(r.get("suite")) for r in data.runs]
    names += [t.suite for t in data.trials if isinstance(t.suite, str)]
    return list(dict.fromkeys(n for n in names if n))


def suite_name(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("name")
    return value if isinstance(value, str) else None
