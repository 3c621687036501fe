"""Update-gradient alignment probe (`update-grad`), for any algorithm: the cosine between the parameter change one
step (one ES/GA generation) applied and the negative true gradient on the same batch, at the parameters before it.

| metric                    | what                                                                           |
| ------------------------- | ------------------------------------------------------------------------------ |
| `cos/update-grad`         | over every trainable parameter of the model (norm layers' included)            |
| `cos/update-grad/<layer>` | over one Linear/Conv2d layer's weight and bias                                  |
| `cos/part-grad/<part>`    | a part the step combined into its update (hybrids: `surrogate`, `es-estimate`)  |

1 means the step went straight down the gradient: backprop with plain SGD (no momentum, no weight decay) gives 1
up to float rounding, since its update is -lr * grad exactly. Adam rescales every coordinate, so its cosine is
below 1 even though it uses the true gradient; feedback alignment, ES and GA show how gradient-like their updates
are (Lillicrap et al. 2016 report the same quantity, as an angle, for FA's hidden-layer updates). A random direction
in n dimensions has cosine ~ N(0, 1/n), so for large layers a few hundredths is already far from chance. The
alignment probe reports the weights-only angle (`align/update-grad/<layer>`, degrees) from the same shared state.

Parts. A trainer that builds its update from several directions says so with an attribute `update_parts`: a dict
naming each descent direction (an estimate of -grad) of its last step, flat `[n_params]` in
`learnbench.population.Layout` order (the order of `named_parameters()`, trainable only). The probe reports each
one's cosine to the same negative true gradient, so a hybrid's parts and its final update (the step through its
optimizer) are read on one scale: guided-es reports its `surrogate` and its `es-estimate`, openai-es its
`es-estimate` (the search gradient before Adam).
"""

from __future__ import annotations

import torch
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
        parts = getattr(self.trainer, "update_parts", None) or {}
        if parts:
            flat_descent = torch.cat([descent[n].reshape(-1) for n in names])  # [n_params], Layout order
            for part, direction in parts.items():
                if direction.numel() != flat_descent.numel():
                    raise ValueError(f"update_parts[{part!r}] has {direction.numel()} values; the model has "
                                     f"{flat_descent.numel()} trainable parameters")
                put(values, f"cos/part-grad/{part}", cosine([direction.reshape(-1)], [flat_descent]))
        return values
