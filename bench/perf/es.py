"""`learnbench perf es`: generations per second of the ES trainers against a per-member loop and EvoTorch.

On MNIST (the `mlp` 784-32-10 and the `cnn`), with one population size and one minibatch size for everyone
(default P=256, B=256), it times:

* `openai-es`, `snes`, `snes-antithetic`, `cma-es`: one `step()` of the learnbench trainer at its defaults
  (population evaluated in one batched call; cma-es runs separable on both models);
* `loop`: the same OpenAI-ES generation written the plain way: load each member's vector into the module
  (`vector_to_parameters`), call it, then rank, estimate the gradient and take an Adam step (same noise table);
* `evotorch-snes`, `evotorch-pgpe`: one `searcher.step()` of EvoTorch's SNES and PGPE on a `SupervisedNE` problem
  with the same module, population and minibatch size (optional: `pip install learnbench[peers]`). EvoTorch draws
  its minibatch from a `DataLoader` inside the step; the others get theirs outside the clock (sampling 256 indices
  costs ~0.1 ms, a DataLoader batch a few ms: small next to a generation).

Contenders alternate within every round (each round times `--gens` generations of each, after one untimed warm-up
generation), so background load hits all of them alike; the table shows medians over rounds and ratios against
EvoTorch's SNES and against the loop (ratios: the median over rounds of each round's time ratio). Threads default
to 1, the runner's one thread per worker (`--threads 2` to compare).
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate

from learnbench.noise import NoiseTable
from learnbench.algorithms.cma_es import CMAES
from learnbench.algorithms.openai_es import OpenAIES, search_direction
from learnbench.algorithms.snes import SNES
from learnbench.errors import UsageError
from learnbench.models import build
from learnbench.perf._common import alternate_generations, median_ratio
from learnbench.spec import Batch, TaskInfo

MODELS = {"mlp": {"kind": "mlp", "hidden": [32]}, "cnn": {"kind": "cnn"}}
GENS = {"mlp": 5, "cnn": 1}  # generations per contender per round: ~0.2-1 s of work each


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp (784-32-10), cnn (11,274 params)")
    parser.add_argument("--popsize", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the table shows medians")
    parser.add_argument("--gens", type=int, default=None, help="generations per contender per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the runner uses 1 per worker)")
    parser.add_argument("--contenders", default=None, help="comma-separated subset of the contenders")
    parser.add_argument("--data-dir", default=None, help="first folder searched for the MNIST files")


def main(args: argparse.Namespace) -> int:
    device = _device(args.device)
    torch.set_num_threads(args.threads)
    x, y = load_mnist_train(args.data_dir)
    x, y = x.to(device), y.to(device)
    rows = []
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if model_name not in MODELS:
            raise UsageError(f"unknown model {model_name!r} for perf es; known: {', '.join(MODELS)}")
        rows += bench_model(model_name, x, y, device, args)
    print(f"learnbench perf es: device {device}, threads {args.threads}, P={args.popsize}, B={args.batch_size}, "
          f"{args.rounds} rounds, load average {os.getloadavg()[0]:.2f}")
    print(tabulate(rows, headers=["model", "contender", "gens/s", "example-fwd/s", "vs evotorch-snes", "vs loop"],
                   floatfmt=("", "", ".2f", ".3g", ".2f", ".2f")))
    return 0


def bench_model(model_name: str, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                args: argparse.Namespace) -> list[list]:
    contenders = make_contenders(model_name, x, y, device, args.popsize, args.batch_size)
    if args.contenders:
        wanted = {c.strip() for c in args.contenders.split(",")}
        contenders = {k: v for k, v in contenders.items() if k in wanted}
    times = alternate_generations(contenders, x, y, args.batch_size, args.rounds, args.gens or GENS[model_name])
    rows = []
    for name, seconds in times.items():
        versus = [median_ratio(times[ref], seconds) if ref in times else None for ref in ("evotorch-snes", "loop")]
        median = statistics.median(seconds)
        rows.append([model_name, name, 1 / median, args.popsize * args.batch_size / median, *versus])
    return rows


def make_contenders(model_name: str, x: torch.Tensor, y: torch.Tensor, device: torch.device, popsize: int,
                    batch_size: int) -> dict[str, Callable[[Batch], object]]:
    """name -> function running one generation on a batch."""
    task = TaskInfo(tuple(x.shape[1:]), 10, x.shape[0], device)
    contenders: dict[str, Callable[[Batch], object]] = {}
    for name, trainer in [("openai-es", OpenAIES(popsize=popsize, batch_size=batch_size)),
                          ("snes", SNES(popsize=popsize, batch_size=batch_size)),
                          ("snes-antithetic", SNES(popsize=popsize, batch_size=batch_size, antithetic=True)),
                          ("cma-es", CMAES(popsize=popsize, batch_size=batch_size))]:
        torch.manual_seed(0)
        trainer.setup(build(MODELS[model_name], task.input_shape, 10).to(device), task,
                      torch.Generator(device).manual_seed(0))
        contenders[name] = trainer.step
    torch.manual_seed(0)
    contenders["loop"] = LoopOpenAIES(build(MODELS[model_name], task.input_shape, 10).to(device), popsize)
    contenders.update(evotorch_contenders(model_name, x, y, device, popsize, batch_size))
    return contenders


class LoopOpenAIES:
    """The reference: an OpenAI-ES generation that evaluates its members one at a time through the module. Its
    noise comes from the same kind of shared noise table as the trainer's, so the ratio isolates evaluation."""

    def __init__(self, model: torch.nn.Module, popsize: int, sigma: float = 0.02):
        self.model, self.popsize, self.sigma = model.eval(), popsize, sigma
        self.mean = torch.nn.Parameter(torch.nn.utils.parameters_to_vector(model.parameters()).detach())
        self.adam = torch.optim.Adam([self.mean], lr=0.01)
        generator = torch.Generator(self.mean.device).manual_seed(0)
        self.noise = NoiseTable(generator, OpenAIES.noise_table, self.mean.numel(), self.mean.device)

    @torch.no_grad()
    def __call__(self, batch: Batch) -> None:
        noise = self.noise.sample(self.popsize // 2)  # [P/2, n]
        members = torch.cat([self.mean + self.sigma * noise, self.mean - self.sigma * noise])  # [P, n]
        losses = torch.empty(self.popsize, device=self.mean.device)
        for i, member in enumerate(members):
            torch.nn.utils.vector_to_parameters(member, self.model.parameters())
            losses[i] = F.cross_entropy(self.model(batch.x), batch.y)
        self.mean.grad = 0.005 * self.mean - search_direction(noise, losses)  # Salimans et al.'s update
        self.adam.step()


def evotorch_contenders(model_name: str, x: torch.Tensor, y: torch.Tensor, device: torch.device, popsize: int,
                        batch_size: int) -> dict[str, Callable[[Batch], object]]:
    try:
        from evotorch.algorithms import PGPE
        from evotorch.algorithms import SNES as EvoSNES
        from evotorch.neuroevolution import SupervisedNE
    except ImportError:
        print("EvoTorch is not installed (pip install 'learnbench[peers]'): skipping its contenders")
        return {}
    dataset = torch.utils.data.TensorDataset(x, y)
    out = {}
    for name in ("evotorch-snes", "evotorch-pgpe"):
        torch.manual_seed(0)
        problem = SupervisedNE(dataset, build(MODELS[model_name], tuple(x.shape[1:]), 10), F.cross_entropy,
                               minibatch_size=batch_size, num_minibatches=1, common_minibatch=True,
                               device=str(device))
        searcher = (EvoSNES(problem, popsize=popsize, stdev_init=0.1) if name == "evotorch-snes" else
                    PGPE(problem, popsize=popsize, center_learning_rate=0.01, stdev_learning_rate=0.1,
                         stdev_init=0.1, optimizer="clipup", ranking_method="centered"))
        out[name] = lambda batch, s=searcher: s.step()  # EvoTorch draws its own minibatch
    return out


def load_mnist_train(data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST training images `[N, 1, 28, 28]` in [0, 1] and labels (`learnbench.datasets`, verified files)."""
    from learnbench.datasets import load

    splits = load("mnist", data_dir)
    return splits.train_x, splits.train_y


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available")
    return torch.device(name)


if __name__ == "__main__":  # the CLI adds --device itself
    parser = argparse.ArgumentParser(prog="learnbench perf es", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
