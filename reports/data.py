"""Loading one or more run directories into the in-memory view every report section reads.

Several runs (the same suite on different days or machines) merge into one `ReportData`: trials are keyed by their
id (the hash of the resolved config), so a trial present in two runs counts once. When the copies disagree, the one
that got furthest wins (done > diverged > failed > running > pending); a tie keeps the run given first.
Only `results.sqlite` is read (through `learnbench.store.Store`); nothing is retrained or re-evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from learnbench.store import Store

AXES = ("seconds", "examples", "flops")  # the cost axes every curve carries (never raw steps)
AXIS_TITLES = {"seconds": "training seconds", "examples": "examples seen", "flops": "FLOPs"}
COST_METRICS = {"seconds": "cost/train_seconds", "examples": "cost/examples", "flops": "cost/flops"}
ACCURACY = "test/accuracy"
_STATUS_RANK = {"done": 4, "diverged": 3, "failed": 2, "running": 1, "pending": 0}


@dataclass
class Curve:
    """One metric's history in one trial, sorted by step; every array has shape [K] (K evaluation points)."""

    step: np.ndarray
    seconds: np.ndarray
    examples: np.ndarray
    flops: np.ndarray
    value: np.ndarray

    def x(self, axis: str) -> np.ndarray:
        return getattr(self, axis)


@dataclass
class ReportData:
    """Merged trials (store dicts plus a `curves` dict metric -> Curve), and each run's `run_info()`."""

    trials: list[dict[str, Any]]
    runs: list[dict[str, Any]] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)

    def labels(self) -> list[str]:
        """Algorithm labels in order of first appearance (suite order): fixes each label's colour."""
        return list(dict.fromkeys(t["label"] for t in self.trials))

    def problems(self) -> list[tuple[str, str]]:
        """(dataset, model) pairs in order of first appearance."""
        return list(dict.fromkeys((t["dataset"], t["model"]) for t in self.trials))


def load_runs(run_dirs: Iterable[str | Path], curves: bool = True) -> ReportData:
    """Open every run directory (UsageError if one is not a run), merge trials by id, attach curves."""
    kept: dict[str, tuple[dict[str, Any], int]] = {}
    runs, dirs, stores = [], [], []
    for index, run_dir in enumerate(run_dirs):
        store = Store.open(run_dir)
        stores.append(store)
        dirs.append(Path(run_dir))
        runs.append({**store.run_info(), "run_dir": str(run_dir)})
        for trial in store.trials():
            old = kept.get(trial["id"])
            if old is None or _STATUS_RANK.get(trial["status"], -1) > _STATUS_RANK.get(old[0]["status"], -1):
                kept[trial["id"]] = (trial, index)
    try:
        if curves:
            _attach_curves(kept, stores)
    finally:
        for store in stores:
            store.close()
    return ReportData(trials=[t for t, _ in kept.values()], runs=runs, run_dirs=dirs)


def _attach_curves(kept: dict[str, tuple[dict[str, Any], int]], stores: list[Store]) -> None:
    """Read each store's curves once and hand each kept trial the rows of the run it was kept from."""
    wanted: list[dict[str, set[str]]] = [{} for _ in stores]
    for trial_id, (trial, index) in kept.items():
        trial["curves"] = {}
        wanted[index][trial_id] = set()
    for index, store in enumerate(stores):
        rows: dict[tuple[str, str], list[tuple]] = {}
        for r in store.curves():
            if r["trial"] in wanted[index]:
                rows.setdefault((r["trial"], r["metric"]), []).append(
                    (r["step"], r["train_seconds"], r["examples"], r["flops"], r["value"]))
        for (trial_id, metric), points in rows.items():
            kept[trial_id][0]["curves"][metric] = _curve(points)


def _curve(points: list[tuple]) -> Curve:
    arr = np.array(points, dtype=float)  # [K, 5]: step, seconds, examples, flops, value
    arr = arr[np.argsort(arr[:, 0], kind="stable")]
    return Curve(*(arr[:, i] for i in range(5)))


def by_problem(trials: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, list[dict[str, Any]]]]:
    """{(dataset, model): {label: [trials, in seed order]}}, keeping first-appearance order."""
    out: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for t in trials:
        out.setdefault((t["dataset"], t["model"]), {}).setdefault(t["label"], []).append(t)
    for labels in out.values():
        for group in labels.values():
            group.sort(key=lambda t: t["seed"])
    return out


def done(group: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in group if t["status"] == "done"]


def metric_values(group: list[dict[str, Any]], name: str) -> np.ndarray:
    """The finite values of a final metric over the done trials of a group: [n]."""
    vals = [t["metrics"].get(name) for t in done(group)]
    return np.array([v for v in vals if v is not None and np.isfinite(v)], dtype=float)


def status_counts(group: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in group:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    return counts


def status_text(group: list[dict[str, Any]]) -> str:
    """`3 done` or `2 done, 1 failed`, in a fixed status order."""
    counts = status_counts(group)
    order = sorted(counts, key=lambda s: -_STATUS_RANK.get(s, -1))
    return ", ".join(f"{counts[s]} {s}" for s in order)


def unsuccessful(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials that did not finish cleanly (failed, diverged, or left running/pending): never dropped silently."""
    return [t for t in trials if t["status"] != "done"]


def first_line(text: str | None) -> str:
    """The most telling line of an error: the last non-empty line of a traceback (the exception), else the first."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    if not lines:
        return "(no error message)"
    if lines[0].startswith("Traceback"):
        return lines[-1]
    return lines[0]


def metric_names(trials: list[dict[str, Any]], prefix: str) -> list[str]:
    """Final-metric names starting with prefix, in first-appearance order."""
    return list(dict.fromkeys(n for t in trials for n in t["metrics"] if n.startswith(prefix)))


def curve_names(trials: list[dict[str, Any]], prefix: str) -> list[str]:
    return list(dict.fromkeys(n for t in trials for n in t.get("curves", {}) if n.startswith(prefix)))


def slug(*parts: str) -> str:
    """A file-name-safe id for figure files: lowercase letters, digits, '-' and '_'."""
    text = "-".join(parts).lower()
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text).strip("_") or "figure"


def suite_names(data: ReportData) -> list[str]:
    names = [suite_name(r.get("suite")) for r in data.runs]
    names += [t["config"].get("suite") for t in data.trials if isinstance(t["config"].get("suite"), str)]
    return list(dict.fromkeys(n for n in names if n))


def suite_name(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("name")
    return value if isinstance(value, str) else None
