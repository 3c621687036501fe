"""MNIST (LeCun, Bottou, Bengio & Haffner 1998, "Gradient-based learning applied to document recognition"):
70,000 28x28 grey-scale handwritten digits, the canonical IDX files of http://yann.lecun.com/exdb/mnist/.

Splits: the official 60,000 training images minus 5,000 validation images drawn with `SPLIT_SEED`; the official
10,000 test images.

Digests: SHA-256 of the decompressed files. Three of the four .gz files in the development data folder match,
byte for byte, the MD5s torchvision publishes for `torchvision.datasets.MNIST` (train-labels d53e105e...,
t10k-images 9fb629c4..., t10k-labels ec29112d...); the fourth, train-images, had been recompressed (gzip mtime 0,
so its MD5 differs from torchvision's f68b3c2d...), and its decompressed SHA-256 below equals the value published
for the canonical file (47,040,016 bytes) by independent projects that pin the decompressed MNIST files.
"""

from __future__ import annotations

from . import DatasetInfo, Splits
from .idx import IdxFile, IdxSource, image_splits
from .idx import prepare as _prepare

INFO = DatasetInfo(
    name="mnist", input_shape=(1, 28, 28), n_classes=10, n_train=55_000, n_val=5_000, n_test=10_000,
    description="MNIST handwritten digits, 28x28 (LeCun et al. 1998); canonical IDX files, downloaded if absent",
    needs_files=True,
)

CLASSES = tuple(str(d) for d in range(10))

SOURCE = IdxSource(
    dataset="mnist",
    files=(
        IdxFile("train-images-idx3-ubyte", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        IdxFile("train-labels-idx1-ubyte", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        IdxFile("t10k-images-idx3-ubyte", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        IdxFile("t10k-labels-idx1-ubyte", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    ),
    # torchvision's mirror first: yann.lecun.com has been refusing or rate-limiting downloads since 2023.
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
)


def prepare(data_dir: str | None = None) -> None:
    _prepare(SOURCE, data_dir)


def load(data_dir: str | None = None) -> Splits:
    return image_splits(SOURCE, INFO, data_dir)
