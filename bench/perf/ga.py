"""`learnbench perf ga`: individual evaluations per second of learnbench's GA against the canonical DEAP loop.

Both sides run the same classic GA generation on MNIST with the MLP 784-32-10 (25,450 weights), the same
population, minibatch and variation settings (default: DEAP's tutorial rates, cxpb 0.5, mutpb 0.2, indpb 0.1,
tournaments of 3, blend crossover with alpha 0.5, sigma 0.002; `--popsize 16 --batch-size 1024 --crossover uniform
--cxpb 1 --mutpb 1 --indpb 1` are the mnist suite's settings):

* `deap-loop`: what DEAP's examples do. Individuals are `numpy.ndarray`s made by `creator`; one generation is
  `toolbox.map(toolbox.evaluate, population)` (plain `map`; each evaluation copies the individual into the module
  with `vector_to_parameters` and runs one torch forward on the generation's minibatch), then `tools.selTournament`,
  `toolbox.clone` of every offspring, `tools.cxBlend` (or `--crossover`'s operator) on consecutive pairs and
  `tools.mutGaussian`, per individual.
* `learnbench-ga`: one `step()` of `learnbench.algorithms.genetic.GeneticAlgorithm`: the whole population evaluated
  in one batched call, DEAP's selection on lightweight individuals, vectorised operators. Its step also re-scores
  the elite candidates on its held-back pool: extra work on its clock, not counted as evaluations.
* `learnbench-ga-deap-ops` (with `--deap-ops`): the same trainer with `operators = "deap"` (DEAP's per-individual
  operators on list genomes), which isolates what batching the evaluation alone buys.

Contenders alternate within every round (after one untimed warm-up generation each) so background load hits all
of them alike; the table shows medians over rounds of evaluations per second and the median of the per-round
ratios against `deap-loop`. One torch thread by default, the runner's one thread per worker.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from deap import base, creator, tools
from tabulate import tabulate

from learnbench.algorithms.genetic import GeneticAlgorithm
from learnbench.models import build
from learnbench.perf._common import alternate_generations, median_ratio
from learnbench.spec import Batch, TaskInfo

CROSSOVERS = {"blend": (tools.cxBlend, {"alpha": 0.5}), "uniform": (tools.cxUniform, {"indpb": 0.5}),
              "two-point": (tools.cxTwoPoint, {})}
MODEL = {"kind": "mlp", "hidden": [32]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--popsize", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cxpb", type=float, default=0.5, help="pair crossover probability (DEAP tutorial)")
    parser.add_argument("--mutpb", type=float, default=0.2, help="individual mutation probability (DEAP tutorial)")
    parser.add_argument("--indpb", type=float, default=0.1, help="gene mutation probability (DEAP tutorial)")
    parser.add_argument("--sigma", type=float, default=0.002, help="Gaussian mutation std (Such et al. 2017)")
    parser.add_argument("--crossover", default="blend", choices=sorted(CROSSOVERS), help="cxBlend (alpha 0.5), "
                        "cxUniform (indpb 0.5) or cxTwoPoint")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the table shows medians")
    parser.add_argument("--gens", type=int, default=2, help="generations per contender per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the runner uses 1 per worker)")
    parser.add_argument("--deap-ops", action="store_true", help="also time the trainer with operators='deap'")
    parser.add_argument("--data-dir", default=None, help="first folder searched for the MNIST files")


def main(args: argparse.Namespace) -> int:
    from learnbench.datasets import load

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    splits = load("mnist", args.data_dir)
    x, y = splits.train_x.to(device), splits.train_y.to(device)
    contenders = make_contenders(args, x.shape[1:], device)
    times = alternate_generations(contenders, x, y, args.batch_size, args.rounds, args.gens)
    rows = []
    for name, seconds in times.items():
        ratio = median_ratio(times["deap-loop"], seconds)
        median = statistics.median(seconds)
        rows.append([name, 1 / median, args.popsize / median, ratio])
    print(f"learnbench perf ga: MLP 784-32-10 on MNIST, device {device}, threads {args.threads}, "
          f"P={args.popsize}, B={args.batch_size}, {args.crossover} crossover, cxpb {args.cxpb}, mutpb {args.mutpb}, "
          f"indpb {args.indpb}, "
          f"{args.rounds} rounds x {args.gens} generations, load average {os.getloadavg()[0]:.2f}")
    print(tabulate(rows, headers=["contender", "gens/s", "evals/s", "vs deap-loop"], floatfmt=("", ".2f", ".0f",
                                                                                            ".1f")))
    return 0


def make_contenders(args: argparse.Namespace, input_shape: tuple[int, ...],
                    device: torch.device) -> dict[str, Callable[[Batch], object]]:
    """name -> function running one generation on a batch; every side starts from the same initial model."""
    task = TaskInfo(tuple(input_shape), 10, 60000, device)
    settings = dict(variant="classic", popsize=args.popsize, batch_size=args.batch_size, cxpb=args.cxpb,
                    mutpb=args.mutpb, indpb=args.indpb, sigma=args.sigma, crossover=args.crossover, tournsize=3)
    contenders: dict[str, Callable[[Batch], object]] = {}
    for name, operators in [("learnbench-ga", "vectorised"), ("learnbench-ga-deap-ops", "deap")]:
        if operators == "deap" and not args.deap_ops:
            continue
        torch.manual_seed(0)
        trainer = GeneticAlgorithm(operators=operators, **settings)
        trainer.setup(build(MODEL, task.input_shape, 10).to(device), task, torch.Generator(device).manual_seed(0))
        contenders[name] = trainer.step
    torch.manual_seed(0)
    contenders["deap-loop"] = DeapLoop(build(MODEL, task.input_shape, 10).to(device), args)
    return contenders


class DeapLoop:
    """The canonical DEAP generation (the Overview tutorial's loop), one Python call per individual."""

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace):
        if not hasattr(creator, "LearnbenchPerfFitness"):  # creator is global: create once, under our names
            creator.create("LearnbenchPerfFitness", base.Fitness, weights=(-1.0,))
            creator.create("LearnbenchPerfIndividual", np.ndarray, fitness=creator.LearnbenchPerfFitness)
        self.model, self.args, self.random = model.eval(), args, random.Random(0)
        start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu().numpy()
        # Perturbed copies of the initial model (how the population starts does not change the cost).
        noise = np.random.default_rng(0).normal(0, 0.01, (args.popsize, start.size)).astype(np.float32)
        self.population = [creator.LearnbenchPerfIndividual(start + row) for row in noise]
        self.toolbox = base.Toolbox()
        self.toolbox.register("evaluate", self.evaluate)
        mate, options = CROSSOVERS[args.crossover]
        self.toolbox.register("mate", mate, **options)
        self.toolbox.register("mutate", tools.mutGaussian, mu=0.0, sigma=args.sigma, indpb=args.indpb)
        self.toolbox.register("select", tools.selTournament, tournsize=3)
        self.batch: Batch | None = None

    @torch.no_grad()
    def evaluate(self, individual: np.ndarray) -> tuple[float]:
        vector = torch.from_numpy(individual).to(self.batch.x.device)
        torch.nn.utils.vector_to_parameters(vector, self.model.parameters())
        return (F.cross_entropy(self.model(self.batch.x), self.batch.y).item(),)

    def __call__(self, batch: Batch) -> None:
        self.batch, toolbox, args = batch, self.toolbox, self.args
        state = random.getstate()
        random.setstate(self.random.getstate())  # DEAP draws from Python's `random`
        for ind, fit in zip(self.population, toolbox.map(toolbox.evaluate, self.population)):
            ind.fitness.values = fit
        offspring = list(map(toolbox.clone, toolbox.select(self.population, len(self.population))))
        for child1, child2 in zip(offspring[::2], offspring[1::2]):
            if random.random() < args.cxpb:
                toolbox.mate(child1, child2)
                del child1.fitness.values, child2.fitness.values
        for mutant in offspring:
            if random.random() < args.mutpb:
                toolbox.mutate(mutant)
                del mutant.fitness.values
        self.population[:] = offspring
        self.random.setstate(random.getstate())
        random.setstate(state)


if __name__ == "__main__":  # the CLI adds --device itself
    parser = argparse.ArgumentParser(prog="learnbench perf ga", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
