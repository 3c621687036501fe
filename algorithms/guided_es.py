"""Guided evolution strategies (Maheswaranathan, Metz, Tucker, Choi & Sohl-Dickstein 2019, "Guided evolutionary
strategies: augmenting random search with surrogate gradients", ICML 2019, arXiv:1806.10230; reference code:
github.com/brain-research/guided-evolutionary-strategies, Guided_Evolutionary_Strategies_Demo.ipynb).

A hybrid of evolution and gradients: a cheap, biased gradient (the *surrogate*) tells the search where to look, and
antithetic ES on the true loss estimates the descent direction without that bias. One `step()` per minibatch:

1. surrogate: the gradient a named learning rule computes on the step's batch at the current parameters x:
   `surrogate = "fa" | "dfa" | "sign-symmetry"` runs the model converted by that rule's `FeedbackRule` (the very
   rule objects the fa, dfa and sign-symmetry trainers use: `feedback_layers.convert`), and `"backprop"` takes the
   true gradient, the control. The k most recent surrogates are kept, newest first, and orthonormalised by QR into
   U `[n, k]` (fewer columns during the first k - 1 steps);
2. perturbations: H = popsize / 2 antithetic directions from the guided distribution, covariance
   `sigma^2 (alpha/n I + (1 - alpha)/k U U^T)`:  eps = a z + c U w, z ~ N(0, I_n), w ~ N(0, I_k),
   a = sigma sqrt(alpha / n), c = sigma sqrt((1 - alpha) / k);
3. evaluation: the 2H members x +- eps on the step's batch in one batched call (`learnbench.population.
   evaluate_mirrored`, the plain model in eval mode; no per-member loop);
4. estimate: g = beta / (2 sigma^2 H) sum_i (f(x + eps_i) - f(x - eps_i)) eps_i, the raw loss differences (no
   fitness shaping, as in the paper), an estimate of grad f; the optimizer steps on it as a gradient.

alpha = 1 is plain isotropic ES (per-coordinate std sigma / sqrt(n): the paper's scaling keeps |eps| ~ sigma);
alpha -> 0 searches only the surrogate subspace. With k = 1 and n large the subspace term dominates the estimate:
it is the surrogate's direction, signed and sized by the true loss along it, so a surrogate pointing uphill is
turned around rather than followed.

Defaults are the reference demo's guided-ES call (`guided_es(loss_fn, gav, sigma=0.1, alpha=0.5, beta=2.0)`, k = 1,
one antithetic pair per iteration, plain gradient descent with learning rate 0.2); the function's own beta default,
1.0, is what the demo's vanilla-ES call uses. Note E[g] = beta (alpha/n grad f + (1 - alpha)/k U U^T grad f): beta
and the learning rate only scale the step, and under Adam neither matters much.

Gao & Sener (ICML 2022, "Generalizing Gaussian smoothing for random search", arXiv:2211.14721) derive three
perturbation distributions with provably lower mean squared gradient error than isotropic Gaussian smoothing, at
its cost, and report them competitive with guided ES; they replace the guided covariance rather than extend this
estimator, so they would be a trainer of their own and are not included here.

The surrogate model (train mode, as its rule's trainer trains) and the population (eval mode) see the same
parameters: the search mean is kept flat (`population.Layout` order) and loaded into the model before the
surrogate's forward pass. `eval_model()` returns the plain model (true gradients) holding the mean. After each step
`update_parts` holds the surrogate and the ES estimate as descent directions, which the update-grad probe compares
with the true gradient (`cos/part-grad/surrogate`, `cos/part-grad/es-estimate`) beside the final update.

Declared cost, per step, n parameters, B examples, P = popsize, H = P / 2, k' <= k columns of U:
    passes           P B forward (the members), B forward + B backward (the surrogate)
    QR               2 n k'^2 (Householder, the k'^3 terms dropped)
    perturbations    H n + H k' normals drawn, then a z (H n), U w (2 H k' n), the sum (H n)
    members          P n: x + eps and x - eps (eps already holds sigma)
    estimate         2 H: the loss differences and their scaling; 2 H n: the weighted sum of the eps rows
    optimizer step   `learnbench.cost.optimizer_flops`
The surrogate rules' own work (sign(W) for sign-symmetry) is, as for their trainers, part of the backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnbench import cost, population
from learnbench.algorithms.direct_feedback_alignment import DirectFeedbackAlignmentRule
from learnbench.algorithms.feedback_alignment import FeedbackAlignmentRule
from learnbench.algorithms.feedback_layers import FeedbackRule, check_init, convert
from learnbench.algorithms.sign_symmetry import SignSymmetryRule
from learnbench.noise import normal
from learnbench.search_space import Choice, Dimension, IntRange, LogUniform, Uniform
from learnbench.spec import Batch, StepStats, TaskInfo

# surrogate name -> the feedback rule that computes it (None: the true gradient), given `feedback_init`
SURROGATES: dict[str, Callable[[str], FeedbackRule] | None] = {
    "fa": FeedbackAlignmentRule,
    "dfa": DirectFeedbackAlignmentRule,
    "sign-symmetry": lambda init: SignSymmetryRule(scale=True),
    "backprop": None,
}
OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclass(eq=False)
class GuidedES:
    """Guided ES: antithetic search in the span of recent surrogate gradients plus the full space."""

    name: ClassVar[str] = "guided-es"

    surrogate: str = "fa"
    """Learning rule whose gradient guides the search: fa, dfa, sign-symmetry, or backprop (the true gradient)."""
    popsize: int = 2
    """Members per step (even: popsize/2 antithetic pairs; the reference demo: one pair)."""
    batch_size: int = 128
    """Examples in the minibatch the surrogate and every member are computed on."""
    sigma: float = 0.1
    """Overall size of the perturbations: E|eps|^2 = sigma^2 (reference demo: 0.1)."""
    alpha: float = 0.5
    """Share of the perturbation variance in the full space; 1 - alpha lies in the surrogate subspace (demo: 0.5)."""
    beta: float = 2.0
    """Scale of the gradient estimate (the demo's guided-ES call: 2.0)."""
    k: int = 1
    """Surrogate gradients kept (the subspace's dimension; demo: 1)."""
    optimizer: str = "sgd"
    """Optimizer on the mean: sgd (the demo's gradient descent), momentum (SGD, momentum 0.9) or adam."""
    lr: float = 0.2
    """Learning rate of the optimizer (demo: 0.2)."""
    feedback_init: str = "normal"
    """Distribution of the feedback matrices of the fa and dfa surrogates (as the fa trainer's)."""
    chunk_size: int | None = None
    """Members evaluated at once; None sizes chunks to `learnbench.population.DEFAULT_MEMORY_BYTES`."""

    search_space: ClassVar[dict[str, Dimension]] = {
        # A decade around the demo's sigma 0.1 and learning rate 0.2 (sgd, the default optimizer).
        "sigma": LogUniform(0.01, 1.0),
        "lr": LogUniform(0.02, 2.0),
        # From mostly subspace to mostly isotropic; the demo's 0.5 in the middle.
        "alpha": Uniform(0.05, 0.95),
        # The demo's k = 1 up to the paper's larger subspaces of recent gradients.
        "k": IntRange(1, 8),
        # The demo's one pair, up to 8 pairs.
        "popsize": Choice((2, 4, 8, 16)),
    }

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self.validate()
        self._generator = generator
        make_rule = SURROGATES[self.surrogate]
        if make_rule is None:  # backprop: the true gradient of the model itself
            self._model = self._plain = model
        else:  # the model converted in place by the rule; `plain` shares its Parameters and has true gradients
            conversion = convert(model, make_rule(self.feedback_init), generator, input_shape=task.input_shape)
            self._model, self._plain = model, conversion.plain
        self._params = [p for p in model.parameters() if p.requires_grad]  # `population.Layout` order
        self._mean = nn.Parameter(population.flatten(model))  # [n], the search distribution's centre
        self._optimizer = self._make_optimizer()
        self._history = self._mean.new_zeros(0, self._mean.numel())  # [k', n] surrogates, newest first
        self.update_parts: dict[str, Tensor] = {}

    def validate(self) -> None:
        """Check hyper-parameter values; raises ValueError naming the bad one."""
        if self.surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {tuple(SURROGATES)}; got {self.surrogate!r}")
        if self.popsize < 2 or self.popsize % 2:
            raise ValueError(f"popsize must be even and >= 2 (antithetic pairs); got {self.popsize}")
        if self.batch_size <= 0 or self.sigma <= 0 or self.lr <= 0 or self.beta <= 0:
            raise ValueError("batch_size, sigma, beta and lr must be positive")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1]; got {self.alpha}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1; got {self.k}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")
        check_init(self.feedback_init)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam([self._mean], lr=self.lr)
        return torch.optim.SGD([self._mean], lr=self.lr, momentum=0.9 if self.optimizer == "momentum" else 0.0)

    def step(self, batch: Batch) -> StepStats:
        mean = self._mean.detach()
        population.load(self._model, mean)
        surrogate, loss = self._surrogate_gradient(batch)  # [n]
        self._history = torch.cat([surrogate[None], self._history])[:self.k]  # [k', n]
        basis = torch.linalg.qr(self._history.T).Q  # [n, k'], orthonormal columns spanning the surrogates
        noise = guided_perturbations(basis, self.popsize // 2, self.sigma, self.alpha, self._generator)  # [H, n]
        losses, _ = population.evaluate_mirrored(self._plain, mean, noise, 1.0, batch.x, batch.y,
                                                 chunk_size=self.chunk_size)  # [P]: +eps rows, then -eps
        estimate = guided_estimate(noise, losses, self.sigma, self.beta)  # [n], estimates grad f
        self.update_parts = {"surrogate": -surrogate, "es-estimate": -estimate}
        self._mean.grad = estimate
        self._optimizer.step()
        b = batch.y.shape[0]
        return StepStats(loss=loss, forward_passes=(self.popsize + 1) * b, backward_passes=b,
                         extra_flops=step_flops(mean.numel(), self.popsize, basis.shape[1],
                                                cost.optimizer_flops(self._optimizer)))

    def _surrogate_gradient(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The surrogate rule's gradient `[n]` of the batch's cross-entropy at the mean, and that loss."""
        with torch.enable_grad():
            loss = F.cross_entropy(self._model.train()(batch.x), batch.y)
            grads = torch.autograd.grad(loss, self._params)
        return torch.cat([g.reshape(-1) for g in grads]), loss.detach()

    def eval_model(self) -> nn.Module:
        return population.load(self._plain, self._mean.detach())


def guided_perturbations(basis: Tensor, pairs: int, sigma: float, alpha: float,
                         generator: torch.Generator) -> Tensor:
    """`pairs` draws `[pairs, n]` of eps = a z + c U w with covariance sigma^2 (alpha/n I + (1-alpha)/k U U^T),
    `basis` U `[n, k]` with orthonormal columns (k = 0: isotropic with variance sigma^2 alpha / n)."""
    n, k = basis.shape
    full = normal(generator, pairs, n, basis.device).to(basis.dtype).mul_(sigma * math.sqrt(alpha / n))  # [pairs, n]
    if k == 0 or alpha == 1:
        return full
    sub = normal(generator, pairs, k, basis.device).to(basis.dtype)  # [pairs, k]
    return full.addmm_(sub, basis.T, alpha=sigma * math.sqrt((1 - alpha) / k))


def guided_estimate(noise: Tensor, loss: Tensor, sigma: float, beta: float) -> Tensor:
    """beta / (2 sigma^2 H) sum_i (f(x + eps_i) - f(x - eps_i)) eps_i `[n]`, from `noise` eps `[H, n]` and the
    members' losses `[2H]` (`+eps` rows first). A non-finite member's pair contributes nothing."""
    half = noise.shape[0]
    difference = torch.nan_to_num(loss[:half] - loss[half:], nan=0.0, posinf=0.0, neginf=0.0)  # [H]
    return (difference.to(noise.dtype) * (beta / (2 * sigma**2 * half))) @ noise


def step_flops(n_params: int, popsize: int, k: int, optimizer_step: float) -> float:
    """FLOPs of one step outside the model, by the table in the module docstring."""
    n, half = n_params, popsize // 2
    qr = 2 * n * k * k
    perturbations = half * n + half * k + half * n + 2 * half * k * n + half * n
    members = popsize * n
    estimate = 2 * half + 2 * half * n
    return float(qr + perturbations + members + estimate + optimizer_step)
