"""Feedback alignment (Lillicrap, Cownden, Tweed & Akerman 2016, "Random synaptic feedback weights support error
backpropagation for deep learning", Nature Communications 7:13276).

Backprop with the transpose of each forward matrix replaced, in the backward pass, by a fixed random matrix B of
the same shape: the error reaching a layer's input is `delta B` instead of `delta W`. Weight updates stay local
(`delta x^T`), and W comes to align with B during training. The optimizer, schedule and step are the backprop
trainer's (`learnbench.algorithms.backprop`); only the model's layers change (`feedback_layers.convert`).

Defaults: the backprop trainer's Adam settings (lr 1e-3, batch 128) and B ~ N(0, 1/(fan_in + fan_out)), the
feedback initialisation of Akrout et al.'s reference FA code (github.com/makrout/Deep-Learning-without-Weight-
Transport, fcnn/FCNN_FA.py). With Adam the scale of B does not matter: it scales every update of a layer alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from learnbench.algorithms.feedback_layers import INITS, Conversion, FeedbackTrainer, convert
from learnbench.spec import TaskInfo


@dataclass(eq=False)
class FeedbackAlignment(FeedbackTrainer):
    """Minibatch training with fixed random feedback matrices (FA)."""

    name: ClassVar[str] = "fa"
    rule: ClassVar[str] = "fa"
    """Feedback rule of `feedback_layers.convert` that this trainer uses."""

    feedback_init: str = "normal"
    """Distribution of B: normal N(0, 1/(fan_in+fan_out)) (Akrout et al.'s code), xavier, kaiming (torch's W init)."""

    def validate(self, task: TaskInfo) -> None:
        super().validate(task)
        if self.feedback_init not in INITS:
            raise ValueError(f"feedback_init must be one of {INITS}; got {self.feedback_init!r}")

    def convert_model(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> Conversion:
        return convert(model, self.rule, generator, init=self.feedback_init, input_shape=task.input_shape)
