"""Your own data: a `.npz` file named by path in a suite (`datasets = ["my.npz"]`), or arrays a plugin returns.

Arrays (NumPy's `.npz`, read with `allow_pickle=False`: an object array is refused, never unpickled):

    x_train [N, C, H, W] | [N, H, W] | [N, D]     y_train [N]     integer class labels 0..C-1
    x_test  (same shape after N)                  y_test  [N]
    x_val, y_val                                  optional: otherwise carved from train (`carve_validation`, 10%)

Inputs must be numeric and finite and lie in [0, 1] (the attacks clamp adversarial points to that box and their
eps grids are fractions of it); uint8 inputs are divided by 255. [N, H, W] images get one channel. The number of
classes is the largest label of any split plus one. Every check is a one-line `UsageError` naming the file and the
array, raised before anything runs (the driver calls `prepare`). Such a dataset's scale is not known to the
robustness defaults: a suite with robustness on gives `robustness.eps_linf` for it.

The data's identity is the SHA-256 of the file's bytes (of the arrays, for a plugin): part of the trial id
(`fingerprint`), so an edited file never reuses old results.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from learnbench.errors import UsageError

from . import DatasetInfo, Splits, carve_validation, make_splits

REQUIRED = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL = ("x_val", "y_val")
VAL_FRACTION = 0.1
"""Share of the training set held out for validation when the data give no x_val/y_val (rounded up)."""


@dataclass(frozen=True)
class Loaded:
    """A validated dataset: what `info`, `load` and `fingerprint` return for it."""

    info: DatasetInfo
    splits: Splits
    sha256: str


def read_file(path: str) -> Loaded:
    """Read and validate one `.npz` file (cached while its size and modification time stay the same)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"dataset file {path} does not exist")
    stat = file.stat()
    return _read_file(str(file), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _read_file(path: str, mtime_ns: int, size: int) -> Loaded:  # the stamp invalidates the cache on edits
    data = Path(path).read_bytes()
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files if key in (*REQUIRED, *OPTIONAL)}
    except ValueError as exc:  # an object array needs pickle, which is refused
        raise UsageError(f"dataset file {path}: cannot read without pickle ({exc}); save numeric arrays") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise UsageError(f"dataset file {path} is not a readable .npz file: {exc}") from None
    info, splits = from_arrays(path, arrays, f"your data ({Path(path).name})")
    return Loaded(info, splits, hashlib.sha256(data).hexdigest())


def from_arrays(name: str, arrays: Mapping[str, Any], description: str) -> tuple[DatasetInfo, Splits]:
    """Validate arrays with the keys above and wrap them as `Splits` (see the module docstring)."""
    missing = [key for key in REQUIRED if key not in arrays]
    if missing or (("x_val" in arrays) != ("y_val" in arrays)):
        missing = missing or [key for key in OPTIONAL if key not in arrays]
        raise UsageError(f"dataset {name}: missing array(s) {', '.join(missing)}; needs "
                         f"{', '.join(REQUIRED)} (x_val and y_val optional, together)")
    parts = {split: _pair(name, split, arrays) for split in ("train", "val", "test") if f"x_{split}" in arrays}
    shapes = {split: x.shape[1:] for split, (x, _) in parts.items()}
    if len(set(shapes.values())) > 1:
        raise UsageError(f"dataset {name}: inputs of different shapes across splits: "
                         + ", ".join(f"x_{s} {list(v)}" for s, v in shapes.items()))
    n_classes = max(int(y.max()) for _, y in parts.values()) + 1
    if n_classes < 2:
        raise UsageError(f"dataset {name}: labels need at least two classes (0..C-1); the largest label is "
                         f"{n_classes - 1}")
    seen = set(np.unique(parts["train"][1]).tolist())
    for split, (_, y) in parts.items():
        unseen = sorted(set(np.unique(y).tolist()) - seen)
        if unseen:
            raise UsageError(f"dataset {name}: y_{split} has label(s) {unseen[:5]} that y_train never has; labels "
                             f"are 0..C-1 with C = {n_classes} (the largest label + 1)")
    if "val" not in parts:
        x, y = parts["train"]
        if len(y) < 2:
            raise UsageError(f"dataset {name}: x_train has {len(y)} row(s); carving a validation split needs two")
        train, val = carve_validation(len(y), math.ceil(VAL_FRACTION * len(y)))
        parts["train"], parts["val"] = (x[train], y[train]), (x[val], y[val])
    info = DatasetInfo(name=name, input_shape=tuple(shapes["train"]), n_classes=n_classes,
                       n_train=len(parts["train"][1]), n_val=len(parts["val"][1]), n_test=len(parts["test"][1]),
                       description=description, needs_files=True)
    return info, make_splits(info, parts["train"], parts["val"], parts["test"])


def array_digest(arrays: Mapping[str, Any]) -> str:
    """SHA-256 over the named arrays (name, dtype, shape, bytes), in key order: a plugin's data identity."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = np.ascontiguousarray(np.asarray(arrays[key]))
        digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _pair(name: str, split: str, arrays: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """One split's (x float32 [N, *shape] in [0, 1], y int64 [N]), or a UsageError naming the bad array."""
    x, y = np.asarray(arrays[f"x_{split}"]), np.asarray(arrays[f"y_{split}"])
    where = f"dataset {name}: x_{split}"
    if x.ndim not in (2, 3, 4):
        raise UsageError(f"{where} has shape {list(x.shape)}; expected [N, C, H, W], [N, H, W] or [N, D]")
    if x.dtype.kind not in "uif" or x.dtype.kind == "b":
        raise UsageError(f"{where} has dtype {x.dtype}; expected numbers (float, or uint8 pixels)")
    if y.ndim != 1 or y.dtype.kind not in "ui":
        raise UsageError(f"dataset {name}: y_{split} has dtype {y.dtype} and shape {list(y.shape)}; expected "
                         "integer class labels [N]")
    if len(x) != len(y) or len(x) == 0:
        raise UsageError(f"{where} has {len(x)} rows but y_{split} has {len(y)}; they must match (and be > 0)")
    if y.min() < 0:
        raise UsageError(f"dataset {name}: y_{split} has label {int(y.min())}; labels are 0..C-1")
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if not np.isfinite(x).all():
        raise UsageError(f"{where} has {int((~np.isfinite(x)).sum())} NaN or infinite value(s)")
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise UsageError(f"{where} has values in [{low:g}, {high:g}]; inputs must lie in [0, 1] (scale them, e.g. "
                         "pixels / 255): the attacks' eps and clamping assume that range")
    return (x[:, None] if x.ndim == 3 else x), y.astype(np.int64)
