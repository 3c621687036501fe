"""Test helpers: resolve a suite dict into trials. Trainers that misbehave on purpose live in `plugin_cases.py`."""

from __future__ import annotations

from learnbench import config
from learnbench.registry import discover


def make_trials(suite: dict, plugin_files=(), **overrides) -> list[dict]:
    base = {"name": "t", "datasets": ["digits"], "seeds": 1, "models": [{"kind": "mlp", "hidden": [16]}],
            "budget": {"steps": 30}, "eval": {"points": 3}, "robustness": {"examples": 0},
            "algorithms": [{"id": "backprop", "batch_size": 32}]}
    base.update(suite)
    return config.resolve(config.apply_overrides(base, **overrides), discover(list(plugin_files)), "cpu", "test")

