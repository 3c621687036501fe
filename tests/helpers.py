"""Test helpers: resolve a suite dict into trials; start a local Ray instance. Trainers that misbehave on purpose live
in `plugin_cases.py`."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator

import pytest

from learnbench import config
from learnbench.registry import discover

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install 'learnbench[ray]')")


def local_ray(num_cpus: int) -> Iterator:
    """Body of a module-scoped fixture: a local Ray instance with `num_cpus` logical CPUs, shut down afterwards."""
    if not HAS_RAY:
        pytest.skip("Ray is not installed (pip install 'learnbench[ray]')")
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


def make_trials(suite: dict, plugin_files=(), **overrides) -> list[dict]:
    base = {"name": "t", "datasets": ["digits"], "seeds": 1, "models": [{"kind": "mlp", "hidden": [16]}],
            "budget": {"steps": 30}, "eval": {"points": 3}, "robustness": {"examples": 0},
            "algorithms": [{"id": "backprop", "batch_size": 32}]}
    base.update(suite)
    return config.resolve(config.apply_overrides(base, **overrides), discover(list(plugin_files)), "cpu", "test")



def digits_batch(n: int):
    """The first n scikit-learn digits as one batch: x [n, 1, 8, 8] in [0, 1], y [n]."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:n] / 16, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x, torch.tensor(digits.target[:n])


def random_batches(n: int, d: int = 6, size: int = 64, seed: int = 1, classes: int = 3) -> list:
    """n batches of uniform inputs [size, d] and uniform labels in 0..classes-1, from one seeded generator."""
    import torch

    from learnbench.spec import Batch

    g = torch.Generator().manual_seed(seed)
    return [Batch(torch.rand(size, d, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]
