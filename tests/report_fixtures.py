"""Synthetic results stores for the report tests: written through `learnbench.store.Store`, as the runner
writes them, with numbers the tests know in advance; and the helpers that read the generated Markdown back."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from learnbench.reports.data import Curve, ReportTrial
from learnbench.store import Store
from learnbench.trial import CurvePoint, Trial, TrialResult

PROVENANCE = {"learnbench": "0.1.0", "git_commit": "0123456789abcdef0123", "python": "3.11.2", "torch": "2.13.0",
              "numpy": "2.4.6", "deap": "1.4.1", "device": "cpu", "threads": 1}


def trial_config(label: str, algorithm: str, seed: int, dataset: str = "digits", model: str = "mlp-64x1",
                 suite: str = "synthetic", **extra: Any) -> Trial:
    """A resolved trial from a config written out here (keys as in `Trial.config()`; `extra` overrides any), its id
    the hash of that config."""
    cfg = {"suite": suite, "label": label, "algorithm": algorithm, "hparams": {"lr": 0.01}, "dataset": dataset,
           "model": {"kind": "mlp", "hidden": [64]}, "model_label": model, "seed": seed,
           "budget": {"steps": None, "epochs": 20, "time_s": None, "flops": None}, "device": "cpu",
           "plugin": {"distribution": "learnbench", "version": "0.1.0"}, **extra}
    cfg["id"] = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    return Trial.from_config(cfg)


def write_trial(store: Store, trial: Trial, status: str = "done", metrics: dict[str, float] | None = None,
                curves: dict[str, list[tuple[float, float, float, float]]] | None = None,
                error: str | None = None) -> None:
    """Register the trial and write its result, as the runner does. curves: metric -> [(seconds, examples, flops,
    value)] in step order."""
    store.add_trials([trial])
    points = tuple(CurvePoint(step, ex, fl, sec, metric, val)
                   for metric, rows in (curves or {}).items() for step, (sec, ex, fl, val) in enumerate(rows))
    store.finish_trial(TrialResult(trial.id, status, error, metrics or {}, points, PROVENANCE))


def report_trial(trial: Trial, status: str = "done", curves: dict[str, Curve] | None = None) -> ReportTrial:
    """A trial as the report reads it, without a store: its state and curves given here."""
    return ReportTrial(**trial.__dict__, status=status, curves=curves or {})


ALGORITHMS = [  # label, algorithm, final accuracy, speed (fraction of budget to plateau), FLOPs per example
    ("backprop-adam", "backprop", 0.975, 0.15, 3.0e5), ("backprop-sgd", "backprop", 0.962, 0.35, 3.0e5),
    ("fa", "fa", 0.951, 0.40, 3.0e5), ("dfa", "dfa", 0.944, 0.45, 3.0e5),
    ("kolen-pollack", "kolen-pollack", 0.958, 0.30, 3.2e5), ("openai-es", "openai-es", 0.88, 0.60, 2.6e7),
    ("snes", "snes", 0.86, 0.65, 2.6e7), ("cma-es", "cma-es", 0.83, 0.70, 1.2e7), ("ga", "ga", 0.80, 0.75, 2.6e7)]
FA_FAMILY = {"fa", "dfa", "kolen-pollack"}


def realistic_store(run_dir: Path, seeds: int = 3, points: int = 20) -> Store:
    """About 30 trials of 9 algorithms on digits (plus backprop on mnist1d), curves of `points` evaluations,
    robustness at four epsilons, masking flags, alignment and gradient probes, one failed and one diverged."""
    rng = np.random.default_rng(0)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    store = Store(run_dir)
    store.set_run_info({"suite": "quick", "learnbench": "0.1.0", "created": 1.7e9})
    for label, algo, acc, speed, fpe in ALGORITHMS:
        for seed in range(seeds):
            trial = trial_config(label, algo, seed, suite="quick")
            if label == "ga" and seed == 2:
                write_trial(store, trial, "failed", error="Traceback (most recent call last):\n  File x\n"
                            "RuntimeError: population <script>alert(1)</script> collapsed")
                continue
            if label == "dfa" and seed == 1:
                write_trial(store, trial, "diverged", error="non-finite loss at step 412",
                            metrics={"test/accuracy": 0.1})
                continue
            write_trial(store, trial, **_synthetic_run(rng, label, acc, speed, fpe, points))
    for seed in range(seeds):
        trial = trial_config("backprop-adam", "backprop", seed, dataset="mnist1d", suite="quick")
        write_trial(store, trial, **_synthetic_run(rng, "backprop-adam", 0.82, 0.3, 4e5, points))
    return store


def _synthetic_run(rng: np.random.Generator, label: str, acc: float, speed: float, fpe: float, points: int) -> dict[str, Any]:
    seconds = np.cumsum(rng.uniform(0.8, 1.2, points)) * (3 if fpe > 1e6 else 1)  # [K]
    examples = np.linspace(1, points, points) * 7200.0
    flops = examples * fpe
    frac = np.linspace(1 / points, 1, points)
    final = float(np.clip(acc + rng.normal(0, 0.004), 0, 1))
    value = np.clip(0.1 + (final - 0.1) * (1 - np.exp(-frac / (speed / 3))) + rng.normal(0, 0.003, points), 0, 1)
    value[-1] = final
    val = np.clip(value + rng.normal(0.005, 0.003, points), 0, 1)  # the validation split: close, not equal
    curves = {"test/accuracy": list(zip(seconds, examples, flops, value)),
              "val/accuracy": list(zip(seconds, examples, flops, val))}
    metrics = {"test/accuracy": final, "val/accuracy": float(val[-1]), "cost/train_seconds": float(seconds[-1]),
               "cost/flops": float(flops[-1]), "cost/examples": float(examples[-1]), "robust/clean": final}
    for attack, strength in (("fgsm", 2.5), ("pgd-linf", 3.5)):
        for eps in (0.05, 0.1, 0.2, 0.3):
            metrics[f"robust/{attack}/{eps:g}"] = final * float(np.exp(-strength * eps * 4))
    metrics["flag/masking/zero-grad"] = float(label == "ga" and rng.random() < 0.7)
    if label in FA_FAMILY:
        for eps in (0.05, 0.1, 0.2, 0.3):
            metrics[f"robust/pgd-linf-pseudo/{eps:g}"] = final * float(np.exp(-1.5 * eps * 4))
        for kind in ("update-grad", "B-W"):
            for layer in (0, 1):
                angle = 85 - 50 * (1 - np.exp(-frac * 4)) + rng.normal(0, 1.5, points) + 10 * layer
                curves[f"align/{kind}/{layer}"] = list(zip(seconds, examples, flops, angle))
                metrics[f"align/{kind}/{layer}"] = float(angle[-1])
    if label.startswith("backprop"):
        for layer in (0, 1):
            norm = np.exp(-frac * 2) * (1 + layer) + rng.normal(0, 0.02, points)
            curves[f"grad/norm/{layer}"] = list(zip(seconds, examples, flops, norm))
            metrics[f"grad/norm/{layer}"] = float(norm[-1])
        metrics["flag/vanishing"] = 0.0
    return {"metrics": metrics, "curves": curves}


# --- fairness: several problems, budgets and unranked entries with hand-written validation curves -----------------
TIME_300, TIME_900 = {"steps": None, "epochs": None, "time_s": 300, "flops": None}, \
    {"steps": None, "epochs": None, "time_s": 900, "flops": None}
STEPS_100 = {"steps": 100, "epochs": None, "time_s": None, "flops": None}
EPOCHS_5 = {"steps": None, "epochs": 5, "time_s": None, "flops": None}
TEST_GAP = 0.03  # every test curve is its validation curve minus this: a report reading the wrong one is caught


@dataclass(frozen=True)
class Entry:
    """One label on one problem: a validation curve per seed [(seconds, examples, flops, value)], None = failed."""

    dataset: str
    model: str
    budget: dict[str, Any]
    label: str
    algorithm: str
    seeds: tuple
    unranked: bool = False


FAIR_ENTRIES = (
    # toy2 / cnn under 5 epochs comes first in the store; es never ran on it
    Entry("toy2", "cnn", EPOCHS_5, "bp", "backprop", (
        [(0, 0, 0, 0.10), (5, 1000, 1e9, 0.60), (10, 2000, 2e9, 0.80)],
        [(0, 0, 0, 0.10), (6, 1000, 1e9, 0.70), (12, 2000, 2e9, 0.90)])),
    Entry("toy2", "cnn", EPOCHS_5, "ga", "ga", (
        [(0, 0, 0, 0.10), (20, 1000, 1e10, 0.78), (40, 2000, 2e10, 0.79)],
        [(0, 0, 0, 0.10), (25, 1000, 1e10, 0.77), (50, 2000, 2e10, 0.82)])),
    # toy / cnn under 300 s: the head-to-head problem (most algorithms)
    Entry("toy", "cnn", TIME_300, "bp", "backprop", (
        [(0, 0, 0, 0.10), (10, 1e4, 1e10, 0.50), (100, 1e5, 1e11, 0.80), (300, 3e5, 3e11, 0.90)],
        [(0, 0, 0, 0.12), (12, 1e4, 1e10, 0.55), (110, 1e5, 1e11, 0.78), (290, 2.6e5, 2.6e11, 0.88)])),
    Entry("toy", "cnn", TIME_300, "es", "openai-es", (
        [(0, 0, 0, 0.10), (50, 2e4, 1e12, 0.40), (150, 6e4, 3e12, 0.60), (300, 1.2e5, 6e12, 0.70)],
        [(0, 0, 0, 0.11), (60, 2e4, 1e12, 0.45), (160, 6e4, 3e12, 0.62), (300, 1.2e5, 6e12, 0.72)])),
    Entry("toy", "cnn", TIME_300, "ga", "ga", (
        [(0, 0, 0, 0.10), (100, 5e4, 5e11, 0.30), (300, 1.5e5, 1.5e12, 0.50)], None)),
    # same budget, but the suite marked it unranked: shown, never marked or tested (and the best if it were)
    Entry("toy", "cnn", TIME_300, "bp-own", "backprop", (
        [(0, 0, 0, 0.10), (10, 1e4, 1e10, 0.90), (300, 3e5, 3e11, 0.97)],
        [(0, 0, 0, 0.10), (10, 1e4, 1e10, 0.91), (300, 3e5, 3e11, 0.98)]), unranked=True),
    # its own, longer budget on the same problem (unranked = true)
    Entry("toy", "cnn", TIME_900, "es-long", "openai-es", (
        [(0, 0, 0, 0.10), (450, 1.8e5, 9e12, 0.75), (900, 3.6e5, 1.8e13, 0.80)],
        [(0, 0, 0, 0.10), (450, 1.8e5, 9e12, 0.74), (900, 3.6e5, 1.8e13, 0.81)]), unranked=True),
    # a step budget: not a cost currency
    Entry("toy", "mlp", STEPS_100, "bp", "backprop", ([(0, 0, 0, 0.10), (1, 6400, 1e9, 0.85)],)),
    Entry("toy", "mlp", STEPS_100, "es", "openai-es", ([(0, 0, 0, 0.10), (9, 25600, 4e11, 0.60)],)),
)


def fairness_store(run_dir: Path) -> None:
    """FAIR_ENTRIES as trials of suite `fair` (reference: the default, algorithm id backprop)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    store = Store(run_dir)
    store.set_run_info({"suite": "fair", "learnbench": "0.1.0", "created": 1.7e9})
    for e in FAIR_ENTRIES:
        for seed, val in enumerate(e.seeds):
            trial = trial_config(e.label, e.algorithm, seed, dataset=e.dataset, model=e.model, suite="fair",
                                 budget=e.budget, unranked=e.unranked)
            if val is None:
                write_trial(store, trial, "failed", error="RuntimeError: population collapsed")
                continue
            test = [(s, x, f, v - TEST_GAP) for s, x, f, v in val]
            seconds, examples, flops, last = val[-1]
            metrics = {"val/accuracy": last, "test/accuracy": last - TEST_GAP, "cost/train_seconds": seconds,
                       "cost/examples": examples, "cost/flops": flops}
            write_trial(store, trial, metrics=metrics, curves={"val/accuracy": val, "test/accuracy": test})
    store.close()


