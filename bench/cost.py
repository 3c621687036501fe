"""Nominal cost: the FLOPs a trial is charged, the same whatever the implementation, shortcut or device.

`cost/flops` = the plain model's dense FLOPs per example (forward, and backward for the passes that have one),
times the example-passes each step reports in `StepStats`, plus the FLOPs of the work the trainer does outside the
model, declared in `StepStats.extra_flops` with a formula documented beside the code that does it.

* The model's FLOPs are measured once per model, outside the clock, by `torch.utils.flop_counter.FlopCounterMode`
  on a CPU copy of the plain `nn.Module` (two examples of zeros, then divided by two): what the dense forward and a
  backward to the parameters (not to the input, which needs no gradient in training) cost. FlopCounterMode counts
  matrix products and convolutions (a multiply-add is 2 FLOPs), not elementwise work such as activations.
  A population trainer that skips all-zero input columns, shares the first layer between mirrored pairs or runs
  on actors is charged the same as the dense forward: the count follows from the passes, not the code path.
* Work outside the model follows one convention everywhere: each elementwise arithmetic operation on one float
  (add, multiply, divide, square root, ...) is 1 FLOP, a multiply-add in a matrix product 2, drawing a standard
  normal 1. `optimizer_flops` gives a `torch.optim` update's share by that rule, so backprop, the feedback-alignment
  trainers and the evolution strategies' mean update pay for their optimizer alike.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Per parameter and step, the torch.optim update as its documentation writes it (torch.optim.<Name> pseudocode):
# e.g. Adam: m = b1 m + (1 - b1) g (3), v = b2 v + (1 - b2) g^2 (4), both bias corrections (2),
# p -= lr m / (sqrt(v) + eps) (5) = 14. Weight decay adds g += wd p (2); AdamW's decoupled p *= 1 - lr wd adds 2.
_SGD, _MOMENTUM, _NESTEROV = 2, 4, 6
_ADAM, _RMSPROP, _RMSPROP_MOMENTUM, _ADAGRAD = 14, 9, 11, 7
_WEIGHT_DECAY = 2


@dataclass(frozen=True)
class ModelFlops:
    """Dense FLOPs of one example through the plain model."""

    forward: float
    """A forward pass."""
    backward: float
    """A backward pass to every parameter (the input's gradient excluded, as in training)."""


def model_flops(model: nn.Module, input_shape: tuple[int, ...]) -> ModelFlops:
    """FlopCounterMode's count for one example through a CPU copy of `model` (the original is not touched)."""
    probe = copy.deepcopy(model).cpu().train()
    x = torch.zeros(2, *input_shape)  # two examples: a batch of one can take other kernels
    with FlopCounterMode(display=False) as forward_counter:
        out = probe(x)
    forward = forward_counter.get_total_flops()
    loss = F.cross_entropy(out.flatten(1), torch.zeros(2, dtype=torch.long))
    with FlopCounterMode(display=False) as backward_counter:
        loss.backward()
    return ModelFlops(forward / 2, backward_counter.get_total_flops() / 2)


def optimizer_flops(optimizer: torch.optim.Optimizer) -> float:
    """FLOPs of one `optimizer.step()` over all its parameters, by the rule in the module docstring."""
    total = 0.0
    for group in optimizer.param_groups:
        n = sum(p.numel() for p in group["params"])
        total += n * _per_parameter(optimizer, group)
    return total


def _per_parameter(optimizer: torch.optim.Optimizer, group: dict) -> int:
    decay = _WEIGHT_DECAY if group.get("weight_decay") else 0
    if isinstance(optimizer, torch.optim.AdamW):  # before Adam: some torch versions derive AdamW from Adam
        return _ADAM + decay
    if isinstance(optimizer, torch.optim.Adam):
        return _ADAM + decay
    if isinstance(optimizer, torch.optim.SGD):
        steps = _NESTEROV if group.get("nesterov") else _MOMENTUM if group.get("momentum") else _SGD
        return steps + decay
    if isinstance(optimizer, torch.optim.RMSprop):
        return (_RMSPROP_MOMENTUM if group.get("momentum") else _RMSPROP) + decay
    if isinstance(optimizer, torch.optim.Adagrad):
        return _ADAGRAD + decay
    raise ValueError(f"no FLOP formula for {type(optimizer).__name__}; declare its cost in StepStats.extra_flops")
