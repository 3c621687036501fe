"""Feedback alignment (Lillicrap, Cownden, Tweed & Akerman 2016, "Random synaptic feedback weights support error
backpropagation for deep learning", Nature Communications 7:13276).

Backprop with the transpose of each forward matrix replaced, in the backward pass, by a fixed random matrix B of
the same shape: the error reaching a layer's input is `delta B` instead of `delta W`. Weight updates stay local
(`delta x^T`), and W comes to align with B during training. `FeedbackAlignmentRule` is the whole rule (B drawn
once per layer, never changed); the optimizer, schedule and step are backprop's (`feedback_training`), and the
layers' backward is `feedback_layers`' mechanism.

Defaults: the backprop trainer's Adam settings (lr 1e-3, batch 128) and B ~ N(0, 1/(fan_in + fan_out)), the
feedback initialisation of Akrout et al.'s reference FA code (github.com/makrout/Deep-Learning-without-Weight-
Transport, fcnn/FCNN_FA.py). With Adam the scale of B does not matter: it scales every update of a layer alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from learnbench.algorithms.backprop import Backprop
from learnbench.algorithms.feedback_layers import INITS, FeedbackRule, check_init, feedback_weights
from learnbench.algorithms.feedback_training import train_with_rule
from learnbench.search_space import Choice, Dimension
from learnbench.spec import TaskInfo


@dataclass(eq=False)
class FeedbackAlignmentRule(FeedbackRule):
    """B fixed and random, shaped like W, kept as each layer's `weight_feedback`: the input error is `g B`."""

    init: str = "normal"
    """Distribution of B (`feedback_layers.feedback_weights`): normal, xavier or kaiming."""

    def make_feedback(self, name: str, layer: nn.Module, generator: torch.Generator) -> Tensor:
        return feedback_weights(tuple(layer.weight.shape), self.init, generator).to(layer.weight)

    def backward_matrix(self, layer: nn.Module, weight: Tensor) -> Tensor:
        return layer.weight_feedback

    def set_to_weights(self, layer: nn.Module) -> None:
        layer.weight_feedback.copy_(layer.weight)


@dataclass(eq=False)
class FeedbackAlignment(Backprop):
    """Minibatch training with fixed random feedback matrices (FA)."""

    name: ClassVar[str] = "fa"
    true_gradient: ClassVar[bool] = False  # its backward sends feedback-weight errors: no K-FAC

    feedback_init: str = "normal"
    """Distribution of B: normal N(0, 1/(fan_in+fan_out)) (Akrout et al.'s code), xavier, kaiming (torch's W init)."""

    # backprop's ranges for the shared optimizer (AlgoPerf's Adam learning rates; see Backprop.search_space), plus B's
    # distribution.
    search_space: ClassVar[dict[str, Dimension]] = {
        **Backprop.search_space,
        # Every distribution feedback_layers offers: Akrout et al.'s normal and torch's two weight initialisations
        # (under Adam only their shape counts, not their scale: see the module docstring of feedback_alignment).
        "feedback_init": Choice(INITS),
    }

    def validate(self, task: TaskInfo) -> None:
        super().validate(task)
        check_init(self.feedback_init)

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self.validate(task)
        self.conversion = train_with_rule(self, FeedbackAlignmentRule(self.feedback_init), model, task, generator)
