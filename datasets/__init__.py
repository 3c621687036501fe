"""Built-in datasets: one loader per source, all returning the same `Splits` of CPU tensors.

| id | module | input | train / val / test |
| --- | --- | --- | --- |
| `digits` | `digits.py` (scikit-learn's 8x8 digits, no files) | [1, 8, 8] | 1,293 / 144 / 360 |
| `mnist1d` | `mnist1d.py` (generated, Greydanus 2020) | [40] | 3,600 / 400 / 1,000 |
| `mnist` | `mnist.py` (IDX files) | [1, 28, 28] | 55,000 / 5,000 / 10,000 |
| `fashion-mnist` | `fashion_mnist.py` (IDX files) | [1, 28, 28] | 55,000 / 5,000 / 10,000 |

Inputs are float32 in [0, 1], labels int64. The validation split is carved from the training set with the fixed
seed `SPLIT_SEED`, so every trial of every algorithm sees the same three splits. The test split is only ever used
for final and curve evaluation.

`info` does no I/O. `prepare` finds, downloads and verifies files (the driver calls it before writing anything, so a
missing or corrupt file is a `UsageError` and not a failed trial); `load` returns the tensors. Loader modules are
imported lazily: listing datasets imports neither scikit-learn nor `mnist1d`.

Your own data: a name ending in `.npz` is a file path (`npz.py`; a suite's relative paths are resolved from its
folder by `learnbench.config`), a `module:function` name a function returning torch `Dataset`s (`factory.py`), and
packages add datasets through the entry-point group `learnbench.datasets` (`plugins.py`). For those, `info` reads and checks the data (once per process and file version), and
`fingerprint` gives the content hash that joins the trial id; built-ins have no fingerprint (their files are
verified against fixed hashes), so their trial ids stay as they were.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

from learnbench.errors import UsageError, did_you_mean

NAMES: tuple[str, ...] = ("digits", "mnist1d", "mnist", "fashion-mnist")
_MODULES = {"digits": "digits", "mnist1d": "mnist1d", "mnist": "mnist", "fashion-mnist": "fashion_mnist"}

FILE_SUFFIX = ".npz"  # a dataset name ending so is a path to your own data (npz.py)

SPLIT_SEED = 0
"""Seed of every train/validation (and, for digits, train/test) split."""

__all__ = ["NAMES", "SPLIT_SEED", "DatasetInfo", "Splits", "info", "prepare", "load", "fingerprint", "is_file",
           "is_factory"]


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset without touching any file."""

    name: str
    input_shape: tuple[int, ...]
    n_classes: int
    n_train: int
    n_val: int
    n_test: int
    description: str
    needs_files: bool
    """True when the data come from files (found on disk or downloaded), False when built in or generated."""


@dataclass
class Splits:
    """The three splits of one dataset: x float32 in [0, 1] shaped [N, *input_shape], y int64 [N]."""

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    input_shape: tuple[int, ...]
    n_classes: int

    def to(self, device: torch.device | str) -> "Splits":
        """A copy with every tensor on `device` (the same object's tensors when they already live there)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name.endswith(("_x", "_y"))}
        return replace(self, **moved)


def is_file(name: str) -> bool:
    """Whether a dataset name is a path to your own `.npz` file."""
    return name.endswith(FILE_SUFFIX)


def is_factory(name: str) -> bool:
    """Whether a dataset name is `module:function`, a function returning torch `Dataset`s (`factory.py`)."""
    from .factory import is_factory as matches

    return name not in _MODULES and matches(name)


def _module(name: str):
    if name not in _MODULES:
        known = [*NAMES, *_plugins()]
        raise UsageError(f"unknown dataset {name!r}{did_you_mean(name, known)} (known: {', '.join(known)}); "
                         f"or give a path to a {FILE_SUFFIX} file, or a module:function returning torch Datasets")
    return importlib.import_module(f".{_MODULES[name]}", __name__)


def _plugins() -> dict:
    from .plugins import plugins

    return plugins()


def _external(name: str):
    """The checked data of a `.npz` file or a plugin (`npz.Loaded`); None for a built-in."""
    if is_file(name):
        from .npz import read_file

        return read_file(name)
    if is_factory(name):
        from .factory import read as read_factory

        return read_factory(name)
    if name not in _MODULES and name in _plugins():
        from .plugins import load as load_plugin

        return load_plugin(name)
    _module(name)  # a built-in, or a UsageError for an unknown name
    return None


def info(name: str) -> DatasetInfo:
    """The dataset's shapes, sizes and description. No I/O for a built-in; your own data are read and checked
    here (`UsageError` naming the problem). `UsageError` for an unknown name."""
    loaded = _external(name)
    return loaded.info if loaded is not None else _module(name).INFO


def prepare(name: str, data_dir: str | None = None) -> None:
    """Make sure the dataset can be loaded: find its files, download the absent ones, verify their SHA-256.

    Raises `UsageError` (one line naming the file) for a missing, corrupt, truncated or mismatching file. Cheap
    when this process already verified the same files."""
    if _external(name) is None:
        _module(name).prepare(data_dir)


def load(name: str, data_dir: str | None = None) -> Splits:
    """The dataset's train/val/test splits as CPU tensors (see the module docstring for sizes and ranges)."""
    loaded = _external(name)
    return loaded.splits if loaded is not None else _module(name).load(data_dir)


def fingerprint(name: str) -> dict[str, str] | None:
    """What identifies your own data in a trial id: `{"sha256": ...}` of a file's bytes (of the arrays
    for a factory), plus the distribution and
    version for a plugin's arrays; None for a built-in (its identity is its name)."""
    loaded = _external(name)
    if loaded is None:
        return None
    if is_file(name) or is_factory(name):
        return {"sha256": loaded.sha256}
    plugin = _plugins()[name]
    return {"sha256": loaded.sha256, "distribution": plugin.distribution, "version": plugin.version}


# ---- helpers shared by the loaders --------------------------------------------------------------------------------


def carve_validation(n: int, n_val: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Split indices [0, n) into (train, val) with `n_val` uniformly drawn validation indices; both sorted so the
    splits keep the source order."""
    perm = np.random.default_rng(seed).permutation(n)  # [n]
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def make_splits(info: DatasetInfo, train: tuple, val: tuple, test: tuple) -> Splits:
    """Wrap (x, y) numpy pairs as `Splits`, checking them against `info` (sizes, shape, dtype, range, labels)."""
    parts = {}
    for split, (x, y), n in (("train", train, info.n_train), ("val", val, info.n_val), ("test", test, info.n_test)):
        # np.require copies only when needed: torch wants writable, contiguous arrays
        x = torch.from_numpy(np.require(x, np.float32, ["C", "W"])).reshape(-1, *info.input_shape)
        y = torch.from_numpy(np.require(y, np.int64, ["C", "W"]))
        # Loader bugs, not user errors: a wrong size here would silently change every result.
        assert x.shape[0] == y.shape[0] == n, f"{info.name} {split}: {len(x)} inputs, {len(y)} labels, {n} expected"
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0, f"{info.name} {split}: inputs outside [0, 1]"
        assert 0 <= int(y.min()) and int(y.max()) < info.n_classes, f"{info.name} {split}: labels out of range"
        parts[f"{split}_x"], parts[f"{split}_y"] = x, y
    return Splits(name=info.name, input_shape=info.input_shape, n_classes=info.n_classes, **parts)
