"""Datasets from other packages: entry points in the group `learnbench.datasets`.

A package registers a function that takes no argument and returns its splits, either a mapping of NumPy arrays
with the keys of a `.npz` dataset (`x_train`, `y_train`, `x_test`, `y_test`, optional `x_val`, `y_val`; checked as
`npz.py` checks a file) or a `learnbench.datasets.Splits`:

    [project.entry-points."learnbench.datasets"]
    my-data = "my_package.data:load"

The entry point's name is the dataset id a suite uses (`datasets = ["my-data"]`). A plugin that fails to load is
listed as broken by `learnbench list datasets` and is a usage error only when a suite names it. The trial id holds
the SHA-256 of the arrays and the distribution's version. LEARNBENCH_DISABLE_PLUGIN_AUTOLOAD=1 skips them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points

from learnbench.errors import UsageError

from . import Splits
from .npz import Loaded, array_digest, from_arrays

GROUP = "learnbench.datasets"
DISABLE_ENV = "LEARNBENCH_DISABLE_PLUGIN_AUTOLOAD"  # the same switch as for algorithm plugins


@dataclass(frozen=True)
class Plugin:
    """One registered dataset: its entry point and the distribution that ships it."""

    name: str
    distribution: str
    version: str
    target: str


def plugins() -> dict[str, Plugin]:
    """Every dataset entry point (none when autoload is disabled), by dataset id."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return {}
    return {ep.name: Plugin(ep.name, ep.dist.name if ep.dist else "unknown", ep.dist.version if ep.dist else
                            "unknown", ep.value) for ep in entry_points(group=GROUP)}


@lru_cache(maxsize=None)
def load(name: str) -> Loaded:
    """Call the plugin's function once per process and check what it returns; UsageError when it fails."""
    plugin = plugins()[name]
    try:
        function = EntryPoint(name, plugin.target, GROUP).load()
        result = function()
    except Exception as exc:  # a broken plugin is the user's input: one line, no traceback
        raise UsageError(f"dataset plugin {name!r} ({plugin.distribution}, {plugin.target}) failed: "
                         f"{type(exc).__name__}: {exc}") from None
    arrays = _arrays(name, result)
    info, splits = from_arrays(name, arrays, f"plugin dataset from {plugin.distribution} {plugin.version}")
    return Loaded(info, splits, array_digest(arrays))


def _arrays(name: str, result: object) -> dict:
    if isinstance(result, Splits):
        return {f"{axis}_{split}": getattr(result, f"{split}_{axis}").numpy()
                for split in ("train", "val", "test") for axis in ("x", "y")}
    if hasattr(result, "keys") and hasattr(result, "__getitem__"):
        return {key: result[key] for key in result.keys()}
    raise UsageError(f"dataset plugin {name!r} returned {type(result).__name__}; expected a mapping of arrays "
                     "(x_train, y_train, x_test, y_test[, x_val, y_val]) or a learnbench.datasets.Splits")
