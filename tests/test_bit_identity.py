"""Refactoring without behaviour change: each of the nine built-in trainers, on digits with a fixed seed, gives
bit-identical metrics (accuracy, losses, alignment angles, robust accuracy) to figures recorded before the code was
restructured (`tests/data/bit_identity.json`, written by `python tests/test_bit_identity.py --record`).

Float results are only reproducible on the same CPU kernels and torch build, one thread: the recording names them,
and the test is skipped, saying why, on a machine whose torch version or CPU capability differs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import make_trials  # noqa: E402
from learnbench.runner import run_trial  # noqa: E402

FIGURES = Path(__file__).resolve().parent / "data" / "bit_identity.json"
MLP, CNN = {"kind": "mlp", "hidden": [16]}, {"kind": "cnn"}
GRADIENT = {"optimizer": "adam", "batch_size": 32}
CASES = {  # name -> (model, budget steps, algorithm entry)
    "backprop": (MLP, 40, {"id": "backprop", **GRADIENT}),
    **{f"{rule}-{kind}": (model, 40, {"id": rule, **GRADIENT})
       for rule in ("fa", "dfa", "sign-symmetry", "kolen-pollack") for kind, model in (("mlp", MLP), ("cnn", CNN))},
    "openai-es": (MLP, 12, {"id": "openai-es", "popsize": 16, "batch_size": 64, "noise_table": 2**16}),
    "snes": (MLP, 12, {"id": "snes", "popsize": 16, "batch_size": 64}),
    "cma-es": (MLP, 12, {"id": "cma-es", "popsize": 8, "batch_size": 64, "covariance": "full"}),
    "cma-es-diagonal": (MLP, 12, {"id": "cma-es", "popsize": 8, "batch_size": 64, "covariance": "diagonal"}),
    "ga": (MLP, 12, {"id": "ga", "popsize": 16, "batch_size": 64, "candidates": 4}),
}
KEPT_PREFIXES = ("test/", "val/", "train/", "align/", "robust/")
IGNORED = ("robust/seconds",)
ADDED_SINCE = ("robust/worst-case/", "robust/auc/worst-case/", "train/lr", "train/sigma", "train/bw_distance",
               "train/fitness/")
"""Metrics added after the figures were recorded (the per-example worst case, issue 18; the trainers' own values,
`StepStats.metrics`, issue 22): new keys, not changes."""


def platform() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def run_case(name: str) -> dict[str, str]:
    """The case's metrics as exact float hex strings (one torch thread: the count changes float rounding)."""
    model, steps, entry = CASES[name]
    trial = make_trials({"models": [model], "budget": {"steps": steps}, "eval": {"points": 4},
                         "robustness": {"examples": 40, "attacks": ["pgd-linf"], "pgd_steps": 10},
                         "diagnostics": {"every": 10, "probes": ["alignment"]}, "algorithms": [entry]})[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_trial(trial, None)
    finally:
        torch.set_num_threads(threads)
    assert result.status == "done", result.error
    return {k: float(v).hex() for k, v in sorted(result.metrics.items())
            if k.startswith(KEPT_PREFIXES) and not k.startswith(IGNORED)}


def recorded() -> dict:
    if not FIGURES.is_file():
        pytest.skip(f"no recorded figures at {FIGURES}")
    figures = json.loads(FIGURES.read_text())
    if figures["platform"] != platform():
        pytest.skip(f"figures recorded with {figures['platform']}, this machine has {platform()}: float results "
                    "are only bit-identical on the same torch build and CPU kernels")
    return figures


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_metrics_are_bit_identical_to_the_recorded_figures(name):
    expected = recorded()["cases"][name]
    got = run_case(name)
    assert {k: v for k, v in got.items() if k in expected} == expected
    assert all(k.startswith(ADDED_SINCE) for k in set(got) - set(expected))


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    FIGURES.parent.mkdir(exist_ok=True)
    cases = {name: run_case(name) for name in CASES}
    FIGURES.write_text(json.dumps({"platform": platform(), "cases": cases}, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(cases)} cases in {FIGURES}")
