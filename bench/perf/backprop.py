"""One MNIST epoch of backprop through the runner against an idiomatic DataLoader loop, alternated.

Both sides train the same MLP 784-256-256-10 (same initial weights) with Adam (lr 1e-3) at batch 128 on the same
device and thread count, dropping the last partial batch. The reference is what most PyTorch code does:
`DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)` and `torch.optim.Adam` with its default
(per-parameter) implementation. The runner's side is `learnbench.runner`'s own loop: a once-per-epoch permuted,
contiguous copy of the data on the device, slices as batches, fused Adam, no per-step host syncs on CUDA, and the
runner's clock, FLOP sampling and divergence check included. The first repeat of each side is a warm-up and is
not counted (allocator and thread-pool start-up).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from learnbench.algorithms.backprop import Backprop
from learnbench.perf._common import MLP_256, load_data, median_ratio, runner_epoch, seeded_model, sync
from learnbench.runner import Sampler, _generator
from learnbench.spec import TaskInfo

if TYPE_CHECKING:
    from learnbench.datasets import Splits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="counted epochs per side (after one warm-up each)")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--data-dir", default=None)


def main(args: argparse.Namespace) -> int:
    device, data = load_data(args, args.dataset)
    init = seeded_model(MLP_256, data, device).state_dict()
    sides = {"dataloader": _dataloader_epoch, "learnbench": _runner_epoch}
    times: dict[str, list[float]] = {side: [] for side in sides}
    for repeat in range(args.repeats + 1):
        for side, fn in sides.items():
            seconds = fn(data, init, args.batch_size, device, repeat)
            if repeat > 0:
                times[side].append(seconds)
    flops = _flops_per_epoch(data, args.batch_size, device)
    peak = _matmul_peak(device)
    ref, ours = statistics.median(times["dataloader"]), statistics.median(times["learnbench"])
    pair_ratio = median_ratio(times["learnbench"], times["dataloader"])
    rows = [(side, statistics.median(t), min(t), max(t), flops / statistics.median(t) / 1e9)
            for side, t in times.items()]
    print(f"backprop, one {args.dataset} epoch: MLP 784-256-256-10, Adam, batch {args.batch_size}, "
          f"{device}, {torch.get_num_threads()} threads, {args.repeats} counted repeats each (alternated)")
    print(tabulate(rows, headers=["loop", "median s", "min s", "max s", "GFLOP/s"], floatfmt=".3f"))
    print(f"ratio learnbench / dataloader: {pair_ratio:.3f} (median of {args.repeats} alternated pairs; "
          f"ratio of medians {ours / ref:.3f}; goal <= 0.67)")
    print(f"FLOPs per epoch (FlopCounterMode): {flops / 1e9:.2f} GFLOP; matmul peak here: {peak / 1e9:.1f} GFLOP/s;"
          f" learnbench reaches {flops / ours / peak:.0%} of it")
    return 0


def _dataloader_epoch(data: Splits, init: dict, batch_size: int, device: torch.device, repeat: int) -> float:
    model = seeded_model(MLP_256, data, device)
    model.load_state_dict(init)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(repeat)
    loader = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=batch_size, shuffle=True,
                        drop_last=True, generator=generator if device.type == "cpu" else None)
    sync(device)
    start = time.perf_counter()
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
    sync(device)
    return time.perf_counter() - start


def _runner_epoch(data: Splits, init: dict, batch_size: int, device: torch.device, repeat: int) -> float:
    """Wall seconds of one epoch through the runner's loop (`_train`, evaluation off), timed from outside."""
    return runner_epoch(Backprop, data, init, batch_size, device, repeat)[0]


def _flops_per_epoch(data: Splits, batch_size: int, device: torch.device) -> float:
    model = seeded_model(MLP_256, data, device)
    trainer = Backprop(batch_size=batch_size)
    trainer.setup(model, TaskInfo(tuple(data.input_shape), data.n_classes, 1, device), torch.Generator(device))
    sampler = Sampler(data.train_x, data.train_y, batch_size, _generator(0, 1, device))
    with FlopCounterMode(display=False) as counter:
        trainer.step(sampler.next())
    return float(counter.get_total_flops()) * sampler.per_epoch


def _matmul_peak(device: torch.device, n: int = 2048, repeats: int = 5, trials: int = 5) -> float:
    """Achieved FLOP/s of a large float32 matmul here (best of `trials`): the practical peak to compare against."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = 0.0
    for _ in range(trials):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return best

