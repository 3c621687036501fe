"""How the feedback-alignment family trains: backprop's optimizer, schedule and step on a model whose Linear/Conv2d
layers send their error backward as a feedback rule says. Composition, not a class chain: each trainer of the
family subclasses `Backprop` (its hyper-parameters and step) and, in `setup`, hands its rule object to
`train_with_rule`:

    def setup(self, model, task, generator):
        self.validate(task)
        self.conversion = train_with_rule(self, MyRule(...), model, task, generator)

`train_with_rule`

* converts the model in place with the rule (`feedback_layers.convert`: the converter knows no rule by name);
* builds backprop's optimizer and schedule on it (`Backprop.build_state`: the converted layers hold the very same
  Parameters), with the rule's `after_optimizer_step` as an optimizer post-hook, so feedback that learns
  (Kolen-Pollack) moves right after W does, the rule's `step_flops()` declared per step and its `metrics()`
  reported with backprop's learning rate in every step's `StepStats.metrics`;
* makes `eval_model()` return the conversion's plain view: the same Parameters and buffers, true gradients, so
  evaluation and the attacks never see the feedback pathway (the runner's pseudo-gradient attack reads the
  training model).

Cost: backprop's (B forward and B backward passes of the model per step, the optimizer's update, `grad_clip`'s
norm) plus the rule's `step_flops()` (`learnbench.cost`). The feedback matrices cost the backward what W would, so
the nominal model FLOPs are backprop's.
"""

from __future__ import annotations

import torch
from torch import nn

from learnbench.algorithms.backprop import Backprop
from learnbench.algorithms.feedback_layers import Conversion, FeedbackRule, convert
from learnbench.spec import TaskInfo


def train_with_rule(trainer: Backprop, rule: FeedbackRule, model: nn.Module, task: TaskInfo,
                    generator: torch.Generator) -> Conversion:
    """Convert `model` in place to follow `rule` (a new rule object per setup: a rule keeps state for its model)
    and build `trainer`'s backprop state on it; returns the conversion (layers by name, rule, plain view, undo)."""
    conversion = convert(model, rule, generator, input_shape=task.input_shape)
    trainer.build_state(model, task, evaluated=conversion.plain, after_optimizer_step=rule.after_optimizer_step,
                        extra_flops=rule.step_flops(), metrics=rule.metrics)
    return conversion
