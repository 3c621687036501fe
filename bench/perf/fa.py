"""`learnbench perf fa`: one MNIST epoch of each feedback-alignment trainer against backprop, in the same run.

Model MLP 784-256-256-10, batch 128, Adam (every trainer's defaults), on the MNIST training split. Each repeat
times one epoch of every algorithm in turn (the order rotates between repeats, so drifting machine load falls on
all of them alike); the table gives medians over repeats and each median's ratio to backprop's. Only `step` is
timed, over batches cut beforehand from one on-device permutation (as the runner feeds them: tensors already on
the device, no DataLoader); the clock is read after a device synchronisation on CUDA. A few warm-up steps per trainer
run before its clock starts (first-call allocations and kernel selection are not training cost). Process CPU
seconds are printed beside wall-clock seconds: on a shared CPU the wall clock also counts other processes' turns.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate

from learnbench import Batch, TaskInfo, models
from learnbench.algorithms.backprop import Backprop
from learnbench.algorithms.direct_feedback_alignment import DirectFeedbackAlignment
from learnbench.algorithms.feedback_alignment import FeedbackAlignment
from learnbench.algorithms.kolen_pollack import KolenPollack
from learnbench.algorithms.sign_symmetry import SignSymmetry

TRAINERS = (Backprop, FeedbackAlignment, DirectFeedbackAlignment, SignSymmetry, KolenPollack)
LIMIT = 1.15  # the acceptance bound on an FA-family epoch relative to backprop's
WARMUP_STEPS = 5
SPEC = {"kind": "mlp", "hidden": [256, 256]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="epochs timed per algorithm (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data-dir", default=None, help="where the MNIST IDX files are (default: the usual roots)")


def main(args: argparse.Namespace) -> int:
    from learnbench.datasets import load

    device = _device(args.device)
    torch.set_num_threads(args.threads)
    splits = load("mnist", args.data_dir)
    rows = time_epochs(splits.train_x.to(device), splits.train_y.to(device), args.batch_size, args.repeats)
    print(f"MNIST, MLP 784-256-256-10, batch {args.batch_size}, Adam; {args.repeats} epochs each on {device} "
          f"({args.threads} thread(s)); medians")
    print(tabulate(rows, headers=["algorithm", "epoch s", "ratio", "CPU s", "CPU ratio", f"<= {LIMIT}x"],
                   floatfmt=".3f"))
    return 0


def time_epochs(x: torch.Tensor, y: torch.Tensor, batch_size: int, repeats: int) -> list[list]:
    """Median epoch seconds (wall and process CPU) per trainer and ratios to backprop, alternating the trainers."""
    wall: dict[str, list[float]] = {cls.name: [] for cls in TRAINERS}
    cpu: dict[str, list[float]] = {cls.name: [] for cls in TRAINERS}
    for repeat in range(repeats):
        shift = repeat % len(TRAINERS)
        for cls in TRAINERS[shift:] + TRAINERS[:shift]:
            seconds = _epoch(cls, x, y, batch_size, seed=repeat)
            wall[cls.name].append(seconds[0])
            cpu[cls.name].append(seconds[1])
    base_wall, base_cpu = statistics.median(wall["backprop"]), statistics.median(cpu["backprop"])
    rows = []
    for cls in TRAINERS:
        w, c = statistics.median(wall[cls.name]), statistics.median(cpu[cls.name])
        verdict = "" if cls is Backprop else ("yes" if w / base_wall <= LIMIT else "NO")
        rows.append([cls.name, w, w / base_wall, c, c / base_cpu, verdict])
    return rows


def _epoch(cls: type, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one epoch of `cls` from a fresh model; batches are cut before the clock starts."""
    device = x.device
    generator = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)
    model = models.build(SPEC, tuple(x.shape[1:]), 10).to(device)
    trainer = cls(batch_size=batch_size)
    trainer.setup(model, TaskInfo(tuple(x.shape[1:]), 10, len(x), device), generator)
    order = torch.randperm(len(x), generator=generator, device=device)
    batches = [Batch(x[idx], y[idx]) for idx in order[: len(x) // batch_size * batch_size].split(batch_size)]
    for batch in batches[:WARMUP_STEPS]:
        trainer.step(batch)
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        trainer.step(batch)
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
