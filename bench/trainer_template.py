"""My Algorithm: <one line saying what the algorithm does>.

<Cite the paper it follows (authors, year, title) and any reference code, and say where each default comes from.>

Written by `learnbench new-algorithm my-algorithm` from the template module `learnbench.trainer_template`.
As written it is plain minibatch stochastic gradient descent (Robbins & Monro 1951) on the cross-entropy loss, and
it passes the conformance kit. Replace the update rule in `step` with your algorithm and the hyper-parameters with
yours, then:

    learnbench check-plugin my_algorithm.py
    learnbench run my-suite.toml --plugin my_algorithm.py

The first runs the contract on tiny data, in seconds; the second a suite with an [[algorithms]] entry whose id is
"my-algorithm". The rules the kit checks: __init__ stores the hyper-parameters only (a dataclass does exactly
that); setup validates them and builds all state; every random number comes from the `generator` given to setup;
`step` never writes into its batch; the same seed gives the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from learnbench import Batch, StepStats, TaskInfo
from learnbench.search_space import Dimension, LogUniform


@dataclass(eq=False)  # the dataclass stores the hyper-parameters; eq=False keeps trainers compared by identity
class MyAlgorithm:
    """My Algorithm: minibatch SGD to start from (replace with a one-line description; `learnbench list` shows it)."""

    # The id in suites, --algorithms, --set my-algorithm.lr=0.05 and the results:
    name: ClassVar[str] = "my-algorithm"

    # One field per hyper-parameter: a type, the published default, a one-line docstring. Every trainer has
    # batch_size; a population method names its population size `popsize`. Values must survive JSON (numbers,
    # strings, booleans, None, lists): the trial config that records them is JSON.
    batch_size: int = 128
    """Examples per step: the runner samples batches of this size from the training split."""
    lr: float = 0.1
    """Learning rate of the SGD update."""

    # Optional: the ranges `learnbench tune` searches (LogUniform, Uniform, IntRange(low, high, step), Choice(options)),
    # one entry per tuned hyper-parameter, independent of dataset and model; say where each range comes from.
    # check-plugin runs every corner of the space through validate().
    search_space: ClassVar[dict[str, Dimension]] = {
        "lr": LogUniform(0.01, 1.0),  # plain SGD: a decade either side of the default 0.1
    }

    def validate(self) -> None:
        """Raise ValueError naming a bad hyper-parameter value. Optional, and it may take the TaskInfo too:
        `learnbench run` calls it before any trial starts, check-plugin on every corner of search_space."""
        if self.batch_size <= 0 or self.lr <= 0:
            raise ValueError(f"batch_size and lr must be positive; got {self.batch_size} and {self.lr}")

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        """Validate the hyper-parameters and build every piece of state here, not in __init__.

        model: the network to train, already on task.device: [B, *task.input_shape] inputs -> [B, task.n_classes]
            logits. You may change it in place; eval_model() must return a module of the same architecture.
        task: input_shape, n_classes, n_train and device: all a trainer may know about the data.
        generator: the only source of randomness (torch.randn(shape, generator=generator, device=task.device)).
        """
        self.validate()
        self._model = model.train()
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._generator = generator  # SGD draws nothing; keep it for your algorithm's noise

    def step(self, batch: Batch) -> StepStats:
        """One unit of work on one batch (a generation, for a population method).

        batch.x: [B, *input_shape] floats in [0, 1]; batch.y: [B] int64 labels. Never write into them (clone first).
        """
        if not self._model.training:  # the runner evaluates between steps in eval mode
            self._model.train()
        logits = self._model(batch.x)  # [B, n_classes]
        loss = F.cross_entropy(logits, batch.y)  # 0-d
        grads = torch.autograd.grad(loss, self._params)  # one tensor per parameter, same shapes
        with torch.no_grad():
            for param, grad in zip(self._params, grads):
                param.add_(grad, alpha=-self.lr)  # the update rule: replace it with your algorithm's
        n = batch.y.shape[0]
        # The loss stays a 0-d tensor (reading it would sync the GPU every step). The counts are example-passes:
        # a population of P members on B examples makes P * B forward passes.
        return StepStats(loss=loss.detach(), forward_passes=n, backward_passes=n)

    def eval_model(self) -> nn.Module:
        """The plain model to evaluate now (an ES returns its mean, a GA its elite). The runner puts it in eval
        mode to evaluate it, then back; the attacks use its true input gradient."""
        return self._model
