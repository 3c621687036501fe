"""Tidy tables of one or more runs for your own analysis: `learnbench.load_results` and `learnbench export`.

Three pandas DataFrames, read from `RUN_DIR/results.sqlite` only; a row belongs to a trial by (`trial`, `run_dir`)
(two run directories may hold the same trial id: the same experiment, run twice):

  trials   one row per trial: trial, run_dir, suite, label, algorithm, dataset, model (its label), seed, status,
           error, created, started, finished (UTC timestamps), device, unranked, budget.<limit> (steps, epochs,
           time_s, flops; NaN: no limit), tuning.<key> (`learnbench tune`'s mark; tuning.role is None for an
           ordinary trial), model.<key> (the spec), hp.<name> (every hyper-parameter), prov.<key> (the provenance
           the runner recorded, nested keys joined with dots: prov.torch, prov.git_commit, prov.plugin.version,
           prov.device, ...)
  metrics  long: trial, run_dir, name, value (final values; NaN where the value was not finite)
  curves   long: trial, run_dir, step, examples, flops, train_seconds, metric, value

A list or mapping (hp.betas, model.hidden) is written as its JSON text, and so is every value of a column whose values
are of several kinds (a number for one algorithm, a string for another), so each column has one type in Parquet and
CSV alike. pandas and pyarrow come with `pip install 'learnbench[export]'`; nothing else in learnbench needs them.
Writing goes to temporary files that replace the tables only once all three are written.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .store import Store
from .trial import CurvePoint, StoredTrial, Trial

if TYPE_CHECKING:  # pandas is imported when a table is built, so `learnbench show` never pays for it
    import pandas as pd

FORMATS = ("parquet", "csv")
TABLES = ("trials", "metrics", "curves")
KEY = ["trial", "run_dir"]
BASE_COLUMNS = [*KEY, "suite", "label", "algorithm", "dataset", "model", "seed", "status", "error", "created",
                "started", "finished", "device", "unranked", "budget.steps", "budget.epochs", "budget.time_s",
                "budget.flops", "tuning.role"]
TRIAL_TYPES = {**dict.fromkeys([*KEY, "label", "algorithm", "dataset", "model", "status", "device"], "str"),
               "seed": "int64", "unranked": "bool"}  # columns every trial fills
PREFIXES = ("tuning.", "model.", "hp.", "prov.")  # the order of the flattened columns after BASE_COLUMNS
METRIC_TYPES = {"trial": "str", "run_dir": "str", "name": "str", "value": "float64"}
CURVE_TYPES = {"trial": "str", "run_dir": "str", "step": "int64", "examples": "int64", "flops": "float64",
               "train_seconds": "float64", "metric": "str", "value": "float64"}
INSTALL = "pip install 'learnbench[export]'"


@dataclass(frozen=True, eq=False)
class Results:
    """The three tables of `load_results` (see the module docstring)."""

    trials: pd.DataFrame
    metrics: pd.DataFrame
    curves: pd.DataFrame

    def with_metrics(self, *names: str) -> pd.DataFrame:
        """The trials table with one column per final metric named (every metric when none is named)."""
        chosen = self.metrics[self.metrics["name"].isin(names)] if names else self.metrics
        wide = chosen.pivot(index=KEY, columns="name", values="value")
        wide = wide.reindex(columns=list(names) or list(wide.columns)).reset_index()
        wide.columns.name = None
        return self.trials.merge(wide, on=KEY, how="left")


def load_results(runs: str | os.PathLike | Iterable[str | os.PathLike]) -> Results:
    """The trials, final metrics and curves of one run directory or several, as pandas DataFrames."""
    pd = _pandas()
    trial_rows: list[dict[str, Any]] = []
    metric_rows: list[tuple] = []
    curve_rows: list[tuple] = []
    for run_dir in run_dirs(runs):
        store = Store.open(run_dir)  # UsageError: not a run directory, or not a readable store
        try:
            trials, curves = store.trials(), store.curves()
        finally:
            store.close()
        for trial in trials:
            trial_rows.append(trial_row(trial, run_dir))
            metric_rows += [(trial.id, run_dir, name, value) for name, value in trial.metrics.items()]
            curve_rows += [(trial.id, run_dir, *point) for point in curves.get(trial.id, ())]
    metrics = pd.DataFrame(metric_rows, columns=list(METRIC_TYPES)).astype(METRIC_TYPES)
    curves_frame = pd.DataFrame(curve_rows, columns=list(CURVE_TYPES)).astype(CURVE_TYPES)
    return Results(_trials_frame(pd, trial_rows), metrics, curves_frame)


def run_dirs(runs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """The run directories asked for, each once, in the order given."""
    given = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
    seen: dict[Path, str] = {}
    for run in given:
        seen.setdefault(Path(run).resolve(), str(run))
    if not seen:
        raise UsageError("no run directory given")
    return list(seen.values())


def trial_row(trial: StoredTrial, run_dir: str) -> dict[str, Any]:
    """One row of the trials table, before its columns are made of one type each."""
    row: dict[str, Any] = {
        "trial": trial.id, "run_dir": run_dir, "suite": trial.suite, "label": trial.label,
        "algorithm": trial.algorithm, "dataset": trial.dataset, "model": trial.model_label, "seed": trial.seed,
        "status": trial.status, "error": trial.error, "created": trial.created, "started": trial.started,
        "finished": trial.finished, "device": trial.device, "unranked": trial.unranked, "tuning.role": None}
    row.update({f"budget.{k}": v for k, v in dataclasses.asdict(trial.budget).items()})
    row.update({f"tuning.{k}": v for k, v in (trial.tuning or {}).items()})
    row.update({f"model.{k}": v for k, v in trial.model.items()})
    row.update({f"hp.{k}": v for k, v in trial.hparams.items()})
    return _flatten("prov", trial.provenance, row) if trial.provenance else row  # a pending trial has none


def trial_config(trial: StoredTrial) -> dict[str, Any]:
    """The trial's config JSON as the store holds it (`Trial.config()`), without the stored state."""
    return Trial(**{f.name: getattr(trial, f.name) for f in dataclasses.fields(Trial)}).config()


