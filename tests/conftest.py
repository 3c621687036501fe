"""Shared fixtures: a tiny suite on the embedded digits data, the repository's shared datasets, and one torch thread
for modules of tiny tensors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(os.environ.get("LEARNBENCH_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))

TINY_SUITE = """
name = "tiny"
datasets = ["digits"]
seeds = 1
[[models]]
kind = "mlp"
hidden = [16]
[budget]
steps = 40
[eval]
points = 4
[robustness]
examples = 0
[[algorithms]]
id = "backprop"
batch_size = 32
"""


@pytest.fixture
def tiny_suite(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(textwrap.dedent(TINY_SUITE))
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    """Run the installed `learnbench` command line in a subprocess (what a user runs)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "learnbench.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def mnist_dir() -> Path:
    if not (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST IDX files not found under {SHARED_DATA} (set LEARNBENCH_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds waits on a loaded machine, whose cores are shared. A module
    asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
