"""Separable natural evolution strategy (Schaul, Glasmachers & Schmidhuber 2011, "High Dimensions and Heavy Tails for
Natural Evolution Strategies", GECCO; algorithm and defaults as in Wierstra et al. 2014, "Natural Evolution
Strategies", JMLR 15, Table 1 and Algorithm 6).

The search distribution is a Gaussian with a per-parameter standard deviation: `theta = mu + sigma * s`,
`s ~ N(0, I)`. One generation per `step()`: sample `popsize` members, evaluate them on the step's minibatch in one
batched call, rank them, and follow the natural gradient with the NES utilities `u_k`:

    grad_mu    = sum_k u_k s_k                mu    <- mu + lr_mean * sigma * grad_mu
    grad_sigma = sum_k u_k (s_k^2 - 1)        sigma <- sigma * exp(lr_sigma / 2 * grad_sigma)

Published defaults, d = number of parameters: `popsize = 4 + floor(3 ln d)`, `lr_mean = 1`,
`lr_sigma = (3 + ln d) / (5 sqrt d)`; utilities `u_k = max(0, ln(popsize/2 + 1) - ln k) / sum_j (...) - 1/popsize`
for the k-th best member. `antithetic` evaluates mirrored pairs `mu +- sigma * s` (Brockhoff et al. 2010; off in the
paper), which lets `learnbench.population.evaluate_mirrored` share the first layer's work. The initial standard
deviation is problem-specific (the paper's benchmarks start from 1 on unit-scaled problems); `sigma_init = 0.1`
suits networks initialised with PyTorch's default scheme. Samples are read from a shared noise table as in
Salimans et al. 2017 (`learnbench.noise.NoiseTable`: same N(0, 1) marginals, 10x cheaper than fresh draws on
CPU); `noise_table = 0` draws fresh normals instead. Where the members are evaluated is a resource of the run, not a
hyper-parameter: a suite's `[resources] actors = N` has the runner evaluate each generation on N Ray actors holding
copies of that table (only offsets go out, or the fresh rows when `noise_table = 0`; same results:
`learnbench.population_ray`). This file has one code path either way (`population.evaluate_mirrored`, or
`evaluate_perturbed` without antithetic pairs).

Declared cost (`StepStats.extra_flops`, by `learnbench.cost`'s rule: 1 FLOP per elementwise operation, `exp`
included, or normal drawn, 2 per multiply-add), per generation, d parameters, P = popsize, R noise rows (P, or P/2
when antithetic) (`generation_flops`):

    noise        0 from the table (a gather), R d normals when noise_table = 0
    members      2 P d: mu + sigma * s (mu +- sigma * s), charged in full whoever builds them
    utilities    0: assigned by rank (a sort compares, it does no arithmetic); antithetic: 2 R for the pairs'
                 differences and sums
    grad_mu      2 R d: the utility-weighted sum of the samples
    grad_sigma   R d + 2 R d + R + d: the squares, their weighted sum, sum_k u_k, the subtraction
    updates      3 d for mu (lr_mean * sigma * grad_mu, added), 3 d for sigma (scaled, exp, multiplied)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from learnbench import population
from learnbench.noise import NoiseTable, normal
from learnbench.search_space import Choice, Dimension, LogUniform
from learnbench.spec import Batch, StepStats, TaskInfo


@dataclass(eq=False)
class SNES:
    """Separable NES: diagonal Gaussian, natural-gradient updates of mean and per-parameter std."""

    name: ClassVar[str] = "snes"

    popsize: int | None = None
    """Members per generation; None: 4 + floor(3 ln d) (Schaul et al. 2011)."""
    batch_size: int = 256
    """Examples in the minibatch every member of a generation is evaluated on."""
    sigma_init: float = 0.1
    """Initial standard deviation of every parameter."""
    lr_mean: float = 1.0
    """Learning rate of the mean (Schaul et al. 2011: 1)."""
    lr_sigma: float | None = None
    """Learning rate of the standard deviations; None: (3 + ln d) / (5 sqrt d) (Schaul et al. 2011)."""
    antithetic: bool = False
    """Sample mirrored pairs mu +- sigma * s (needs an even popsize)."""
    noise_table: int = 2**25
    """Floats in the shared noise table samples are read from (`learnbench.noise.NoiseTable`); 0 draws fresh
    normals every generation."""
    chunk_size: int | None = None
    """Members evaluated at once; None sizes chunks to `learnbench.population.DEFAULT_MEMORY_BYTES`."""

    # lr_sigma keeps its published formula: its scale depends on d, so no fixed range suits every model.
    search_space: ClassVar[dict[str, Dimension]] = {
        # Problem-specific, no published value for networks (see above): from 0.01, below EvoJAX's MNIST initial
        # stds (0.03 OpenES, 0.039 PGPE, 0.065 CMA-ES: github.com/google/evojax scripts/benchmarks/configs/*/
        # mnist.yaml), to 3x the default 0.1.
        "sigma_init": LogUniform(0.01, 0.3),
        # A decade below Wierstra et al.'s eta_mu = 1 (Table 1), the top of the range.
        "lr_mean": LogUniform(0.1, 1.0),
        # Powers of two from about the default 4 + floor(3 ln d) (27 for the kit's MLP 64-32-10, 31 for the
        # 11,274-parameter cnn) past EvoJAX's MNIST populations (64 to 100); all even, so antithetic sampling accepts
        # every one.
        "popsize": Choice((16, 32, 64, 128, 256)),
    }

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self._model, self._generator = model, generator
        self._mean = population.flatten(model)  # [d]
        d = self._mean.numel()
        self._popsize = self.popsize if self.popsize is not None else 4 + math.floor(3 * math.log(d))
        self._lr_sigma = self.lr_sigma if self.lr_sigma is not None else (3 + math.log(d)) / (5 * math.sqrt(d))
        self.validate()
        if self.antithetic and self._popsize % 2:  # the default 4 + floor(3 ln d) is odd for this model
            raise ValueError(f"antithetic sampling needs an even popsize; the default for {d} parameters is "
                             f"{self._popsize}: set popsize")
        self._sigma = torch.full_like(self._mean, self.sigma_init)  # [d]
        self._utilities = nes_utilities(self._popsize).to(self._mean)  # [P], best first
        self._table = NoiseTable(generator, self.noise_table, d, self._mean.device) \
            if self.noise_table else None
        self._extra_flops = generation_flops(d, self._popsize, self.antithetic, not self.noise_table)

    def validate(self) -> None:
        """Check hyper-parameter values; raises ValueError naming the bad one."""
        if self.popsize is not None and (self.popsize < 2 or (self.antithetic and self.popsize % 2)):
            raise ValueError(f"popsize must be >= 2 (and even when antithetic); got {self.popsize}")
        if (self.batch_size <= 0 or self.sigma_init <= 0 or self.lr_mean <= 0
                or (self.lr_sigma is not None and self.lr_sigma <= 0)):
            raise ValueError("batch_size, sigma_init, lr_mean and lr_sigma must be positive")
        if self.noise_table < 0:
            raise ValueError(f"noise_table must be >= 0; got {self.noise_table}")

    def ask(self) -> Tensor:
        """This generation's standard-normal samples: `[popsize, d]`, or `[popsize/2, d]` when antithetic."""
        rows = self._popsize // 2 if self.antithetic else self._popsize
        if self._table is not None:
            return self._table.sample(rows)
        return normal(self._generator, rows, self._mean.numel(), self._mean.device)

    def evaluate(self, noise: Tensor, batch: Batch) -> Tensor:
        """Losses `[popsize]` of the members `ask` describes, on `batch`."""
        if self.antithetic:
            loss, _ = population.evaluate_mirrored(self._model, self._mean, noise, self._sigma, batch.x, batch.y,
                                                   chunk_size=self.chunk_size)
        else:  # members mu + sigma * s, built inside the call
            loss, _ = population.evaluate_perturbed(self._model, self._mean, noise, self._sigma, batch.x, batch.y,
                                                    chunk_size=self.chunk_size)
        return loss

    def tell(self, noise: Tensor, loss: Tensor) -> None:
        """Natural-gradient update of mean and standard deviations from the members' losses `[popsize]`."""
        weights = torch.empty_like(loss)
        weights[population.rank_order(loss)] = self._utilities  # [P], utility of each member
        if self.antithetic:  # member j and j + P/2 share |s|; their signs differ
            half = noise.shape[0]
            grad_mean = (weights[:half] - weights[half:]) @ noise  # [d]
            weights = weights[:half] + weights[half:]
        else:
            grad_mean = weights @ noise  # [d]
        grad_sigma = weights @ noise.square_() - weights.sum()  # in place: the noise is not needed any more
        self._mean += self.lr_mean * self._sigma * grad_mean
        self._sigma *= torch.exp(0.5 * self._lr_sigma * grad_sigma)

    def step(self, batch: Batch) -> StepStats:
        noise = self.ask()  # table rows stay named by their offsets: all a run's actors receive
        # This generation's per-parameter standard deviations [d], summarised as 0-d tensors (no host sync): their
        # mean, smallest and largest; lr_sigma is the resolved learning rate of the stds ((3 + ln d) / (5 sqrt d)).
        metrics = {"sigma": self._sigma.mean(), "sigma/min": self._sigma.min(), "sigma/max": self._sigma.max(),
                   "lr_sigma": self._lr_sigma}
        loss = self.evaluate(noise, batch)  # [popsize]
        self.tell(noise, loss)
        return StepStats(loss=loss.nanmean(), forward_passes=self._popsize * batch.y.shape[0],
                         extra_flops=self._extra_flops, metrics=metrics)

    def eval_model(self) -> nn.Module:
        return population.load(self._model, self._mean)


def nes_utilities(popsize: int) -> Tensor:
    """NES fitness shaping (Wierstra et al. 2014, eq. 22): utilities `[popsize]` for ranks 1..popsize (best
    first), summing to zero."""
    ranks = torch.arange(1, popsize + 1, dtype=torch.float64)
    raw = (math.log(popsize / 2 + 1) - torch.log(ranks)).clamp(min=0)
    return (raw / raw.sum() - 1 / popsize).float()


def generation_flops(d: int, popsize: int, antithetic: bool, fresh_noise: bool) -> float:
    """FLOPs of one generation outside the model, by the table in the module docstring."""
    rows = popsize // 2 if antithetic else popsize  # noise rows: what `ask` returns
    noise = rows * d if fresh_noise else 0  # one FLOP per normal drawn; the table's windows are a gather
    members = 2 * popsize * d  # mu + sigma * s
    pairs = 2 * rows if antithetic else 0  # u_j - u_{j+H}, u_j + u_{j+H}
    grad_mean = 2 * rows * d
    grad_sigma = rows * d + 2 * rows * d + rows + d  # s^2, u @ s^2, sum(u), minus
    updates = 3 * d + 3 * d
    return float(noise + members + pairs + grad_mean + grad_sigma + updates)
