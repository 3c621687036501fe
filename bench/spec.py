"""The submission API: three public types (`Batch`, `StepStats`, `TaskInfo`) and the `Trainer` protocol.

Everything an algorithm author needs is here; `algorithms/backprop.py` (imported as `learnbench.algorithms.backprop`)
is the built-in to read, and `learnbench new-algorithm NAME` writes a file to start from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass
class Batch:
    """One minibatch, already on the run's device."""

    x: Tensor
    """float inputs in [0, 1]: images [B, C, H, W], vectors [B, D]."""
    y: Tensor
    """int64 class labels [B]."""


@dataclass
class StepStats:
    """What one `Trainer.step` reports back to the runner."""

    loss: float
    """Training loss of this step's batch. A 0-d tensor is accepted too: the runner reads it without a per-step
    host sync on CUDA."""
    forward_passes: int
    """Example-forward-passes made in this step (a population of P on B examples: P*B)."""
    backward_passes: int = 0
    """Example-backward-passes made in this step."""
    extra_flops: float = 0.0
    """FLOPs of the work this step did outside the model (an optimizer's update, an evolution strategy's noise and
    mean update, CMA-ES's covariance update and eigendecomposition), by a formula the trainer documents in its
    file. The runner charges `cost/flops` = the plain model's dense FLOPs per example times the passes above, plus
    this: a nominal figure that does not depend on the implementation's shortcuts or the device."""
    metrics: dict[str, float | Tensor] = field(default_factory=dict)
    """A few named values of the trainer's own, e.g. `{"sigma": 0.02, "lr": 1e-3}`: Python floats or 0-d tensors
    (left on the device: the runner reads only the latest step's, at evaluation points, so no step waits for a host
    sync). They are recorded as curve metrics `train/<name>` and their last values as final metrics. Names are
    lowercase segments of `[a-z0-9_-]` joined by `/` (`fitness/min`), not `loss`, and the same set every step."""


@dataclass(frozen=True)
class TaskInfo:
    """The only facts about the dataset a trainer may see."""

    input_shape: tuple[int, ...]
    n_classes: int
    n_train: int
    device: torch.device


@runtime_checkable
class Trainer(Protocol):
    """A training algorithm. The runner owns the loop; a trainer owns one step.

    `__init__` stores hyper-parameters only (a frozen dataclass is ideal); `setup` validates them and builds state.
    Optionally, a `validate()` or `validate(task)` method that raises ValueError for a bad value: learnbench calls it
    while resolving a suite, so the mistake is one usage error before anything runs (the built-ins all have one).
    Every trainer has a `batch_size` hyper-parameter; population trainers name their population size `popsize`.
    A trainer defined for some model kinds only declares them as a class attribute `supported_models` (e.g.
    `("mlp",)`), or as a property when they depend on its hyper-parameters (None: any model): a suite pairing it
    with another kind is a usage error before anything runs.
    An `eval_model()` that wraps the trained model in a module of its own (same weights, another forward) gives the
    wrapper a `wrapper_args()` method and the trainer a classmethod `wrap_eval_model(model, **args)`, so the saved
    weights reload as that module (`learnbench.artifacts`). A rule with its own route from the error to the input
    (feedback weights) may offer `pseudo_gradient_model()`: a module with eval_model's logits whose input gradient
    is the rule's, a class attribute `uses_feedback_weights = True`; `robustness.pseudo_gradient` attacks through it.
    """

    name: ClassVar[str]
    """Registry id, e.g. "backprop", "fa", "openai-es", "ga"."""

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        """Take ownership of `model` (already on `task.device`); all randomness comes from `generator`."""
        ...

    def step(self, batch: Batch) -> StepStats:
        """One unit of work: a minibatch (backprop, FA) or a generation (ES, GA). Must not modify `batch`."""
        ...

    def eval_model(self) -> nn.Module:
        """The plain model to evaluate now (ES: the mean; GA: the elite); attacks use its true gradient."""
        ...
