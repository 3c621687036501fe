"""What the benchmarks share: data loading, seeded models, the runner's epoch timed from outside, alternated rounds
of generations, and the device synchronisation around every timed region. Not a benchmark itself (the leading
underscore keeps it out of `learnbench perf`'s list)."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from learnbench.cost import model_flops
from learnbench.models import build
from learnbench.runner import Progress, Sampler, _generator, _train
from learnbench.spec import Batch, TaskInfo
from learnbench.trial import Budget, EvalSettings, Trial

if TYPE_CHECKING:  # datasets are imported when a benchmark runs, not when `learnbench perf` lists them
    from learnbench.datasets import Splits

MLP_256 = {"kind": "mlp", "hidden": [256, 256]}


def load_data(args: argparse.Namespace, dataset: str) -> tuple[torch.device, Splits]:
    """Set `--threads` (if given), prepare and load `dataset` onto `--device`: (device, splits)."""
    from learnbench.datasets import load, prepare

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    prepare(dataset, args.data_dir)
    return device, load(dataset, args.data_dir).to(device)


def seeded_model(spec: dict, data: Splits, device: torch.device) -> nn.Module:
    """The model `spec` for `data`, initialised from seed 0 on the CPU (global RNG state restored), then moved:
    every side of a comparison starts from the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build(spec, tuple(data.input_shape), data.n_classes).to(device)


def runner_epoch(cls: type, data: Splits, init: dict, batch_size: int, device: torch.device,
                 repeat: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of one epoch of trainer `cls` (Adam, lr 1e-3) on the MLP 256-256 from weights
    `init`, through the runner's own loop (`_train`, evaluation off)."""
    model = seeded_model(MLP_256, data, device)
    model.load_state_dict(init)
    x, y = data.train_x, data.train_y
    task = TaskInfo(tuple(data.input_shape), data.n_classes, int(x.shape[0]), device)
    flops = model_flops(model, task.input_shape)  # of the plain model, before a trainer converts it
    trainer = cls(batch_size=batch_size, optimizer="adam", lr=1e-3)
    trainer.setup(model, task, _generator(repeat, 0, device))
    sampler = Sampler(x, y, batch_size, _generator(repeat, 1, device))
    budget = Budget(steps=sampler.per_epoch)
    progress = Progress(budget, task.n_train, flops)
    trial = Trial(id="perf", label=cls.name, algorithm=cls.name, hparams={}, dataset="perf", model=MLP_256,
                  model_label="mlp-256x2", budget=budget, seed=repeat, eval=EvalSettings(points=0))
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    _train(trainer, sampler, progress, trial, data, [], [], None)
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def alternate_generations(contenders: dict[str, Callable[[Batch], object]], x: torch.Tensor, y: torch.Tensor,
                          batch_size: int, rounds: int, gens: int) -> dict[str, list[float]]:
    """Seconds per generation of each contender, one entry per round: each round runs `gens` generations of every
    contender in turn (round 0, one untimed warm-up generation each), so drifting load hits all of them alike.
    Minibatches are drawn before the clock starts."""
    sampler = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(rounds + 1):
        for name, generation in contenders.items():
            batches = [random_batch(x, y, batch_size, sampler) for _ in range(gens if round_ else 1)]
            sync(x.device)
            start = time.perf_counter()
            for batch in batches:
                generation(batch)
            sync(x.device)
            if round_:
                times[name].append((time.perf_counter() - start) / len(batches))
    return times


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of each round's ratio: robust to the machine's speed drifting during the run, where
    a ratio of medians would compare rounds run under different loads."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def random_batch(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator) -> Batch:
    """`size` rows drawn uniformly with replacement (indices from the CPU `generator`, then moved to x's device)."""
    index = torch.randint(0, x.shape[0], (size,), generator=generator).to(x.device)
    return Batch(x.index_select(0, index), y.index_select(0, index))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # time the work, not the kernel launches
