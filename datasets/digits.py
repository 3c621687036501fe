"""scikit-learn's 8x8 handwritten digits (the UCI "Optical Recognition of Handwritten Digits" test set, Alpaydin &
Kaynak 1998): 1,797 images, 10 classes, pixel counts 0..16. Shipped inside scikit-learn, so it needs no file and
no network: the embedded default of `learnbench run`.

Splits (the set has no official split): 20% test (360 images), then 10% of the remaining 1,437 for validation (144),
both stratified by class and drawn with `SPLIT_SEED` through scikit-learn's `train_test_split`; 1,293 train.
Pixels are divided by 16, the format's maximum, so inputs lie in [0, 1].
"""

from __future__ import annotations

import numpy as np

from . import SPLIT_SEED, DatasetInfo, Splits, make_splits

INFO = DatasetInfo(
    name="digits", input_shape=(1, 8, 8), n_classes=10, n_train=1_293, n_val=144, n_test=360,
    description="scikit-learn's 8x8 handwritten digits (UCI); built in, no download",
    needs_files=False,
)

TEST_FRACTION = 0.2
"""Share of the 1,797 images held out for testing (train_test_split rounds the test count up: 360)."""
VAL_FRACTION = 0.1
"""Share of the remaining 1,437 images held out for validation (rounded up: 144)."""


def prepare(data_dir: str | None = None) -> None:
    """Nothing to find or download: the data ship with scikit-learn."""


def _stratified(indices: np.ndarray, labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    keep, held = train_test_split(indices, test_size=fraction, stratify=labels[indices], random_state=SPLIT_SEED)
    return np.sort(keep), np.sort(held)


def load(data_dir: str | None = None) -> Splits:
    from sklearn.datasets import load_digits

    bunch = load_digits()  # reads a CSV bundled with scikit-learn
    x = (bunch.images / 16.0).astype(np.float32)[:, None]  # [1797, 1, 8, 8] in [0, 1]
    y = bunch.target.astype(np.int64)  # [1797]
    rest, test = _stratified(np.arange(len(y)), y, TEST_FRACTION)
    train, val = _stratified(rest, y, VAL_FRACTION)
    return make_splits(INFO, (x[train], y[train]), (x[val], y[val]), (x[test], y[test]))
