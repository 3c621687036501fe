"""`learnbench perf es_ray`: OpenAI-ES generations per second in process against `resources.actors = N` Ray actors.

On MNIST (the `cnn` by default, P=256, B=256), it times one `step()` of `openai-es` evaluated in process with one
torch thread, in process with `--threads-all` threads (the same cores as the actors, used by one process), and on N
actors of one CPU each (`--actors 2,4`, the backend the runner installs for `resources.actors = N`:
`learnbench.population_ray.ActorBackend`; the driver keeps one thread). Contenders alternate within every round
after one untimed warm-up generation; the table shows medians over rounds and each contender's ratio to the
one-thread baseline (the median of per-round ratios). It starts a local Ray instance with `max(cores, sum of N)` CPUs
unless one is running; actor start-up (process start, torch import, noise table: the trainer's `setup` with the
backend installed, as in a trial) is timed separately: `setup s`.

Actors pay off when there are more cores than one process can use well, i.e. across machines: every generation
ships the mean and the minibatch to each node (0.85 MB for the cnn at B=256) and waits for the slowest actor.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import time
from typing import Callable

import torch
from tabulate import tabulate

from learnbench import population_backend
from learnbench.algorithms.openai_es import OpenAIES
from learnbench.errors import UsageError
from learnbench.models import build
from learnbench.perf._common import alternate_generations, median_ratio
from learnbench.perf.es import MODELS, load_mnist_train
from learnbench.spec import Batch, TaskInfo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="cnn", choices=sorted(MODELS), help="mlp (784-32-10) or cnn")
    parser.add_argument("--popsize", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--actors", "--workers", dest="actors", default="2",
                        help="comma-separated actor counts (resources.actors)")
    parser.add_argument("--threads-all", type=int, default=os.cpu_count() or 1,
                        help="threads of the in-process contender that uses every core")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the table shows medians")
    parser.add_argument("--gens", type=int, default=2, help="generations per contender per round")
    parser.add_argument("--data-dir", default=None, help="first folder searched for the MNIST files")


def main(args: argparse.Namespace) -> int:
    if args.device not in ("auto", "cpu"):
        raise UsageError("perf es_ray runs on CPU (resources.actors > 0 needs device cpu)")
    from learnbench.population_ray import import_ray

    try:
        ray = import_ray()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    actors = [int(n) for n in args.actors.split(",") if n.strip()]
    if not ray.is_initialized():
        ray.init(num_cpus=max(os.cpu_count() or 1, sum(actors)), include_dashboard=False,
                 logging_level=logging.WARNING)
    torch.set_num_threads(1)
    x, y = load_mnist_train(args.data_dir)
    with contextlib.ExitStack() as backends:  # every contender's actors are killed at the end
        contenders, setup = make_contenders(args, x, actors, backends)
        times = alternate_generations(contenders, x, y, args.batch_size, args.rounds, args.gens)
    base = times["in process, 1 thread"]
    rows = [[name, 1 / statistics.median(s), median_ratio(base, s), setup[name]]
            for name, s in times.items()]
    print(f"learnbench perf es_ray: {args.model}, P={args.popsize}, B={args.batch_size}, {args.rounds} rounds x "
          f"{args.gens} generations, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    print(tabulate(rows, headers=["contender", "gens/s", "vs 1 thread", "setup s"], floatfmt=("", ".3f", ".2f", ".1f")))
    return 0


def make_contenders(args: argparse.Namespace, x: torch.Tensor, actors: list[int], backends: contextlib.ExitStack
                    ) -> tuple[dict[str, Callable[[Batch], object]], dict[str, float]]:
    """Each contender's `step` (with its thread count and, for actors, its backend installed) and setup seconds;
    the actor backends are entered into `backends`."""
    from learnbench.population_ray import ActorBackend

    task = TaskInfo(tuple(x.shape[1:]), 10, x.shape[0], torch.device("cpu"))
    plans = [("in process, 1 thread", 0, 1), (f"in process, {args.threads_all} threads", 0, args.threads_all)]
    plans += [(f"actors={n} (1 CPU each)", n, 1) for n in actors]
    contenders, setup = {}, {}
    for name, n, threads in plans:
        trainer = OpenAIES(popsize=args.popsize, batch_size=args.batch_size)
        backend = backends.enter_context(ActorBackend(n, MODELS[args.model], task)) if n else None
        torch.manual_seed(0)
        start = time.perf_counter()
        with _installed(backend):  # the trainer's setup starts the actors, as in a trial
            trainer.setup(build(MODELS[args.model], task.input_shape, 10), task, torch.Generator().manual_seed(0))
        setup[name] = time.perf_counter() - start
        contenders[name] = _with_threads(trainer.step, threads, backend)
    return contenders, setup


def _installed(backend: population_backend.Backend | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if backend is None else population_backend.evaluated_by(backend)


def _with_threads(step: Callable[[Batch], object], threads: int,
                  backend: population_backend.Backend | None) -> Callable[[Batch], object]:
    def run(batch: Batch) -> object:
        torch.set_num_threads(threads)
        try:
            with _installed(backend):
                return step(batch)
        finally:
            torch.set_num_threads(1)
    return run


if __name__ == "__main__":  # the CLI adds --device itself
    parser = argparse.ArgumentParser(prog="learnbench perf es_ray", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
