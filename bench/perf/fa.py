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
import time

import torch
from tabulate import tabulate

from learnbench.algorithms.backprop import Backprop
from learnbench.algorithms.direct_feedback_alignment import DirectFeedbackAlignment
from learnbench.algorithms.feedback_alignment import FeedbackAlignment
from learnbench.algorithms.kolen_pollack import KolenPollack
from learnbench.algorithms.sign_symmetry import SignSymmetry
from learnbench.models import build
from learnbench.runner import Progress, Sampler, _generator, _train
from learnbench.spec import TaskInfo

TRAINERS = (Backprop, FeedbackAlignment, DirectFeedbackAlignment, SignSymmetry, KolenPollack)
LIMIT = 1.15  # acceptance: an FA-family epoch takes at most this times backprop's
SPEC = {"kind": "mlp", "hidden": [256, 256]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="counted epochs per algorithm (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--data-dir", default=None)


def main(args: argparse.Namespace) -> int:
    from learnbench.datasets import load, prepare

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    prepare("mnist", args.data_dir)
    data = load("mnist", args.data_dir).to(device)
    rows = time_epochs(data, args.batch_size, args.repeats, device)
    print(f"one MNIST epoch: MLP 784-256-256-10, Adam, batch {args.batch_size}, {device}, "
          f"{torch.get_num_threads()} threads, {args.repeats} counted repeats each (alternated)")
    print(tabulate(rows, headers=["algorithm", "median s", "ratio", "CPU s", "CPU ratio", f"ratio <= {LIMIT}"],
                   floatfmt=".3f"))
    return 0


def time_epochs(data, batch_size: int, repeats: int, device: torch.device) -> list[list]:
    """Per trainer: median wall and CPU seconds of an epoch, and the median per-repeat ratios to backprop."""
    init = _model(data, device).state_dict()
    wall: dict[str, list[float]] = {cls.name: [] for cls in TRAINERS}
    cpu: dict[str, list[float]] = {cls.name: [] for cls in TRAINERS}
    for repeat in range(repeats + 1):
        shift = repeat % len(TRAINERS)
        for cls in TRAINERS[shift:] + TRAINERS[:shift]:
            seconds = _runner_epoch(cls, data, init, batch_size, device, repeat)
            if repeat > 0:
                wall[cls.name].append(seconds[0])
                cpu[cls.name].append(seconds[1])
    rows = []
    for cls in TRAINERS:
        ratio = statistics.median(o / r for o, r in zip(wall[cls.name], wall["backprop"]))
        cpu_ratio = statistics.median(o / r for o, r in zip(cpu[cls.name], cpu["backprop"]))
        verdict = "" if cls is Backprop else ("yes" if ratio <= LIMIT else "NO")
        rows.append([cls.name, statistics.median(wall[cls.name]), ratio, statistics.median(cpu[cls.name]),
                     cpu_ratio, verdict])
    return rows


def _model(data, device: torch.device) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build(SPEC, data.input_shape, data.n_classes).to(device)


def _runner_epoch(cls: type, data, init: dict, batch_size: int, device: torch.device,
                  repeat: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of one epoch of `cls` through the runner's loop."""
    model = _model(data, device)
    model.load_state_dict(init)
    x, y = data.train_x, data.train_y
    task = TaskInfo(tuple(data.input_shape), data.n_classes, int(x.shape[0]), device)
    trainer = cls(batch_size=batch_size, optimizer="adam", lr=1e-3)
    trainer.setup(model, task, _generator(repeat, 0, device))
    sampler = Sampler(x, y, batch_size, _generator(repeat, 1, device))
    progress = Progress({"steps": sampler.per_epoch}, task.n_train)
    trial = {"eval": {"points": 0, "batch_size": 2048}, "diagnostics": {"every": 0, "probes": []}}
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    _train(trainer, sampler, progress, trial, data, [], [], None)
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
