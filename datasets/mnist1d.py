"""MNIST-1D (Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024; arXiv:2011.14439; code
github.com/greydanus/mnist1d): 5,000 one-dimensional signals of length 40 in 10 classes, made by padding,
dilating, scaling, shifting, shearing and adding correlated noise to ten hand-drawn 1-D digit templates.

Generated, not downloaded: `mnist1d.data.make_dataset(get_dataset_args())`, the `mnist1d` package's generator with
its published default arguments (5,000 samples, seed 42, 80% train: the paper's 4,000 / 1,000 split). We call the
generator only: never `get_dataset`, which downloads a pickle from GitHub and unpickles it. The package rather than
a vendored copy because its dependencies (numpy, scipy, matplotlib, requests) are ones learnbench already installs;
its import costs ~0.5 s (it imports matplotlib.pyplot), paid only when this dataset is loaded. The generator seeds
`random` and `numpy.random` globally, so we restore both states afterwards: loading MNIST-1D changes no RNG.

Splits: the published 4,000 train / 1,000 test; 400 validation signals (10%) carved from train with `SPLIT_SEED`,
3,600 train. The generator standardises the signals; we map them to [0, 1] with the min and max of our 3,600
training signals and clip validation and test to [0, 1] (so neither influences the scaling).
"""

from __future__ import annotations

import functools
import importlib.util
import random

import numpy as np

from learnbench.errors import UsageError
from . import DatasetInfo, Splits, carve_validation, make_splits

INFO = DatasetInfo(
    name="mnist1d", input_shape=(40,), n_classes=10, n_train=3_600, n_val=400, n_test=1_000,
    description="MNIST-1D, 1-D signals of length 40 (Greydanus & Kobak 2020); generated with seed 42, no download",
    needs_files=False,
)


def prepare(data_dir: str | None = None) -> None:
    """Nothing to find or download (the data are generated); only check the generator is installed."""
    if importlib.util.find_spec("mnist1d") is None:
        raise UsageError("dataset 'mnist1d' needs the mnist1d package (pip install 'mnist1d>=0.0.1.post1')")


@functools.lru_cache(maxsize=1)
def generate() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The published dataset as the package generates it: x [4000, 40], y [4000], x_test [1000, 40], y_test
    [1000] (float64, int64; read-only, cached for the process)."""
    from mnist1d.data import get_dataset_args, make_dataset

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    arrays = (data["x"], data["y"], data["x_test"], data["y_test"])
    for a in arrays:
        a.flags.writeable = False
    return arrays


def load(data_dir: str | None = None) -> Splits:
    x, y, x_test, y_test = generate()
    train, val = carve_validation(len(y), INFO.n_val)
    low, high = x[train].min(), x[train].max()

    def scaled(a: np.ndarray) -> np.ndarray:  # [N, 40] float32 in [0, 1]
        return np.clip((a - low) / (high - low), 0.0, 1.0).astype(np.float32)

    return make_splits(INFO, (scaled(x[train]), y[train]), (scaled(x[val]), y[val]), (scaled(x_test), y_test))
