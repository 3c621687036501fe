"""Sign symmetry (Liao, Leibo & Poggio 2016, "How Important Is Weight Symmetry in Backpropagation?", AAAI 2016;
Xiao, Chen, Liao & Poggio 2018, "Biologically-plausible learning algorithms can scale to large datasets").

The backward pass uses B = sign(W), recomputed from the current weights at every backward: only the signs of the
forward weights are transported, not their magnitudes ("uniform sign-concordant feedback", uSF, in Liao et al.).
`scale` multiplies sign(W) by the Glorot standard deviation sqrt(2/(fan_in+fan_out)) so the backward signal keeps
the size of a freshly initialised W (BioTorch's `scaling_factor` option, after Xiao et al.); without it the error
grows by about sqrt(fan_in) per layer under plain SGD. Adam is insensitive to it. Optimizer, schedule and step are
the backprop trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from learnbench.algorithms.feedback_layers import Conversion, FeedbackTrainer, convert
from learnbench.spec import TaskInfo


@dataclass(eq=False)
class SignSymmetry(FeedbackTrainer):
    """Minibatch training with B = sign(W) in the backward pass."""

    name: ClassVar[str] = "sign-symmetry"

    scale: bool = True
    """Multiply sign(W) by sqrt(2/(fan_in+fan_out)) (BioTorch's scaling_factor); False is Liao et al.'s plain uSF."""

    def convert_model(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> Conversion:
        return convert(model, "sign", generator, sign_scale=self.scale)
