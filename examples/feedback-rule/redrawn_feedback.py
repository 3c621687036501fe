"""A feedback rule as a learnbench plugin, in one file: feedback alignment whose random B is re-drawn every step.

    learnbench check-plugin examples/feedback-rule/redrawn_feedback.py
    learnbench run quick --algorithms redrawn-feedback,fa --plugin examples/feedback-rule/redrawn_feedback.py

A toy control, not a published algorithm. Feedback alignment (Lillicrap et al. 2016) works because B is *fixed*:
W comes to align with it, so `delta B` becomes a useful error. Drawing a fresh B after every optimizer step leaves
the hidden layers nothing to align with, so only the output layer (whose update is the true local one) should
learn well; comparing it with `fa` shows how much FA owes to the fixed B.

Adding a rule is this file and no other edit, through the public rule API of `learnbench.algorithms`:

* `feedback_layers.FeedbackRule`: `make_feedback` gives each layer its buffer `weight_feedback` (B, shaped like W);
  `backward_matrix` says what takes W's place in the backward pass to the layer's input (here B itself);
  `attach` keeps the feedback layers, and `after_optimizer_step` re-draws their B in place after every step;
  `step_flops` declares that work (learnbench.cost: drawing a standard normal is 1 FLOP, the scaling 1 more).
* `feedback_training.train_with_rule`: backprop's optimizer, schedule and step on the converted model; the trainer
  is a `Backprop` subclass with a `name` whose `setup` hands its rule to it.

Randomness comes from the generator learnbench hands the trainer (the converter passes it to `make_feedback`; the
rule keeps it for the later draws), so the same seed gives the same run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from learnbench.algorithms.backprop import Backprop
from learnbench.algorithms.feedback_layers import FeedbackRule, feedback_weights
from learnbench.algorithms.feedback_training import train_with_rule
from learnbench.spec import TaskInfo

FLOPS_PER_DRAW = 2  # one standard normal and one multiplication by 1/sqrt(fan_in + fan_out) per element of B


@dataclass(eq=False)
class RedrawnFeedbackRule(FeedbackRule):
    """Random B shaped like W, N(0, 1/(fan_in + fan_out)) as fa's default, drawn afresh after every step."""

    _generator: torch.Generator | None = field(default=None, init=False, repr=False)
    _layers: list[nn.Module] = field(default_factory=list, init=False, repr=False)

    def make_feedback(self, name: str, layer: nn.Module, generator: torch.Generator) -> Tensor:
        self._generator = generator  # the trainer's: every later B is drawn from it too
        return feedback_weights(tuple(layer.weight.shape), "normal", generator).to(layer.weight)

    def attach(self, model: nn.Module, layers: dict[str, nn.Module]) -> list[RemovableHandle]:
        self._layers = list(layers.values())
        return []

    def backward_matrix(self, layer: nn.Module, weight: Tensor) -> Tensor:
        return layer.weight_feedback  # [out, in] or the conv kernel's shape: B in W's place

    @torch.no_grad()
    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for layer in self._layers:  # in place: the buffer stays the same tensor, in the model's state_dict
            layer.weight_feedback.copy_(feedback_weights(tuple(layer.weight.shape), "normal", self._generator))

    def step_flops(self) -> int:
        return FLOPS_PER_DRAW * sum(layer.weight.numel() for layer in self._layers)

    def set_to_weights(self, layer: nn.Module) -> None:
        layer.weight_feedback.copy_(layer.weight)  # until the next step re-draws it


@dataclass(eq=False)
class RedrawnFeedback(Backprop):
    """Minibatch training with random feedback matrices re-drawn after every step (a control for FA)."""

    name: ClassVar[str] = "redrawn-feedback"

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self.validate(task)
        self.conversion = train_with_rule(self, RedrawnFeedbackRule(), model, task, generator)
