"""Diagnostics probes the runner calls every N steps, off the training clock (see ARCHITECTURE.md).

A probe is a class `Probe(training_model, trainer, task)` with `before_step(batch) -> None` and
`after_step(batch) -> dict[str, float]`. `PROBES` maps a suite's probe names to "module:Class"; modules are imported
only when a probe is used.
"""

from __future__ import annotations

import importlib

from ..errors import UsageError

PROBES: dict[str, str] = {
    "alignment": "learnbench.diagnostics.alignment:AlignmentProbe",
    "gradient-flow": "learnbench.diagnostics.gradient_flow:GradientFlowProbe",
    "update-grad": "learnbench.diagnostics.update_grad:UpdateGradProbe",
}


def get_probe(name: str) -> type:
    """The probe class registered as `name`; UsageError for an unknown name."""
    if name not in PROBES:
        raise UsageError(f"unknown diagnostics probe {name!r}; known: {', '.join(sorted(PROBES))}")
    module, attr = PROBES[name].split(":")
    return getattr(importlib.import_module(module), attr)
