"""Kolen-Pollack learning (Kolen & Pollack 1994, "Backpropagation without weight transport"; Akrout, Wilson,
Humphreys, Lillicrap & Tweed 2019, "Deep Learning without Weight Transport", NeurIPS 2019).

FA whose feedback matrices learn. Akrout et al.'s eqs. 16-17 (with B stored in W's shape, as here):

    W <- W - lr (delta x^T) - lr decay W          B <- B - lr (delta x^T) - lr decay B

B receives the same update as W (`delta x^T` is available at both synapses) and both decay, so B - W shrinks by
k = 1 - lr * decay per step and B converges to W. With any `torch.optim` optimizer this trainer gives B exactly
the update the optimizer applied to W, then decays both (decoupled, scaled by the current learning rate). Since
that leaves B - W = c (B0 - W0) with c the product of the k's, the feedback layers keep B as W + c (B0 - W0)
(`feedback_layers`), and a step only decays W and c: the same B as storing it and applying each update twice,
at a fraction of the cost (the tests compare the two step by step). The optimizer, schedule and step are
otherwise the backprop trainer's. Without decay B - W stays B0 - W0 and B aligns only as far as W outgrows it.

Defaults: backprop's Adam settings, B ~ N(0, 1/(fan_in+fan_out)) as in Akrout et al.'s FCNN_KP.py; `decay` has no
published value for Adam (their MNIST code, FCNN_KP.py, leaves it at none): see its docstring. With Adam at lr 1e-3
the decay is slow (1e-4 a step), and most of the alignment comes from B and W growing by the same updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from learnbench.algorithms.feedback_alignment import FeedbackAlignment
from learnbench.spec import TaskInfo


@dataclass(eq=False)
class KolenPollack(FeedbackAlignment):
    """Minibatch training with feedback matrices that receive W's updates plus weight decay on both (KP)."""

    name: ClassVar[str] = "kolen-pollack"
    rule: ClassVar[str] = "kp"

    decay: float = 0.1
    """KP weight decay on W and B, times the current lr per step. Chosen on MNIST's validation split (MLP 256x2,
    Adam, cosine, 15 epochs): 1.0 underfits, 0 to 0.5 are within 0.2 points, 0.1 with lr 2e-3 was best."""

    def validate(self, task: TaskInfo) -> None:
        super().validate(task)
        if self.decay < 0:
            raise ValueError(f"decay must be >= 0; got {self.decay}")

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        super().setup(model, task, generator)
        self._layers = list(self.conversion.layers.values())
        self._weights = [layer.weight for layer in self._layers]
        self._optimizer.register_step_post_hook(self._decay)
        if self.decay:  # the decay multiplies every weight once per step: 1 FLOP each (learnbench.cost)
            self._extra_flops += sum(w.numel() for w in self._weights)

    @torch.no_grad()
    def _decay(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """After the optimizer moved W (and so B, which is W + c (B0 - W0)): both decay by k = 1 - lr * decay."""
        if self.decay:
            keep = 1.0 - optimizer.param_groups[0]["lr"] * self.decay
            torch._foreach_mul_(self._weights, keep)
            for layer in self._layers:
                layer.mismatch_scale *= keep
