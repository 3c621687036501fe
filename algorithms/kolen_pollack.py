"""Kolen-Pollack learning (Kolen & Pollack 1994, "Backpropagation without weight transport"; Akrout, Wilson,
Humphreys, Lillicrap & Tweed 2019, "Deep Learning without Weight Transport", NeurIPS 2019).

FA whose feedback matrices learn. Akrout et al.'s eqs. 16-17 (with B stored in W's shape, as here):

    W <- W - lr (delta x^T) - lr decay W          B <- B - lr (delta x^T) - lr decay B

B receives the same update as W (`delta x^T` is available at both synapses) and both decay, so B - W shrinks by
k = 1 - lr * decay per step and B converges to W. With any `torch.optim` optimizer this rule gives B exactly the
update the optimizer applied to W, then decays both (decoupled, scaled by the current learning rate). Since that
leaves B - W = c (B0 - W0) with c the product of the k's, `KolenPollackRule` keeps B0 - W0 as each layer's buffer
and c (`mismatch_scale`) on itself, forms B = W + c (B0 - W0) when a backward needs it, and after each optimizer
step only decays W and c: the same B as storing it and applying each update twice, at a fraction of the cost (the
tests compare the two step by step). The optimizer, schedule and step are otherwise backprop's
(`feedback_training`). Without decay B - W stays B0 - W0 and B aligns only as far as W outgrows it.

Cost: the decay multiplies every weight once per step, 1 FLOP each, declared as the rule's `step_flops`.

Defaults: backprop's Adam settings, B ~ N(0, 1/(fan_in+fan_out)) as in Akrout et al.'s FCNN_KP.py; `decay` has no
published value for Adam (their MNIST code, FCNN_KP.py, leaves it at none): see its docstring. With Adam at lr 1e-3
the decay is slow (1e-4 a step), and most of the alignment comes from B and W growing by the same updates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from learnbench.algorithms.backprop import Backprop
from learnbench.algorithms.feedback_layers import INITS, FeedbackRule, check_init, feedback_weights
from learnbench.algorithms.feedback_training import train_with_rule
from learnbench.search_space import Choice, Dimension, LogUniform
from learnbench.spec import TaskInfo


@dataclass(eq=False)
class KolenPollackRule(FeedbackRule):
    """B = W + c (B0 - W0), given W's updates; W and c decay by k = 1 - lr * decay after every optimizer step."""

    init: str = "normal"
    """Distribution of B0 (`feedback_layers.feedback_weights`): normal, xavier or kaiming."""
    decay: float = 0.1
    """Weight decay on W and B, times the optimizer's current lr, per step."""
    mismatch_scale: float = field(default=1.0, init=False)
    """c in B = W + c (B0 - W0): the product of the decay factors k so far (the same for every layer)."""
    _weights: list[Tensor] = field(default_factory=list, init=False, repr=False)
    _mismatch: list[Tensor] = field(default_factory=list, init=False, repr=False)  # each layer's B0 - W0

    def make_feedback(self, name: str, layer: nn.Module, generator: torch.Generator) -> Tensor:
        b0 = feedback_weights(tuple(layer.weight.shape), self.init, generator).to(layer.weight)
        return b0 - layer.weight.detach()  # B0 - W0, W's shape

    def attach(self, model: nn.Module, layers: dict[str, nn.Module]) -> list[RemovableHandle]:
        self._weights = [layer.weight for layer in layers.values()]
        self._mismatch = [layer.weight_feedback for layer in layers.values()]
        return []

    def backward_matrix(self, layer: nn.Module, weight: Tensor) -> Tensor:
        return torch.add(weight, layer.weight_feedback, alpha=self.mismatch_scale)

    @torch.no_grad()
    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer moved W (and so B, which is W + c (B0 - W0)): both decay by k = 1 - lr * decay."""
        if self.decay:
            keep = 1.0 - optimizer.param_groups[0]["lr"] * self.decay
            torch._foreach_mul_(self._weights, keep)
            self.mismatch_scale *= keep

    def step_flops(self) -> int:
        return sum(w.numel() for w in self._weights) if self.decay else 0

    @torch.no_grad()
    def metrics(self) -> dict[str, Tensor]:
        """`bw_distance`: ||B - W|| / ||W|| (Frobenius) averaged over the layers, B - W = c (B0 - W0); 0 once B has
        converged to W. A 0-d tensor, left on the device (two fused norms per step, a measurement: not declared)."""
        gaps, norms = torch._foreach_norm(self._mismatch), torch._foreach_norm(self._weights)
        return {"bw_distance": (torch.stack(gaps) / torch.stack(norms)).mean() * abs(self.mismatch_scale)}

    def set_to_weights(self, layer: nn.Module) -> None:
        layer.weight_feedback.zero_()  # B0 - W0 = 0: B = W from now on


@dataclass(eq=False)
class KolenPollack(Backprop):
    """Minibatch training with feedback matrices that receive W's updates plus weight decay on both (KP)."""

    name: ClassVar[str] = "kolen-pollack"
    true_gradient: ClassVar[bool] = False  # its backward sends feedback-weight errors: no K-FAC

    feedback_init: str = "normal"
    """Distribution of B0: normal N(0, 1/(fan_in+fan_out)) (Akrout et al.'s code), xavier, kaiming."""
    decay: float = 0.1
    """KP weight decay on W and B, times the current lr per step. Chosen on MNIST's validation split (MLP 256x2,
    Adam, cosine, 15 epochs): 1.0 underfits, 0 to 0.5 are within 0.2 points, 0.1 with lr 2e-3 was best."""

    # backprop's ranges for the shared optimizer (AlgoPerf's Adam learning rates; see Backprop.search_space), plus the
    # rule's own parameters.
    search_space: ClassVar[dict[str, Dimension]] = {
        **Backprop.search_space,
        # No published value for Adam (see `decay`): a decade either side of the default 0.1, up to the 1.0 that
        # underfit in the sweep that chose it; log-uniform, so 0 (B - W never shrinks) is left out.
        "decay": LogUniform(0.01, 1.0),
        # Every distribution feedback_layers offers: Akrout et al.'s normal and torch's two weight initialisations
        # (under Adam only their shape counts, not their scale: see the module docstring of feedback_alignment).
        "feedback_init": Choice(INITS),
    }

    def validate(self, task: TaskInfo) -> None:
        super().validate(task)
        check_init(self.feedback_init)
        if self.decay < 0:
            raise ValueError(f"decay must be >= 0; got {self.decay}")

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self.validate(task)
        rule = KolenPollackRule(self.feedback_init, self.decay)
        self.conversion = train_with_rule(self, rule, model, task, generator)
