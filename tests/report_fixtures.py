"""Synthetic results stores for the report tests: written through `learnbench.store.Store`, as the runner
writes them, with numbers the tests know in advance."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from learnbench.store import Store

PROVENANCE = {"learnbench": "0.1.0", "git_commit": "0123456789abcdef0123", "python": "3.11.2", "torch": "2.13.0",
              "numpy": "2.4.6", "deap": "1.4.1", "device": "cpu", "threads": 1}


def trial_config(label: str, algorithm: str, seed: int, dataset: str = "digits", model: str = "mlp-64x1",
                 suite: str = "synthetic", **extra: Any) -> dict[str, Any]:
    cfg = {"suite": suite, "label": label, "algorithm": algorithm, "hparams": {"lr": 0.01}, "dataset": dataset,
           "model": {"kind": "mlp", "hidden": [64]}, "model_label": model, "seed": seed,
           "budget": {"steps": None, "epochs": 20, "time_s": None, "flops": None}, "device": "cpu",
           "plugin": {"distribution": "learnbench", "version": "0.1.0"}, **extra}
    cfg["id"] = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    return cfg


def write_trial(store: Store, cfg: dict[str, Any], status: str = "done", metrics: dict[str, float] | None = None,
                curves: dict[str, list[tuple[float, float, float, float]]] | None = None,
                error: str | None = None) -> None:
    """curves: metric -> [(seconds, examples, flops, value)] in step order."""
    store.add_trials([cfg])
    rows = []
    for metric, points in (curves or {}).items():
        rows += [(step, ex, fl, sec, metric, val) for step, (sec, ex, fl, val) in enumerate(points)]
    store.finish_trial(cfg["id"], status, error, metrics or {}, rows, PROVENANCE)


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
            cfg = trial_config(label, algo, seed, suite="quick")
            if label == "ga" and seed == 2:
                write_trial(store, cfg, "failed", error="Traceback (most recent call last):\n  File x\n"
                            "RuntimeError: population <script>alert(1)</script> collapsed")
                continue
            if label == "dfa" and seed == 1:
                write_trial(store, cfg, "diverged", error="non-finite loss at step 412", metrics={"test/accuracy": 0.1})
                continue
            write_trial(store, cfg, **_synthetic_run(rng, label, acc, speed, fpe, points))
    for seed in range(seeds):
        cfg = trial_config("backprop-adam", "backprop", seed, dataset="mnist1d", suite="quick")
        write_trial(store, cfg, **_synthetic_run(rng, "backprop-adam", 0.82, 0.3, 4e5, points))
    return store


def _synthetic_run(rng, label: str, acc: float, speed: float, fpe: float, points: int) -> dict[str, Any]:
    seconds = np.cumsum(rng.uniform(0.8, 1.2, points)) * (3 if fpe > 1e6 else 1)  # [K]
    examples = np.linspace(1, points, points) * 7200.0
    flops = examples * fpe
    frac = np.linspace(1 / points, 1, points)
    final = float(np.clip(acc + rng.normal(0, 0.004), 0, 1))
    value = np.clip(0.1 + (final - 0.1) * (1 - np.exp(-frac / (speed / 3))) + rng.normal(0, 0.003, points), 0, 1)
    value[-1] = final
    curves = {"test/accuracy": list(zip(seconds, examples, flops, value))}
    metrics = {"test/accuracy": final, "cost/train_seconds": float(seconds[-1]), "cost/flops": float(flops[-1]),
               "cost/examples": float(examples[-1]), "robust/clean": final}
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
