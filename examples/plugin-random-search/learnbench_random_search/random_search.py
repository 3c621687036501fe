"""Random search over the weights: Matyas' random optimisation (Matyas 1965, "Random optimization", Automation and
Remote Control 26: 246-253), which is also the (1+1) evolution strategy with a fixed step size (Rechenberg 1973).

Each step draws one Gaussian perturbation of all the weights from the generator learnbench gives the trainer,
evaluates the perturbed weights on the step's minibatch, and keeps them if their loss is lower than the current
weights' loss on the same minibatch; otherwise the weights stay where they were. No gradient is ever computed.

This is *not* the "basic random search" of Mania, Guy & Recht (2018, "Simple random search provides a competitive
approach to reinforcement learning"), which averages antithetic finite differences over several directions (an
evolution strategy); it is the simpler accept-if-better rule. Optionally the step size follows Rechenberg's 1/5
success rule (Rechenberg 1973; Beyer & Schwefel 2002, "Evolution strategies: a comprehensive introduction", sec.
3.1), off by default so the algorithm stays Matyas'.

One step costs two forward passes of the batch (current and candidate weights) and no backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from learnbench import Batch, StepStats, TaskInfo


@dataclass(eq=False)
class RandomSearch:
    """Random search over the weights (Matyas 1965): perturb all weights, keep the perturbation if the batch loss
    drops."""

    name: ClassVar[str] = "random-search"

    batch_size: int = 256
    """Examples per step: both the current and the candidate weights are scored on this minibatch."""
    sigma: float = 0.02
    """Standard deviation of the Gaussian perturbation added to every weight (the step size)."""
    one_fifth_rule: bool = False
    """Adapt sigma with Rechenberg's 1/5 success rule (off: Matyas' fixed step size)."""
    adapt_every: int = 10
    """With the 1/5 rule: steps between sigma updates."""
    adapt_factor: float = 0.82
    """With the 1/5 rule: sigma is multiplied by this below a 1/5 success rate and divided by it above (Schwefel's
    0.817 <= c < 1, Beyer & Schwefel 2002)."""

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        if self.batch_size <= 0 or self.sigma <= 0 or self.adapt_every <= 0 or not 0 < self.adapt_factor < 1:
            raise ValueError("batch_size, sigma and adapt_every must be positive and adapt_factor in (0, 1)")
        self._model = model.eval()  # no dropout/batch-norm updates: the loss is a function of the weights only
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._weights = parameters_to_vector(self._params).detach().clone()  # [n_params] current weights
        self._generator = generator
        self._sigma = self.sigma
        self._successes = 0
        self._steps = 0

    @torch.no_grad()
    def step(self, batch: Batch) -> StepStats:
        if self._model.training:  # the runner restores the mode it found after evaluating; keep eval mode
            self._model.eval()
        current = self._loss(self._weights, batch)
        noise = torch.randn(self._weights.shape, generator=self._generator, device=self._weights.device,
                            dtype=self._weights.dtype)  # [n_params]
        candidate = self._weights + self._sigma * noise
        trial = self._loss(candidate, batch)
        accepted = bool(trial < current)  # one host sync per step: the decision needs the value
        if accepted:
            self._weights = candidate
            self._successes += 1
        vector_to_parameters(self._weights, self._params)  # the module always holds the kept weights
        self._adapt()
        n = batch.y.shape[0]
        return StepStats(loss=torch.minimum(current, trial), forward_passes=2 * n, backward_passes=0)

    def _loss(self, weights: torch.Tensor, batch: Batch) -> torch.Tensor:
        vector_to_parameters(weights, self._params)
        return F.cross_entropy(self._model(batch.x), batch.y)  # [B, C] logits -> 0-d loss

    def _adapt(self) -> None:
        """Rechenberg's 1/5 rule: widen the search when more than 1 in 5 tries succeed, narrow it when fewer do."""
        self._steps += 1
        if not self.one_fifth_rule or self._steps % self.adapt_every:
            return
        rate = self._successes / self.adapt_every
        if rate < 0.2:
            self._sigma *= self.adapt_factor
        elif rate > 0.2:
            self._sigma /= self.adapt_factor
        self._successes = 0

    def eval_model(self) -> nn.Module:
        return self._model
