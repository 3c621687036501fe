"""Test helpers: resolve a suite dict into trials, and small trainers that misbehave on purpose."""

from __future__ import annotations

from learnbench import config
from learnbench.registry import discover


def make_trials(suite: dict, plugin_files=(), **overrides) -> list[dict]:
    base = {"name": "t", "datasets": ["digits"], "seeds": 1, "models": [{"kind": "mlp", "hidden": [16]}],
            "budget": {"steps": 30}, "eval": {"points": 3}, "robustness": {"examples": 0},
            "algorithms": [{"id": "backprop", "batch_size": 32}]}
    base.update(suite)
    return config.resolve(config.apply_overrides(base, **overrides), discover(list(plugin_files)), "cpu", "test")


MISBEHAVING = '''
from dataclasses import dataclass
from typing import ClassVar
import torch
from learnbench.algorithms.backprop import Backprop
from learnbench.spec import StepStats


@dataclass(eq=False)
class NanAfter(Backprop):
    """Reports a NaN loss from step `after` on."""
    name: ClassVar[str] = "nan-after"
    after: int = 5

    def step(self, batch):
        stats = super().step(batch)
        self._count = getattr(self, "_count", 0) + 1
        return StepStats(float("nan"), stats.forward_passes) if self._count > self.after else stats


@dataclass(eq=False)
class Raises(Backprop):
    """Raises in step 3."""
    name: ClassVar[str] = "raises"

    def step(self, batch):
        self._count = getattr(self, "_count", 0) + 1
        if self._count == 3:
            raise RuntimeError("deliberate failure in step 3")
        return super().step(batch)


@dataclass(eq=False)
class WrongType(Backprop):
    """Returns a float instead of StepStats."""
    name: ClassVar[str] = "wrong-type"

    def step(self, batch):
        return 0.5
'''
