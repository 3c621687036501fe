"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, "Fashion-MNIST: a novel image dataset for benchmarking machine
learning algorithms", arXiv:1708.07747): 70,000 28x28 grey-scale images of Zalando articles in 10 classes, a
drop-in replacement for MNIST (same IDX layout and file names).

Splits: the official 60,000 training images minus 5,000 validation images drawn with `SPLIT_SEED`; the official
10,000 test images.

Digests: SHA-256 of the decompressed files. Debian's `dataset-fashion-mnist` (bookworm, 0.0~git20200523.55506a9-1)
installs recompressed copies in /usr/share/datasets/fashion-mnist/, so their .gz MD5s differ from torchvision's;
the .gz files inside that package's upstream tarball (zalandoresearch/fashion-mnist at 55506a9, data/fashion/)
match torchvision's `FashionMNIST` MD5s exactly (8d4fb7e6..., 25c81989..., bef4ecab..., bb300cfd...), and both
decompress to the content pinned below.
"""

from __future__ import annotations

from . import DatasetInfo, Splits
from .idx import IdxFile, IdxSource, image_splits
from .idx import prepare as _prepare

INFO = DatasetInfo(
    name="fashion-mnist", input_shape=(1, 28, 28), n_classes=10, n_train=55_000, n_val=5_000, n_test=10_000,
    description="Fashion-MNIST clothing images, 28x28 (Xiao et al. 2017); canonical IDX files, downloaded if absent",
    needs_files=True,
)

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

SOURCE = IdxSource(
    dataset="fashion-mnist",
    files=(
        IdxFile("train-images-idx3-ubyte", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        IdxFile("train-labels-idx1-ubyte", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        IdxFile("t10k-images-idx3-ubyte", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        IdxFile("t10k-labels-idx1-ubyte", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    ),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
)


def prepare(data_dir: str | None = None) -> None:
    _prepare(SOURCE, data_dir)


def load(data_dir: str | None = None) -> Splits:
    return image_splits(SOURCE, INFO, data_dir)
