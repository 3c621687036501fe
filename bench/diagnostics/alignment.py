"""Alignment probe: how far each layer's update is from the true gradient, and B from W.

Per Linear/Conv2d layer (named as in the model, e.g. `blocks.0.0`, `head`), in degrees unless said:

| metric                         | what                                                                          |
| ------------------------------ | ----------------------------------------------------------------------------- |
| `align/update-grad/<layer>`    | angle between the update the step applied to W (W_after - W_before, through    |
|                                | the optimizer) and the negative true gradient of the cross-entropy on the same |
|                                | batch, at W_before. Works for any trainer (ES: the mean's move).               |
| `align/estimate-grad/<layer>`  | angle between the trainer's gradient estimate (the `.grad` its backward left)  |
|                                | and the true gradient: the feedback pathway's share, without the optimizer's.  |
| `align/norm-ratio/<layer>`     | norm of that estimate over the true gradient's norm (no unit).                 |
| `align/B-W/<layer>`            | angle between the feedback matrix the backward uses and W (fa, kolen-pollack,  |
|                                | sign-symmetry; DFA's matrices have another shape, so none).                    |

Akrout et al. (2019) report the B-W angle and the angle between hidden-layer deltas; BioTorch only B-W. Angles of
weight updates cover all four algorithms, DFA included, and backprop as the reference (estimate-grad 0; with SGD
update-grad 0 too). Weights only (biases have no feedback). The first layer's B only shapes the input gradient,
which no update uses, so under fa its B-W angle stays near 90 degrees: W1 has nothing to align with.

The true gradient is computed on the plain model (`trainer.eval_model()`, same Parameters) in train mode, as the
step sees it, under a forked RNG (dropout draws the step's masks) and with every buffer restored afterwards, so the
probe changes nothing the training sees. The runner keeps this off the training clock.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnbench.spec import Batch, TaskInfo


class AlignmentProbe:
    """Probe(training_model, trainer, task): `before_step(batch)` then `after_step(batch) -> {metric: value}`."""

    def __init__(self, training_model: nn.Module, trainer, task: TaskInfo):
        self.training_model = training_model
        self.trainer = trainer
        self.task = task
        self._before: dict[str, Tensor] | None = None
        self._true: dict[str, Tensor] | None = None

    def before_step(self, batch: Batch) -> None:
        layers = weight_layers(self.trainer.eval_model())
        self._before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
        self._true = true_gradients(self.trainer.eval_model(), layers, batch)

    def after_step(self, batch: Batch) -> dict[str, float]:
        if self._true is None or self._before is None:
            raise RuntimeError("AlignmentProbe.after_step called without before_step")
        values: dict[str, float] = {}
        for name, layer in weight_layers(self.trainer.eval_model()).items():
            true = self._true[name]
            _put(values, f"align/update-grad/{name}", angle(self._before[name] - layer.weight.detach(), true))
            estimate = layer.weight.grad
            if estimate is not None:
                _put(values, f"align/estimate-grad/{name}", angle(estimate, true))
                _put(values, f"align/norm-ratio/{name}", _ratio(estimate, true))
        for name, layer in feedback_layers(self.training_model).items():
            if layer.feedback_rule != "dfa":  # DFA's matrices map the output error, not this layer's
                _put(values, f"align/B-W/{name}", angle(layer.feedback_matrix(), layer.weight.detach()))
        self._true = self._before = None
        return values


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> every Linear/Conv2d (feedback layers included) of `model`, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def feedback_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if getattr(m, "uses_feedback_weights", False)}


def true_gradients(model: nn.Module, layers: dict[str, nn.Module], batch: Batch) -> dict[str, Tensor]:
    """d cross-entropy / dW for each layer, by autograd on the plain `model` in train mode, leaving no trace:
    `.grad`, buffers (BatchNorm statistics), module modes, requires_grad flags and the RNG are as before."""
    weights = [layer.weight for layer in layers.values()]
    flags = [w.requires_grad for w in weights]
    modes = {m: m.training for m in model.modules()}
    buffers = list(model.buffers())
    saved = [b.clone() for b in buffers]
    devices = [batch.x.device] if batch.x.device.type == "cuda" else []
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            loss = F.cross_entropy(model.train()(batch.x), batch.y)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode
    return {name: (g if g is not None else torch.zeros_like(w)) for name, g, w in zip(layers, grads, weights)}


def angle(a: Tensor, b: Tensor) -> float:
    """Angle in degrees between two tensors seen as vectors; NaN when either is zero."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    norms = a.norm() * b.norm()
    if norms == 0:
        return math.nan
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b / norms)))))


def _ratio(a: Tensor, b: Tensor) -> float:
    denominator = float(b.detach().double().norm())
    return float(a.detach().double().norm()) / denominator if denominator else math.nan


def _put(values: dict[str, float], key: str, value: float) -> None:
    if not math.isnan(value):  # a zero update or gradient has no direction
        values[key] = value
