"""Gradient-flow probe (`gradient-flow`): per layer, how large the true gradient is and how large a step the
algorithm actually took, and whether the gradient vanishes or explodes on its way to the first layer.

| metric                      | what                                                                              |
| --------------------------- | --------------------------------------------------------------------------------- |
| `grad/norm/<layer>`         | Euclidean norm of d cross-entropy / d(weight, bias) of the layer on the step's     |
|                             | batch, at the parameters before the step (the plain model, whatever the algorithm) |
| `update/norm/<layer>`       | norm of the layer's parameter change across the step (or ES/GA generation)         |
| `grad/first-last-ratio`     | `grad/norm` of the first layer over that of the last (module order)                |
| `flag/vanishing`            | 1 when that ratio is below 1e-3, else 0                                           |
| `flag/exploding`            | 1 when it is above 1e3, else 0                                                    |

The ratio and thresholds follow the usual diagnosis of deep sigmoid nets (Glorot & Bengio 2010, "Understanding
the difficulty of training deep feedforward neural networks", AISTATS; Hochreiter 1991 for the vanishing-gradient
analysis): at 20 sigmoid layers with torch's default initialisation the first layer's gradient is ~1e-17 of the
head's, while identity skips (He et al. 2016) keep it within a factor of ~100. The true gradient is the same for
every algorithm (computed on `trainer.eval_model()` by `common.step_state`, which leaves training untouched), so
the flags say whether backprop *would* see vanishing gradients at this point of the trajectory, and the update
norms show what each algorithm does instead (feedback alignment and ES do not route their updates through the
same chain of derivatives). The first and last layers are the first and last Linear/Conv2d in module order
(`blocks.0.0` and `head` for the built-in MLPs).
"""

from __future__ import annotations

import math

from torch import nn

from learnbench.diagnostics.common import StepProbe, StepState, deltas, layer_parameters, norm

VANISHING = 1e-3
"""First-over-last gradient-norm ratio below which `flag/vanishing` is raised."""
EXPLODING = 1e3
"""Ratio above which `flag/exploding` is raised."""


class GradientFlowProbe(StepProbe):
    """Probe(training_model, trainer, task): `before_step(batch)` then `after_step(batch) -> {metric: value}`."""

    def measure(self, model: nn.Module, state: StepState) -> dict[str, float]:
        moved = deltas(model, state)
        values: dict[str, float] = {}
        grads = []
        for layer, names in layer_parameters(model).items():
            grads.append(norm([state.grad[n] for n in names]))
            values[f"grad/norm/{layer}"] = grads[-1]
            values[f"update/norm/{layer}"] = norm([moved[n] for n in names])
        values.update(flow_flags(grads))
        return values


def flow_flags(grad_norms: list[float]) -> dict[str, float]:
    """The first/last gradient-norm ratio and the two flags from per-layer gradient norms in module order;
    {} for fewer than two layers or a zero last-layer gradient (no ratio to judge)."""
    if len(grad_norms) < 2 or not grad_norms[-1] > 0 or not math.isfinite(grad_norms[0]):
        return {}
    ratio = grad_norms[0] / grad_norms[-1]
    return {"grad/first-last-ratio": ratio, "flag/vanishing": float(ratio < VANISHING),
            "flag/exploding": float(ratio > EXPLODING)}
