"""Sign symmetry (Liao, Leibo & Poggio 2016, "How Important Is Weight Symmetry in Backpropagation?", AAAI 2016;
Xiao, Chen, Liao & Poggio 2018, "Biologically-plausible learning algorithms can scale to large datasets").

The backward pass uses B = sign(W), recomputed from the current weights at every backward: only the signs of the
forward weights are transported, not their magnitudes ("uniform sign-concordant feedback", uSF, in Liao et al.).
`scale` multiplies sign(W) by the Glorot standard deviation sqrt(2/(fan_in+fan_out)) so the backward signal keeps
the size of a freshly initialised W (BioTorch's `scaling_factor` option, after Xiao et al.); without it the error
grows by about sqrt(fan_in) per layer under plain SGD. Adam is insensitive to it. `SignSymmetryRule` is the whole
rule (it keeps no feedback weights); optimizer, schedule and step are backprop's (`feedback_training`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from learnbench.algorithms.backprop import Backprop
from learnbench.algorithms.feedback_layers import FeedbackRule
from learnbench.algorithms.feedback_training import train_with_rule
from learnbench.search_space import Choice, Dimension
from learnbench.spec import TaskInfo


def glorot_std(shape: torch.Size) -> float:
    """sqrt(2 / (fan_in + fan_out)) for a Linear [out, in] or Conv2d [C_out, C_in/groups, kH, kW] weight, with
    fan-in/out as `nn.init._calculate_fan_in_and_fan_out` computes them."""
    receptive = math.prod(shape[2:])  # 1 for a Linear weight
    return math.sqrt(2.0 / (shape[1] * receptive + shape[0] * receptive))


@dataclass(eq=False)
class SignSymmetryRule(FeedbackRule):
    """B = sign(W) (times the Glorot std with `scale`), from W as the forward pass used it; no stored feedback."""

    scale: bool = True
    """Multiply sign(W) by sqrt(2/(fan_in+fan_out)); False is Liao et al.'s plain uSF."""

    def backward_matrix(self, layer: nn.Module, weight: Tensor) -> Tensor:
        return torch.sign(weight).mul_(glorot_std(weight.shape) if self.scale else 1.0)


@dataclass(eq=False)
class SignSymmetry(Backprop):
    """Minibatch training with B = sign(W) in the backward pass."""

    name: ClassVar[str] = "sign-symmetry"
    true_gradient: ClassVar[bool] = False  # its backward sends feedback-weight errors: no K-FAC

    scale: bool = True
    """Multiply sign(W) by sqrt(2/(fan_in+fan_out)) (BioTorch's scaling_factor); False is Liao et al.'s plain uSF."""

    # backprop's ranges for the shared optimizer (AlgoPerf's Adam learning rates; see Backprop.search_space), plus
    # both published variants: Xiao et al.'s scaled sign(W) and Liao et al.'s plain uSF.
    search_space: ClassVar[dict[str, Dimension]] = {**Backprop.search_space, "scale": Choice((True, False))}

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self.validate(task)
        self.conversion = train_with_rule(self, SignSymmetryRule(self.scale), model, task, generator)