def curves_json(points: Iterable[CurvePoint]) -> dict[str, dict[str, list]]:
    """{metric: {"step": [...], "examples": [...], "flops": [...], "train_seconds": [...], "value": [...]}}, in
    step order; a value that is not finite is None (JSON has no NaN)."""
    out: dict[str, dict[str, list]] = {}
    for point in points:
        columns = out.setdefault(point.metric, {k: [] for k in ("step", "examples", "flops", "train_seconds",
                                                                "value")})
        for name in columns:
            value = getattr(point, name)
            columns[name].append(None if isinstance(value, float) and not math.isfinite(value) else value)
    return out


def export(runs: Iterable[str], fmt: str = "parquet", out: str | None = None) -> list[Path]:
    """`learnbench export`: write trials, metrics and curves of the runs into `out` (default RUN_DIR/export for
    one run); returns the paths written. UsageError before anything is written on bad input."""
    dirs = run_dirs(runs)
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if out is None and len(dirs) > 1:
        raise UsageError("--out is required when exporting several run directories")
    if fmt == "parquet":
        _require_pyarrow()
    results = load_results(dirs)
    return write(results, Path(out) if out is not None else Path(dirs[0]) / "export", fmt)


def write(results: Results, out: Path, fmt: str) -> list[Path]:
    """The three tables as `out/<table>.<fmt>`: each written to a temporary file first, all three put in place only
    when every one is written; on failure nothing is left behind (not even `out`, if this call made it)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"the export folder {out} exists and is not a folder")
    made = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
    temps: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for table in TABLES:
            temps.append(out / f".{table}.{fmt}.{os.getpid()}.tmp")
            frame = getattr(results, table)
            if fmt == "parquet":
                frame.to_parquet(temps[-1], engine="pyarrow", index=False)
            else:
                frame.to_csv(temps[-1], index=False)
        targets = [out / f"{table}.{fmt}" for table in TABLES]
        for temp, target in zip(temps, targets):
            os.replace(temp, target)
    except BaseException as exc:
        _remove(temps, made)
        if isinstance(exc, OSError):
            raise UsageError(f"cannot write the export to {out}: {exc.strerror or exc}") from None
        raise
    return targets


def _remove(temps: list[Path], folders: list[Path]) -> None:
    """Undo a failed `write`: its temporary files, then the folders it made, if they are empty."""
    for temp in temps:
        temp.unlink(missing_ok=True)
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _trials_frame(pd: Any, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows of possibly different columns -> one frame: BASE_COLUMNS, then each prefix's columns sorted; a column
    holds one type; timestamps are UTC; budget limits are floats."""
    names = {name for row in rows for name in row}
    columns = BASE_COLUMNS + [n for p in PREFIXES for n in sorted(names) if n.startswith(p) and n not in BASE_COLUMNS]
    frame = pd.DataFrame({name: _one_type([row.get(name) for row in rows]) for name in columns}, columns=columns)
    for name in ("created", "started", "finished"):  # epoch seconds -> microseconds, the store's precision
        frame[name] = pd.to_datetime((frame[name].astype("float64") * 1e6).round(), unit="us", utc=True)
    budget = [n for n in BASE_COLUMNS if n.startswith("budget.")]
    frame[budget] = frame[budget].astype("float64")  # a limit is a number or NaN (none), in every run alike
    return frame.astype(TRIAL_TYPES)  # the same types when there is no trial at all


def _one_type(values: list[Any]) -> list[Any]:
    """Values of one column, as they are when they are all numbers, all bools or all strings; else as text (JSON
    for lists, mappings and values of mixed kinds)."""
    kinds = {_kind(v) for v in values if v is not None}
    if len(kinds) <= 1 and "json" not in kinds:
        return values
    return [v if v is None or isinstance(v, str) else json.dumps(v, sort_keys=True) for v in values]


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "str" if isinstance(value, str) else "json"


def _flatten(prefix: str, value: Any, into: dict[str, Any]) -> dict[str, Any]:
    """`{"plugin": {"version": "1"}}` under `prov` -> `{"prov.plugin.version": "1"}`."""
    if isinstance(value, Mapping) and value:
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}", inner, into)
    else:
        into[prefix] = value
    return into


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise UsageError(f"loading results as tables needs pandas, which is not installed: {INSTALL}") from None
    return pandas


def _require_pyarrow() -> None:
    try:
        importlib.import_module("pyarrow")  # pandas' Parquet engine
    except ImportError:
        raise UsageError(f"--format parquet needs pyarrow, which is not installed: {INSTALL}, or use --format csv"
                         ) from None