# --- reading the generated Markdown back ---------------------------------------------------------------------------
def md_row(markdown: str, first_cell: str, after: str = "") -> list[str]:
    """The cells of the first Markdown table row starting with first_cell (after the line containing `after`)."""
    text = markdown[markdown.index(after):] if after else markdown
    for line in text.splitlines():
        cells = [_unmark(c.strip()) for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r}")


def _unmark(cell: str) -> str:
    """A Markdown cell's text: bold markers off, backslash escapes undone."""
    if cell.startswith("**") and cell.endswith("**") and len(cell) > 4:
        cell = cell[2:-2]
    return re.sub(r"\\(.)", r"\1", cell)


def md_rows(markdown: str, after: str, raw: bool = False) -> list[list[str]]:
    """The body rows of the first Markdown table after the line containing `after` (raw: bold markers kept)."""
    lines = markdown[markdown.index(after):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.append(cells if raw else [_unmark(c) for c in cells])
    return rows


def holm_by_hand(pvalues: dict) -> dict:
    """Holm-adjusted p-values, written out from the definition (independent of reports.stats)."""
    ordered = sorted(pvalues, key=pvalues.get)  # Holm: k-th smallest times (m - k + 1), running maximum, capped at 1
    expected, running = {}, 0.0
    for k, key in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - k) * pvalues[key]))
        expected[key] = running
    return expected


