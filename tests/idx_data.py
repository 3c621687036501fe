"""Test helper: read the canonical MNIST / Fashion-MNIST IDX files directly (numpy + gzip), for tests and
acceptance scripts written before `learnbench.datasets` is on main. Returns float32 [N, 1, 28, 28] in [0, 1] and
int64 labels."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch


def data_root() -> Path:
    return Path(os.environ.get("LEARNBENCH_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"))


def _read(path: Path) -> np.ndarray:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_idx(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`name` mnist or fashion-mnist, `split` train or t10k."""
    folder = data_root() / name
    images = _read(folder / f"{split}-images-idx3-ubyte.gz")
    labels = _read(folder / f"{split}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))
