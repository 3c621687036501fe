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

Declared cost (`StepStats.extra_flops`, by `learnbench.cost`'s rule: 1 FLOP per elementwise operation or normal
drawn, 2 per multiply-add), per generation, as pycma 4 computes it (`generation_flops`; d parameters, lambda =
popsize, mu parents, k negative (active CMA) weights):

* full. ask, per member: z ~ N(0, I) (d), D z (d), B (D z) (2 d^2), pycma's coordinate scaling (d),
  mean + sigma * y (2 d). tell: y_i = (x_i - m_old) / sigma for every member (2 lambda d); the new mean (2 mu d);
  C^-1/2 (m - m_old) for the step-size path, two matrix-vector products with B (4 d^2 + 5 d); the paths p_sigma,
  p_c and pycma's second path p_c2 with the squared norms the step size reads (16 d); each negative-weight vector
  rescaled by its Mahalanobis norm |D^-1 B^T y| (k (2 d^2 + 3 d)); the rank-one and rank-mu update
  C <- a C + sum_i w_i v_i v_i^T over p_c and all lambda members (2 (lambda + 1) d^2 + 2 d^2 + (lambda + 2) d).
  Plus every eigendecomposition C = B D^2 B^T pycma performs in this generation, which it does lazily, only
  every ~1 / (10 d (c_1 + c_mu)) generations, inside `ask`: 9 d^3 for `numpy.linalg.eigh`, what the symmetric QR
  algorithm costs with eigenvectors (~9 n^3 flops: Golub & Van Loan, "Matrix Computations", 4th ed., section 8.3;
  LAPACK's divide-and-conquer `syevd` behind eigh is of the same order), + 2 d^2 to symmetrise C + d for the
  square roots; nothing in the generations that skip it. Decompositions are
  counted from pycma's own counter (`es.sm.count_eigen`) across the generation. Per generation this grows as
  d^2: the sampling and the updates are O(lambda d^2), and the O(d^3) decomposition comes every O(d) generations.
* diagonal (sep-CMA-ES). ask, per member: z (d), the per-coordinate scaling (d), mean + sigma * y (2 d). tell:
  y_i (2 lambda d); the mean (2 mu d); the isotropic mean shift (3 d); the paths (16 d); the exponential update
  of the per-coordinate scaling from the squared vectors of p_c and all members (z^2: (lambda + 1) d, weighted
  sum: 2 (lambda + 1) d, exp((avg - sum w) / 2): 3 d, applied: d) and pycma's bound on its increase
  (2 (lambda + 1) d + 2 d, charged for every coordinate: pycma computes it for those whose factor exceeds 1).
  O(lambda d) per generation.
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
from learnbench.search_space import Choice, Dimension, LogUniform
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

    search_space: ClassVar[dict[str, Dimension]] = {
        # Hansen's tutorial (and pycma's docs): sigma0 such that the optimum lies within about x0 +- 3 sigma0. No
        # published value for network weights: from 0.01 to 3x the default 0.1, EvoJAX's MNIST init_stdev 0.065
        # (configs/CMA_ES/mnist.yaml) inside.
        "sigma0": LogUniform(0.01, 0.3),
        # Hansen's tutorial: the default 4 + floor(3 ln d) is small, for fast convergence; larger populations make
        # the search more global and more robust to noise (here, minibatch fitness), and IPOP-CMA-ES (Auger & Hansen
        # 2005) doubles lambda at each restart. Powers of two from about the default (27 for the kit's MLP 64-32-10,
        # 31 for the 11,274-parameter cnn) to 256, past EvoJAX's MNIST pop_size 100.
        "popsize": Choice((16, 32, 64, 128, 256)),
    }

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
        decompositions = eigendecompositions(self._es)
        sigma = float(self._es.sigma)  # pycma's step size this generation samples with (tell adapts it)
        candidates = self._es.ask()  # list of popsize float64 arrays [d]; may decompose C first (lazily)
        members = torch.from_numpy(np.stack(candidates)).to(self._device, torch.float32)  # [P, d]
        loss, _ = population.evaluate(self._model, members, batch.x, batch.y, chunk_size=self.chunk_size)
        values = loss.double().cpu()
        # pycma ranks by value; a NaN member (non-finite parameters) must rank last, never best.
        self._es.tell(candidates, torch.nan_to_num(values, nan=math.inf).tolist())
        extra = generation_flops(self._es, len(candidates), eigendecompositions(self._es) - decompositions)
        return StepStats(loss=values.nanmean().item(), forward_passes=len(candidates) * batch.y.shape[0],
                         extra_flops=extra, metrics={"sigma": sigma})

    def eval_model(self) -> nn.Module:
        mean = torch.from_numpy(self._es.mean).to(self._device, torch.float32)
        return population.load(self._model, mean)

    @property
    def es(self) -> cma.CMAEvolutionStrategy:
        """The underlying pycma strategy (read-only use: step size, covariance, stop conditions)."""
        return self._es


def eigendecompositions(es: cma.CMAEvolutionStrategy) -> int:
    """How many eigendecompositions of C pycma has made so far (0 for sep-CMA-ES, which never makes one)."""
    return es.sm.count_eigen if isinstance(es.sm, cma.sampler.GaussFullSampler) else 0


def generation_flops(es: cma.CMAEvolutionStrategy, popsize: int, decompositions: int) -> float:
    """FLOPs of one generation of `es` outside the model, by the formula in the module docstring, with
    `decompositions` eigendecompositions made during it."""
    d, lam = es.N, popsize
    weights = np.asarray(es.sp.weights)
    mu, negative = es.sp.weights.mu, int((weights < 0).sum())
    tell = 2 * lam * d + 2 * mu * d + 16 * d  # y_i, the mean, the evolution paths
    if not isinstance(es.sm, cma.sampler.GaussFullSampler):  # sep-CMA-ES
        ask = lam * 4 * d
        tell += 3 * d  # (m - m_old) / scaling, times sqrt(mueff) / sigma: C is the identity
        tell += (lam + 1) * d + 2 * (lam + 1) * d + 3 * d + d  # z^2, weighted sum, exp(...), scaling *= facs
        tell += 2 * (lam + 1) * d + 2 * d  # pycma's bound max|z^2 - 1| / 2 + 1 on the increase
        return float(ask + tell)
    ask = lam * (2 * d**2 + 5 * d)
    tell += 4 * d**2 + 5 * d  # C^-1/2 (m - m_old): B (B^T x / D), with the scalings around it
    tell += negative * (2 * d**2 + 3 * d)  # |D^-1 B^T y| of each negative-weight vector
    tell += 2 * (lam + 1) * d**2 + 2 * d**2 + (lam + 2) * d  # C <- a C + V^T diag(w) V over p_c and the members
    eigen = decompositions * (9 * d**3 + 2 * d**2 + d)  # Golub & Van Loan: ~9 n^3 for eigenvalues and vectors
    return float(ask + tell + eigen)


def torch_randn(generator: torch.Generator) -> Callable[..., np.ndarray]:
    """pycma's `randn(*shape)` option drawing float64 standard normals from `generator`."""
    def randn(*shape: int) -> np.ndarray:
        return torch.randn(*shape, generator=generator, dtype=torch.float64, device=generator.device).cpu().numpy()
    return randn
