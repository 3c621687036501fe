"""Your own data from code: a `module:function` (or `file.py:function`) dataset name whose function returns torch
`Dataset`s.

The function takes no argument and returns the splits, as a mapping or a tuple:

    {"train": Dataset, "test": Dataset}            # or with "val": Dataset
    (train, test)  |  (train, val, test)

Each item of a `Dataset` is a pair `(x, y)`: `x` a tensor, NumPy array or anything `np.asarray` reads (a PIL
image from a torchvision dataset without a transform, say) shaped `[C, H, W]`, `[H, W]` or `[D]`; `y` an integer
class label (a Python int or a 0-d tensor). learnbench reads every item once (a `TensorDataset` of two tensors is
taken whole), stacks the splits into arrays and checks them exactly as a `.npz` file's (`npz.from_arrays`: shapes,
dtypes, [0, 1] range, NaN, labels 0..C-1; uint8 pixels are divided by 255), so the training loops see the same
`Splits` of tensors as for any dataset, and transforms run once, not per epoch: random augmentation is not
supported (it would be frozen at its first draw).

`module` resolves from the suite file's folder first (`module.py` there), as model factories and `--plugin` files
do, then from installed modules; on the command line (`--datasets my_data:make`) from the current folder. The
function runs once per process and file version. Its data's identity is the SHA-256 of the stacked arrays
(`npz.array_digest`), part of every trial id, so code that yields other data reruns its trials.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learnbench.errors import UsageError

from .npz import Loaded, array_digest, from_arrays

NAME = re.compile(r"^(?P<module>[\w.\-/\\ ]+?(\.py)?):(?P<function>[A-Za-z_]\w*)$")
"""A factory dataset name: `module:function`, `package.module:function` or `path/to/file.py:function`."""


def is_factory(name: str) -> bool:
    """Whether a dataset name is `module:function` (a function returning torch Datasets)."""
    return bool(NAME.match(name)) and not name.endswith(".npz")


def resolve(name: str, folder: Path) -> str:
    """`module:function` with `module.py` (or `file.py`) in `folder` as an absolute `file.py:function`; anything
    else unchanged (an installed module, or an absolute path)."""
    match = NAME.match(name)
    if not match:
        return name
    module, function = match["module"], match["function"]
    file = Path(module) if module.endswith(".py") else Path(*module.split(".")).with_suffix(".py")
    if not file.is_absolute() and (folder / file).is_file():
        return f"{folder / file}:{function}"
    return name


def read(name: str) -> Loaded:
    """Call the factory (once per process and source version) and check what it returns; UsageError otherwise."""
    from learnbench.registry import target_source

    source = target_source(name)
    stamp = Path(source).stat().st_mtime_ns if source else 0
    return _read(name, stamp)


@lru_cache(maxsize=8)
def _read(name: str, stamp: int) -> Loaded:  # the source file's stamp invalidates the cache on edits
    from learnbench.registry import import_target

    try:
        function = import_target(name, "_learnbench_data_")
    except Exception as exc:  # noqa: BLE001 - the user's module: one line, no traceback
        raise UsageError(f"cannot import dataset factory {name!r}: {type(exc).__name__}: {exc}") from None
    if not callable(function):
        raise UsageError(f"dataset factory {name!r} is not callable")
    try:
        result = function()
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"dataset factory {name!r} failed: {type(exc).__name__}: {exc}") from None
    arrays = {}
    for split, dataset in _splits(name, result).items():
        arrays[f"x_{split}"], arrays[f"y_{split}"] = _stack(name, split, dataset)
    info, splits = from_arrays(name, arrays, f"your data ({name.rpartition(':')[2]} in "
                                             f"{Path(name.rpartition(':')[0]).name})")
    return Loaded(info, splits, array_digest(arrays))


def _splits(name: str, result: Any) -> dict[str, Any]:
    """{"train": ..., ["val": ...,] "test": ...} from the factory's mapping or tuple."""
    if isinstance(result, dict):
        unknown = sorted(set(result) - {"train", "val", "test"})
        if unknown or not {"train", "test"} <= set(result):
            raise UsageError(f"dataset factory {name!r} returned a mapping with keys {sorted(result)}; expected "
                             "'train' and 'test' (and optionally 'val')")
        return {split: result[split] for split in ("train", "val", "test") if split in result}
    if isinstance(result, (tuple, list)) and len(result) in (2, 3):
        return dict(zip(("train", "test") if len(result) == 2 else ("train", "val", "test"), result))
    raise UsageError(f"dataset factory {name!r} returned {type(result).__name__}; expected {{'train': Dataset, "
                     "'test': Dataset[, 'val': Dataset]}, (train, test) or (train, val, test)")


def _stack(name: str, split: str, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """x [N, *shape] and y [N] of one Dataset, in its order."""
    tensors = getattr(dataset, "tensors", None)
    if isinstance(dataset, torch.utils.data.TensorDataset) and len(tensors) == 2:
        return tensors[0].numpy(), tensors[1].numpy()
    xs, ys = [], []
    try:
        for index, item in enumerate(dataset):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise UsageError(f"dataset factory {name!r}: {split} item {index} is {type(item).__name__}; "
                                 "expected a pair (x, y)")
            x, y = item
            xs.append(x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
            ys.append(y.item() if isinstance(y, (torch.Tensor, np.ndarray)) and y.ndim == 0 else y)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's __getitem__
        raise UsageError(f"dataset factory {name!r}: reading the {split} split failed: "
                         f"{type(exc).__name__}: {exc}") from None
    if not xs:
        raise UsageError(f"dataset factory {name!r}: the {split} split is empty")
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise UsageError(f"dataset factory {name!r}: {split} inputs have different shapes "
                         f"({', '.join(str(list(s)) for s in list(shapes)[:3])}); every x must have one shape")
    labels = np.asarray(ys)
    if labels.ndim != 1 or labels.dtype.kind not in "ui":
        raise UsageError(f"dataset factory {name!r}: {split} labels are {labels.dtype} {list(labels.shape)}; "
                         "each y must be one integer class label")
    return np.stack(xs), labels