# --- robustness verdict: known robust accuracies per seed ----------------------------------------------------------
def robustness_store(run_dir: Path, entries: dict[str, tuple[str, list[dict[str, float]]]],
                     reference: str = "backprop", dataset: str = "mnist", model: str = "mlp-256x2") -> None:
    """label -> (algorithm id, [final metrics of seed 0, seed 1, ...]) as done trials of suite `robust` under one
    epoch budget (so the group is ranked), each with a test and validation accuracy of its `robust/clean`."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    store = Store(run_dir)
    store.set_run_info({"suite": "robust", "learnbench": "0.1.0", "created": 1.7e9})
    for label, (algorithm, seeds) in entries.items():
        for seed, metrics in enumerate(seeds):
            trial = trial_config(label, algorithm, seed, dataset=dataset, model=model, suite="robust",
                                 reference=reference, budget=EPOCHS_5)
            clean = metrics.get("robust/clean", 0.9)
            write_trial(store, trial, metrics={"test/accuracy": clean, "val/accuracy": clean, **metrics})
    store.close()


def md_headers(markdown: str, after: str) -> list[str]:
    """The header cells of the first Markdown table after the line containing `after`."""
    lines = markdown[markdown.index(after):].splitlines()
    header = next(line for line in lines if line.startswith("|"))
    return [_unmark(c.strip()) for c in header.strip().strip("|").split("|")]
