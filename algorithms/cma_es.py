"""CMA-ES (Hansen & Ostermeier 2001; Hansen 2016, "The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772), run by
pycma (`cma` package, github.com/CMA-ES/pycma), with its separable variant (Ros & Hansen 2008, "A Simple
Modification in CMA-ES Achieving Linear Time and Space Complexity", PPSN) for large models.

One generation per `step()`: `CMAEvolutionStrategy.ask()` proposes `popsize` members, `learnbench.population`
evaluates them on the step's minibatch in one batched call, `tell()` updates mean, step size and covariance. Every
strategy parameter (weights, learning rates, damping) is pycma's default, i.e. the tutorial's; `popsize = None`
keeps pycma's `4 + floor(3 ln d)`.

Covariance: `full` keeps a d x d matrix (float64) plus its eigendecomposition, O(d^2) memory and O(d^3) work every
few generations; `diagonal` is sep-CMA-ES (pycma's `CMA_diagonal=True`), O(d). `auto` picks full up to
`MAX_FULL_PARAMS` parameters and diagonal above. Asking for `full` above `MAX_FULL_PARAMS` (5,000: C, B and the
eigensolver's workspace then take about 0.6 GB and one decomposition tens of seconds on one core) raises a
ValueError instead of running out of memory or time. The cnn (11,274 parameters) therefore runs separable.

Threads: pycma's numpy BLAS calls are limited to torch's thread count (the runner's one thread per worker).

Randomness: pycma draws through its `randn` option; we pass a function that draws from the trainer's
`torch.Generator` and set `seed = nan` so pycma never seeds numpy's global generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import cma
import numpy as np
import threadpoolctl
import torch
from torch import nn

from learnbench import population
from learnbench.spec import Batch, StepStats, TaskInfo

MAX_FULL_PARAMS = 5_000
COVARIANCES = ("auto", "full", "diagonal")
_BLAS = threadpoolctl.ThreadpoolController()


@dataclass(eq=False)
class CMAES:
    """CMA-ES through pycma: full covariance for small models, separable (diagonal) for large ones."""

    name: ClassVar[str] = "cma-es"

    popsize: int | None = None
    """Members per generation; None: pycma's default 4 + floor(3 ln d)."""
    batch_size: int = 256
    """Examples in the minibatch every member of a generation is evaluated on."""
    sigma0: float = 0.1
    """Initial step size (standard deviation in every coordinate)."""
    covariance: str = "auto"
    """full, diagonal (sep-CMA-ES), or auto: full up to MAX_FULL_PARAMS parameters, diagonal above."""
    chunk_size: int | None = None
    """Members evaluated at once; None sizes chunks to `learnbench.population.DEFAULT_MEMORY_BYTES`."""

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self._model, self._device = model, task.device
        x0 = population.flatten(model).double().cpu().numpy()
        self._es = cma.CMAEvolutionStrategy(x0, self.sigma0, self.options(x0.size, generator))

    def options(self, n_params: int, generator: torch.Generator) -> dict:
        """The pycma options this trainer runs with (validates the hyper-parameters)."""
        if self.covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}; got {self.covariance!r}")
        if self.covariance == "full" and n_params > MAX_FULL_PARAMS:
            raise ValueError(f"cma-es covariance='full' needs a {n_params} x {n_params} matrix; the limit is "
                             f"{MAX_FULL_PARAMS:,} parameters (memory and O(d^3) eigendecompositions). "
                             "Use covariance='diagonal' (sep-CMA-ES) or a smaller model.")
        if self.batch_size <= 0 or self.sigma0 <= 0 or (self.popsize is not None and self.popsize < 2):
            raise ValueError("batch_size and sigma0 must be positive and popsize >= 2")
        diagonal = self.covariance == "diagonal" or (self.covariance == "auto" and n_params > MAX_FULL_PARAMS)
        options = {"CMA_diagonal": diagonal, "seed": math.nan, "randn": torch_randn(generator),
                   "verbose": -9, "verb_disp": 0, "verb_log": 0, "tolfun": 0, "tolflatfitness": math.inf,
                   "tolfunhist": 0, "tolstagnation": math.inf, "tolx": 0}
        if self.popsize is not None:
            options["popsize"] = self.popsize
        return options

    def step(self, batch: Batch) -> StepStats:
        # pycma's linear algebra runs in numpy's BLAS, whose thread pool torch.set_num_threads does not govern;
        # on shared cores extra BLAS threads made full CMA-ES 4-6x slower (d = 2,410, measured).
        with _BLAS.limit(limits=torch.get_num_threads(), user_api="blas"):
            return self._generation(batch)

    def _generation(self, batch: Batch) -> StepStats:
        candidates = self._es.ask()  # list of popsize float64 arrays [d]
        members = torch.from_numpy(np.stack(candidates)).to(self._device, torch.float32)  # [P, d]
        loss, _ = population.evaluate(self._model, members, batch.x, batch.y, chunk_size=self.chunk_size)
        values = loss.double().cpu()
        # pycma ranks by value; a NaN member (non-finite parameters) must rank last, never best.
        self._es.tell(candidates, torch.nan_to_num(values, nan=math.inf).tolist())
        return StepStats(loss=values.nanmean().item(), forward_passes=len(candidates) * batch.y.shape[0])

    def eval_model(self) -> nn.Module:
        mean = torch.from_numpy(self._es.mean).to(self._device, torch.float32)
        return population.load(self._model, mean)

    @property
    def es(self) -> cma.CMAEvolutionStrategy:
        """The underlying pycma strategy (read-only use: step size, covariance, stop conditions)."""
        return self._es


def torch_randn(generator: torch.Generator) -> Callable[..., np.ndarray]:
    """pycma's `randn(*shape)` option drawing float64 standard normals from `generator`."""
    def randn(*shape: int) -> np.ndarray:
        return torch.randn(*shape, generator=generator, dtype=torch.float64, device=generator.device).cpu().numpy()
    return randn
