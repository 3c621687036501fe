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
| `align/B-W/<layer>`            | angle between the feedback matrix the backward uses and W, for every rule with |
|                                | such a matrix (`feedback_matrix()`: fa, kolen-pollack, sign-symmetry; not DFA, |
|                                | whose matrices map the output error).                                          |

Akrout et al. (2019) report the B-W angle and the angle between hidden-layer deltas; BioTorch only B-W. Angles of
weight updates cover all four algorithms, DFA included, and backprop as the reference (estimate-grad 0; with SGD
update-grad 0 too). Weights only (biases have no feedback). The first layer's B only shapes the input gradient,
which no update uses, so under fa its B-W angle stays near 90 degrees: W1 has nothing to align with.

The true gradient is computed on the plain model (`trainer.eval_model()`, same Parameters) in train mode, as the
step sees it, under a forked RNG (dropout draws the step's masks) and with every buffer restored afterwards, so the
probe changes nothing the training sees. The runner keeps this off the training clock.
"""

from __future__ import annotations

from torch import Tensor, nn

from learnbench.diagnostics.common import (StepProbe, StepState, angle, feedback_layers, put, trainable,
                                           true_gradients, weight_layers)

__all__ = ["AlignmentProbe", "angle", "feedback_layers", "true_gradients", "weight_layers"]


class AlignmentProbe(StepProbe):
    """Probe(training_model, trainer, task): `before_step(batch)` then `after_step(batch) -> {metric: value}`."""

    def measure(self, model: nn.Module, state: StepState) -> dict[str, float]:
        values: dict[str, float] = {}
        names = {id(p): key for key, p in trainable(model).items()}
        for name, layer in weight_layers(model).items():
            key = names.get(id(layer.weight))
            if key is None:  # a frozen weight: nothing moves it
                continue
            true, before = state.grad[key], state.before[key]
            put(values, f"align/update-grad/{name}", angle(before - layer.weight.detach(), true))
            estimate = layer.weight.grad
            if estimate is not None:
                put(values, f"align/estimate-grad/{name}", angle(estimate, true))
                put(values, f"align/norm-ratio/{name}", _ratio(estimate, true))
        for name, layer in feedback_layers(self.training_model).items():
            matrix = layer.feedback_matrix()  # None when the rule has no B shaped like W (DFA's map the output error)
            if matrix is not None:
                put(values, f"align/B-W/{name}", angle(matrix, layer.weight.detach()))
        return values


def _ratio(a: Tensor, b: Tensor) -> float:
    denominator = float(b.detach().double().norm())
    return float(a.detach().double().norm()) / denominator if denominator else float("nan")
