"""OpenAI evolution strategy (Salimans, Ho, Chen, Sidor & Sutskever 2017, "Evolution Strategies as a Scalable
Alternative to Reinforcement Learning", arXiv:1703.03864; code: github.com/openai/evolution-strategies-starter).

One generation per `step()`: draw `popsize / 2` noise vectors from the trainer's generator, evaluate the mirrored
(antithetic) pairs `mean +- sigma * eps` on the step's minibatch in one batched call
(`learnbench.population.evaluate_mirrored`), shape the losses into centred ranks `u`, and update the flat mean with a
`torch.optim` optimizer exactly as Salimans et al.'s code does (`es_distributed/es.py`, `run_master`):

    g = 1/P sum_j (u+_j - u-_j) eps_j            (`search_direction`; P = popsize members, no 1/sigma)
    optimizer.update(-g + weight_decay * mean)    (the optimizer itself has no weight decay)

so the L2 coefficient has its stated strength at every sigma (Adam's own `weight_decay` added to g / sigma would be
sigma times weaker, 33x at sigma 0.03, and drift as sigma decays). `gradient_estimate` = g / sigma is the search-gradient estimate itself, the quantity that approaches the true
gradient (tests compare it with autograd); the optimizer sees sigma times it. Adam's step does not depend on that
scale (beyond its eps); for sgd and momentum the learning rate multiplies g, as in Salimans et al.'s SGD.

Defaults are the paper's (Adam, lr 0.01, sigma 0.02, L2 0.005, mirrored sampling, centred ranks). The optional
exponential decays of sigma and of the learning rate, with floors, are EvoJAX's OpenES settings for MNIST
(decay 0.999, floors 0.01 and 0.001: github.com/google/evojax scripts/benchmarks/configs/OpenES/mnist.yaml); off by
default. Perturbations are windows of the paper's shared noise table (`learnbench.noise.NoiseTable`, 128 MiB
by default, drawn from the trainer's generator); the noise matrix `[popsize/2, n_params]` lives for one generation.
Where the members are evaluated is a resource of the run, not a hyper-parameter: a suite's `[resources] actors = N`
has the runner evaluate each generation on N Ray actors holding copies of the table, as in the paper's distributed
version (only offsets, the mean and the minibatch go out, losses come back; same results:
`learnbench.population_ray`). This file has one code path either way; with `noise_table = 0` the actors are sent
the fresh noise rows themselves.

Declared cost (`StepStats.extra_flops`, by `learnbench.cost`'s rule: 1 FLOP per elementwise operation or normal
drawn, 2 per multiply-add), per generation, n parameters, P = popsize, H = P/2 pairs (`generation_flops`):

    noise            0 from the table (a gather), H n normals when noise_table = 0
    members          2 P n: mean +- sigma * eps, charged in full whoever builds them and whatever they share
    centred ranks    2 P + H: the rank scaling and the pair differences (the sort compares, it does no arithmetic)
    g                2 H n + n: the weighted sum of the noise rows, then the 1/P scaling
    gradient         2 n: -g + weight_decay * mean (n, the negation, when weight_decay = 0)
    optimizer step   `learnbench.cost.optimizer_flops` of the optimizer on the mean
The decays of sigma and the learning rate are scalar work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from learnbench import cost, population
from learnbench.noise import NoiseTable, normal
from learnbench.search_space import Choice, Dimension, LogUniform
from learnbench.spec import Batch, StepStats, TaskInfo

OPTIMIZERS = ("adam", "sgd", "momentum")


@dataclass(eq=False)
class OpenAIES:
    """OpenAI-ES: antithetic Gaussian perturbations, centred ranks, Adam on the mean."""

    name: ClassVar[str] = "openai-es"

    popsize: int = 256
    """Members per generation (even: popsize/2 mirrored pairs)."""
    batch_size: int = 256
    """Examples in the minibatch every member of a generation is evaluated on."""
    sigma: float = 0.02
    """Standard deviation of the parameter perturbations (Salimans et al.: 0.02)."""
    sigma_decay: float = 1.0
    """Multiply sigma by this after every generation (EvoJAX MNIST: 0.999); 1 keeps it constant."""
    sigma_min: float = 0.0
    """Floor of the decayed sigma (EvoJAX MNIST: 0.01)."""
    optimizer: str = "adam"
    """Optimizer on the mean: adam (the paper's), sgd, momentum (SGD with momentum 0.9)."""
    lr: float = 0.01
    """Learning rate of the optimizer (Salimans et al.: Adam, 0.01)."""
    lr_decay: float = 1.0
    """Multiply the learning rate by this after every generation (EvoJAX MNIST: 0.999)."""
    lr_min: float = 0.0
    """Floor of the decayed learning rate (EvoJAX MNIST: 0.001)."""
    weight_decay: float = 0.005
    """L2 coefficient: the optimizer is handed -g + weight_decay * mean (Salimans et al.: 0.005)."""
    noise_table: int = 2**25
    """Floats in the shared noise table the perturbations are read from (Salimans et al. 2017: 250M); 0 draws
    fresh normals every generation."""
    chunk_size: int | None = None
    """Members evaluated at once; None sizes chunks to `learnbench.population.DEFAULT_MEMORY_BYTES`."""

    search_space: ClassVar[dict[str, Dimension]] = {
        # EvoJAX's OpenES tuning grid (github.com/google/evojax scripts/benchmarks/configs/OpenES/search.yaml):
        # init_stdev 0.01 to 0.1 and Adam's lrate_init 0.001 to 0.1; Salimans et al.'s 0.02 and 0.01 lie inside.
        "sigma": LogUniform(0.01, 0.1),
        "lr": LogUniform(1e-3, 0.1),
        # Powers of two around the default 256, from EvoJAX's MNIST population (pop_size 100, OpenES/mnist.yaml)
        # up; all even, as mirrored pairs need.
        "popsize": Choice((64, 128, 256, 512)),
    }

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self.validate()
        self._model, self._generator = model, generator
        self._mean = nn.Parameter(population.flatten(model))  # [n_params], the search distribution's center
        self._optimizer = self._make_optimizer()
        floor = self.lr_min / self.lr
        self._scheduler = torch.optim.lr_scheduler.LambdaLR(
            self._optimizer, lambda t: max(self.lr_decay**t, floor))
        self._sigma = self.sigma
        self.update_parts: dict[str, Tensor] = {}  # the last step's descent direction before the optimizer
        n = self._mean.numel()
        self._table = (NoiseTable(generator, self.noise_table, n, self._mean.device)
                       if self.noise_table else None)
        self._extra_flops = generation_flops(n, self.popsize, not self.noise_table, self.weight_decay,
                                             cost.optimizer_flops(self._optimizer))

    def validate(self) -> None:
        """Check hyper-parameter values; raises ValueError naming the bad one."""
        if self.popsize < 2 or self.popsize % 2:
            raise ValueError(f"popsize must be even and >= 2 (mirrored pairs); got {self.popsize}")
        if self.batch_size <= 0 or self.sigma <= 0 or self.lr <= 0:
            raise ValueError("batch_size, sigma and lr must be positive")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")
        if not (0 < self.sigma_decay <= 1 and 0 < self.lr_decay <= 1):
            raise ValueError("sigma_decay and lr_decay must be in (0, 1]")
        if self.noise_table < 0:
            raise ValueError(f"noise_table must be >= 0; got {self.noise_table}")

    def _make_optimizer(self) -> torch.optim.Optimizer:
        # No weight decay here: `tell` adds it to -g itself, as Salimans et al. do.
        if self.optimizer == "adam":
            return torch.optim.Adam([self._mean], lr=self.lr)
        momentum = 0.9 if self.optimizer == "momentum" else 0.0
        return torch.optim.SGD([self._mean], lr=self.lr, momentum=momentum)

    def ask(self) -> Tensor:
        """This generation's noise `[popsize/2, n_params]`: members are `mean + sigma * eps` then `mean - sigma*eps`."""
        if self._table is not None:
            return self._table.sample(self.popsize // 2)
        return normal(self._generator, self.popsize // 2, self._mean.numel(), self._mean.device)

    def tell(self, noise: Tensor, loss: Tensor) -> None:
        """Update the mean from the members' losses `[popsize]` (ordered as `ask` describes): the optimizer steps
        on `-g + weight_decay * mean` (Salimans et al.'s `optimizer.update(-g + l2coeff * theta)`)."""
        g = search_direction(noise, loss)  # [n_params]
        self.update_parts = {"es-estimate": g / self._sigma}  # the search gradient, for the update-grad probe
        self._mean.grad = self.weight_decay * self._mean.detach() - g if self.weight_decay else -g
        self._optimizer.step()
        self._scheduler.step()
        self._sigma = max(self._sigma * self.sigma_decay, self.sigma_min)

    def step(self, batch: Batch) -> StepStats:
        # Rows of the table stay named by their offsets, so wherever the run evaluates members, only those travel.
        noise = self.ask()  # [popsize/2, n_params]
        # This generation's sigma and learning rate (both decay in `tell`): sigma * sigma_decay^t, lr * lr_decay^t,
        # floored, at generation t.
        metrics = {"sigma": self._sigma, "lr": self._optimizer.param_groups[0]["lr"]}
        loss, _ = population.evaluate_mirrored(self._model, self._mean.detach(), noise, self._sigma,
                                               batch.x, batch.y, chunk_size=self.chunk_size)  # [popsize]
        self.tell(noise, loss)
        # The reported loss is the population's mean (the center is not evaluated: that would cost B more passes).
        return StepStats(loss=loss.nanmean(), forward_passes=self.popsize * batch.y.shape[0],
                         extra_flops=self._extra_flops, metrics=metrics)

    def eval_model(self) -> nn.Module:
        return population.load(self._model, self._mean.detach())


def search_direction(noise: Tensor, loss: Tensor) -> Tensor:
    """Salimans et al.'s `g` `[n_params]`: `1/(2H) sum_j (u+_j - u-_j) eps_j` with centred-rank utilities `u`
    (ascent direction: lower loss), sigma times the search-gradient estimate. `noise [H, n_params]`, `loss [2H]` for
    members `+eps` then `-eps`."""
    utility = population.centered_ranks(loss)  # [2H], +0.5 for the best member
    half = noise.shape[0]
    weights = (utility[:half] - utility[half:]).to(noise.dtype)  # [H]
    return (weights @ noise) / (2 * half)


def gradient_estimate(noise: Tensor, loss: Tensor, sigma: float) -> Tensor:
    """Search-gradient estimate `[n_params]` of the centred-rank utility (ascent direction: lower loss):
    `search_direction / sigma = 1/(2H sigma) sum_j (u+_j - u-_j) eps_j`, what approaches the true gradient."""
    return search_direction(noise, loss) / sigma


def generation_flops(n_params: int, popsize: int, fresh_noise: bool, weight_decay: float,
                     optimizer_step: float) -> float:
    """FLOPs of one generation outside the model, by the table in the module docstring."""
    n, half = n_params, popsize // 2
    noise = half * n if fresh_noise else 0  # one FLOP per normal drawn; the table's windows are a gather
    members = 2 * popsize * n  # mean +- sigma * eps
    ranks = 2 * popsize + half  # 0.5 - rank / (P - 1), then u+ - u-
    direction = 2 * half * n + n  # [H] @ [H, n], then / P
    gradient = (2 if weight_decay else 1) * n  # -g + weight_decay * mean
    return float(noise + members + ranks + direction + gradient + optimizer_step)
