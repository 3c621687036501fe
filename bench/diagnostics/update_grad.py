"""Update-gradient alignment probe (`update-grad`), for any algorithm: the cosine between the parameter change one
step (one ES/GA generation) applied and the negative true gradient on the same batch, at the parameters before it.

| metric                    | what                                                                           |
| ------------------------- | ------------------------------------------------------------------------------ |
| `cos/update-grad`         | over every trainable parameter of the model (norm layers' included)            |
| `cos/update-grad/<layer>` | over one Linear/Conv2d layer's weight and bias                                  |

1 means the step went straight down the gradient: backprop with plain SGD (no momentum, no weight decay) gives 1
up to float rounding, since its update is -lr * grad exactly. Adam rescales every coordinate, so its cosine is
below 1 even though it uses the true gradient; feedback alignment, ES and GA show how gradient-like their updates
are (Lillicrap et al. 2016 report the same quantity, as an angle, for FA's hidden-layer updates). A random direction
in n dimensions has cosine ~ N(0, 1/n), so for large layers a few hundredths is already far from chance. The
alignment probe reports the weights-only angle (`align/update-grad/<layer>`, degrees) from the same shared state.
"""

from __future__ import annotations

from torch import nn

from learnbench.diagnostics.common import StepProbe, StepState, cosine, deltas, layer_parameters, put


class UpdateGradProbe(StepProbe):
    """Probe(training_model, trainer, task): `before_step(batch)` then `after_step(batch) -> {metric: value}`."""

    def measure(self, model: nn.Module, state: StepState) -> dict[str, float]:
        moved = deltas(model, state)
        descent = {name: -g for name, g in state.grad.items()}
        values: dict[str, float] = {}
        names = list(moved)
        put(values, "cos/update-grad", cosine([moved[n] for n in names], [descent[n] for n in names]))
        for layer, own in layer_parameters(model).items():
            put(values, f"cos/update-grad/{layer}", cosine([moved[n] for n in own], [descent[n] for n in own]))
        return values
