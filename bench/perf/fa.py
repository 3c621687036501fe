"""`learnbench perf fa`: one MNIST epoch of each feedback-alignment trainer against backprop, in the same run.

Model MLP 784-256-256-10 (the same initial weights for all), batch 128, Adam lr 1e-3 (every trainer's defaults),
on the MNIST training split. Each epoch goes through the runner's own loop (`learnbench.runner._train`: on-device
index sampling, its clock, FLOP sampling and divergence check, evaluation off), timed from outside with a device
synchronisation at both ends. One repeat times one epoch of every algorithm in turn, rotating the order between
repeats so drifting machine load falls on all of them alike; the first repeat is a warm-up and is not counted.
Ratios are the median over repeats of (algorithm / backprop) within the same repeat. Process CPU seconds are given
beside wall seconds: on a shared CPU the wall clock also counts other processes' turns, the CPU clock much less.
"""

from __future__ import annotations

import argparse
import statistics
from typing import TYPE_CHECKING

import torch
from tabulate import tabulate

from learnbench.algorithms.backprop import Backprop
from learnbench.algorithms.direct_feedback_alignment import DirectFeedbackAlignment
from learnbench.algorithms.feedback_alignment import FeedbackAlignment
from learnbench.algorithms.kolen_pollack import KolenPollack
from learnbench.algorithms.sign_symmetry import SignSymmetry
from learnbench.perf._common import MLP_256, load_data, median_ratio, runner_epoch, seeded_model

if TYPE_CHECKING:
    from learnbench.datasets import Splits

TRAINERS = (Backprop, FeedbackAlignment, DirectFeedbackAlignment, SignSymmetry, KolenPollack)
LIMIT = 1.15  # acceptance: an FA-family epoch takes at most this times backprop's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="counted epochs per algorithm (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--data-dir", default=None)


def main(args: argparse.Namespace) -> int:
    device, data = load_data(args, "mnist")
    rows = time_epochs(data, args.batch_size, args.repeats, device)
    print(f"one MNIST epoch: MLP 784-256-256-10, Adam, batch {args.batch_size}, {device}, "
          f"{torch.get_num_threads()} threads, {args.repeats} counted repeats each (alternated)")
    print(tabulate(rows, headers=["algorithm", "median s", "ratio", "CPU s", "CPU ratio", f"ratio <= {LIMIT}"],
                   floatfmt=".3f"))
    return 0


def time_epochs(data: Splits, batch_size: int, repeats: int, device: torch.device) -> list[list]:
    """Per trainer: median wall and CPU seconds of an epoch, and the median per-repeat ratios to backprop."""
    init = seeded_model(MLP_256, data, device).state_dict()
    wall: dict[str, list[float]] = {cls.name: [] for cls in TRAINERS}
    cpu: dict[str, list[float]] = {cls.name: [] for cls in TRAINERS}
    for repeat in range(repeats + 1):
        shift = repeat % len(TRAINERS)
        for cls in TRAINERS[shift:] + TRAINERS[:shift]:
            seconds = runner_epoch(cls, data, init, batch_size, device, repeat)
            if repeat > 0:
                wall[cls.name].append(seconds[0])
                cpu[cls.name].append(seconds[1])
    rows = []
    for cls in TRAINERS:
        ratio = median_ratio(wall[cls.name], wall["backprop"])
        cpu_ratio = median_ratio(cpu[cls.name], cpu["backprop"])
        verdict = "" if cls is Backprop else ("yes" if ratio <= LIMIT else "NO")
        rows.append([cls.name, statistics.median(wall[cls.name]), ratio, statistics.median(cpu[cls.name]),
                     cpu_ratio, verdict])
    return rows

