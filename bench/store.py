"""The results store: `RUN_DIR/results.sqlite` (SQLite in WAL mode), the single source every report reads.

Tables
  run      (key, value)                       suite name, resolved suite JSON, learnbench version, created
  trials   (id, label, algorithm, dataset, model, seed, config, status, error, created, started, finished,
            provenance)                        one row per trial; `config` is the resolved config JSON whose hash
                                               is `id`; `status` is pending|running|done|failed|diverged
  curves   (trial, step, examples, flops, train_seconds, metric, value)   learning curves and diagnostics
  metrics  (trial, name, value)               final values: test/accuracy, cost/flops, robust/pgd-linf/0.1, ...

A finished trial's status, curves and metrics are written in one transaction, so a crash or a SIGKILL never
leaves half a trial: rerunning the same command skips `done` and `diverged` trials and reruns the rest.
Only the driver process writes; workers send results back to it.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

from .errors import UsageError
from .trial import STATUSES, CurvePoint, StoredTrial, Trial, TrialResult

DB_NAME = "results.sqlite"
FINISHED = ("done", "diverged")  # skipped on resume; failed, running and pending trials run again

SCHEMA = """
CREATE TABLE IF NOT EXISTS run (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS trials (
    id TEXT PRIMARY KEY, label TEXT NOT NULL, algorithm TEXT NOT NULL, dataset TEXT NOT NULL,
    model TEXT NOT NULL, seed INTEGER NOT NULL, config TEXT NOT NULL, status TEXT NOT NULL,
    error TEXT, created REAL, started REAL, finished REAL, provenance TEXT);
CREATE TABLE IF NOT EXISTS curves (
    trial TEXT NOT NULL, step INTEGER, examples INTEGER, flops REAL, train_seconds REAL,
    metric TEXT NOT NULL, value REAL);
CREATE INDEX IF NOT EXISTS curves_trial ON curves (trial, metric);
CREATE TABLE IF NOT EXISTS metrics (trial TEXT NOT NULL, name TEXT NOT NULL, value REAL,
    PRIMARY KEY (trial, name));
"""


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / DB_NAME).is_file()


class Store:
    """A connection to one run's results. Open with `Store(run_dir)` (creating) or `Store.open(run_dir)`
    (read-only use; raises UsageError when the folder is not a run)."""

    def __init__(self, run_dir: str | Path, create: bool = True):
        self.run_dir = Path(run_dir)
        path = self.run_dir / DB_NAME
        if not create and not path.is_file():
            raise UsageError(f"{run_dir} is not a learnbench run directory (no {DB_NAME})")
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)  # autocommit; explicit BEGINs below
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            if create:
                self.db.executescript(SCHEMA)
            else:
                self.db.execute("SELECT 1 FROM trials LIMIT 1")
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise UsageError(f"{path} is not a readable learnbench results store: {exc}") from None

    @classmethod
    def open(cls, run_dir: str | Path) -> "Store":
        return cls(run_dir, create=False)

    def close(self) -> None:
        self.db.close()

    # --- writing (driver only) -------------------------------------------------------------------------------
    def set_run_info(self, info: dict[str, Any]) -> None:
        with self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO run (key, value) VALUES (?, ?)",
                                [(k, json.dumps(v)) for k, v in info.items()])

    def add_trials(self, trials: Iterable[Trial]) -> None:
        """Register trials as pending; trials already in the store keep their status."""
        now = time.time()
        rows = [(t.id, t.label, t.algorithm, t.dataset, t.model_label, t.seed,
                 json.dumps(t.config(), sort_keys=True), now) for t in trials]
        with self._transaction():
            self.db.executemany(
                "INSERT OR IGNORE INTO trials (id, label, algorithm, dataset, model, seed, config, status, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?)", rows)

    def mark_running(self, trial_id: str) -> None:
        with self._transaction():
            self.db.execute("UPDATE trials SET status='running', started=? WHERE id=?", (time.time(), trial_id))

    def finish_trial(self, result: TrialResult) -> None:
        """Write a trial's final state in one transaction; old curves/metrics of an earlier attempt go."""
        assert result.status in STATUSES, result.status
        trial_id = result.id
        with self._transaction():
            self.db.execute("DELETE FROM curves WHERE trial=?", (trial_id,))
            self.db.execute("DELETE FROM metrics WHERE trial=?", (trial_id,))
            self.db.execute("UPDATE trials SET status=?, error=?, finished=?, provenance=? WHERE id=?",
                            (result.status, result.error, time.time(),
                             json.dumps(dict(result.provenance), sort_keys=True), trial_id))
            self.db.executemany("INSERT INTO metrics (trial, name, value) VALUES (?, ?, ?)",
                                [(trial_id, k, _finite_or_none(v)) for k, v in result.metrics.items()])
            self.db.executemany(
                "INSERT INTO curves (trial, step, examples, flops, train_seconds, metric, value)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)", [(trial_id, *point) for point in result.curves])

    def add_metrics(self, trial_id: str, metrics: dict[str, float]) -> None:
        """Add or replace some final metrics of a finished trial (post-run phases such as transfer attacks)."""
        with self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO metrics (trial, name, value) VALUES (?, ?, ?)",
                                [(trial_id, k, _finite_or_none(v)) for k, v in metrics.items()])

    def _transaction(self):
        return _Transaction(self.db)

    # --- reading ---------------------------------------------------------------------------------------------
    def run_info(self) -> dict[str, Any]:
        return {r["key"]: json.loads(r["value"]) for r in self.db.execute("SELECT key, value FROM run")}

    def trials(self, status: str | None = None) -> list[StoredTrial]:
        """Every trial (its config's fields, state, final metrics and provenance), in creation order."""
        query = "SELECT * FROM trials" + (" WHERE status=?" if status else "") + " ORDER BY created, rowid"
        rows = self.db.execute(query, (status,) if status else ()).fetchall()
        metrics: dict[str, dict[str, float]] = {}
        for m in self.db.execute("SELECT trial, name, value FROM metrics"):
            metrics.setdefault(m["trial"], {})[m["name"]] = m["value"]
        return [StoredTrial(**Trial.from_config(json.loads(r["config"])).__dict__, status=r["status"],
                            error=r["error"], metrics=metrics.get(r["id"], {}),
                            provenance=json.loads(r["provenance"]) if r["provenance"] else {},
                            created=r["created"], started=r["started"], finished=r["finished"]) for r in rows]

    def statuses(self) -> dict[str, str]:
        return {r["id"]: r["status"] for r in self.db.execute("SELECT id, status FROM trials")}

    def curves(self, trial_id: str | None = None, metric: str | None = None) -> dict[str, list[CurvePoint]]:
        """{trial id: its curve points in step order}, optionally of one trial and one metric."""
        clauses, args = [], []
        if trial_id is not None:
            clauses.append("trial=?"), args.append(trial_id)
        if metric is not None:
            clauses.append("metric=?"), args.append(metric)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        out: dict[str, list[CurvePoint]] = {}
        query = (f"SELECT trial, step, examples, flops, train_seconds, metric, value FROM curves{where} "
                 "ORDER BY trial, step")
        for row in self.db.execute(query, args):
            out.setdefault(row[0], []).append(CurvePoint(*row[1:]))
        return out


class _Transaction:
    """`BEGIN IMMEDIATE ... COMMIT`, rolled back on any exception (the connection is in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _finite_or_none(value: Any) -> float | None:
    value = float(value) if value is not None else None
    return value if value is not None and math.isfinite(value) else None
