"""Trainers that break one rule each, as a `--plugin` file: the conformance kit must name the rule, the runner must
fail (or mark diverged) only their own trials (test_plugins, test_runner, test_cli use them). `FAILS[name]` lists the
checks each one fails."""

BROKEN = '''
import random
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from learnbench.algorithms.backprop import Backprop
from learnbench.search_space import LogUniform
from learnbench.spec import StepStats


@dataclass(eq=False)
class Required(Backprop):
    """A hyper-parameter without a default."""
    name: ClassVar[str] = "required"
    temperature: float = field(kw_only=True)


@dataclass(eq=False)
class AltersDefault(Backprop):
    """__init__ resolves lr=None to a number (belongs in setup)."""
    name: ClassVar[str] = "alters-default"

    def __post_init__(self):
        self.lr = self.lr if self.lr is not None else 1e-3


@dataclass(eq=False)
class InitState(Backprop):
    """__init__ builds state."""
    name: ClassVar[str] = "init-state"

    def __post_init__(self):
        self._steps_done = 0


@dataclass(eq=False)
class RaisesInSetup(Backprop):
    """setup raises."""
    name: ClassVar[str] = "raises-in-setup"

    def setup(self, model, task, generator):
        raise ValueError("deliberate failure in setup")


@dataclass(eq=False)
class Raises(Backprop):
    """Raises in step 3."""
    name: ClassVar[str] = "raises"

    def step(self, batch):
        self._count = getattr(self, "_count", 0) + 1
        if self._count == 3:
            raise RuntimeError("deliberate failure in step 3")
        return super().step(batch)


@dataclass(eq=False)
class GlobalSeed(Backprop):
    """Seeds torch's global generator in setup (deterministic, but not through the generator it is given)."""
    name: ClassVar[str] = "global-seed"

    def setup(self, model, task, generator):
        torch.manual_seed(1234)
        super().setup(model, task, generator)


@dataclass(eq=False)
class Nondeterministic(Backprop):
    """Perturbs the weights with Python's unseeded global `random`."""
    name: ClassVar[str] = "nondeterministic"

    def step(self, batch):
        stats = super().step(batch)
        with torch.no_grad():
            for p in self._model.parameters():
                p.add_(random.random() * 1e-3)
        return stats


@dataclass(eq=False)
class NoLearning(Backprop):
    """Reports the loss but never updates the weights."""
    name: ClassVar[str] = "no-learning"

    def step(self, batch):
        with torch.no_grad():
            loss = nn.functional.cross_entropy(self._model(batch.x), batch.y)
        return StepStats(loss, batch.y.shape[0])


@dataclass(eq=False)
class NanAfter(Backprop):
    """Reports a NaN loss from step `after` on."""
    name: ClassVar[str] = "nan-after"
    after: int = 5

    def step(self, batch):
        stats = super().step(batch)
        self._count = getattr(self, "_count", 0) + 1
        nan = StepStats(float("nan"), stats.forward_passes, metrics=stats.metrics)  # only the loss breaks a rule
        return nan if self._count > self.after else stats


@dataclass(eq=False)
class Mutates(Backprop):
    """Normalises its batch in place."""
    name: ClassVar[str] = "mutates"

    def step(self, batch):
        batch.x.sub_(0.5)
        return super().step(batch)


@dataclass(eq=False)
class WrongType(Backprop):
    """Returns a float instead of StepStats."""
    name: ClassVar[str] = "wrong-type"

    def step(self, batch):
        super().step(batch)
        return 0.5


@dataclass(eq=False)
class FloatCounts(Backprop):
    """Counts passes as floats and forgets the backward passes' sign."""
    name: ClassVar[str] = "float-counts"

    def step(self, batch):
        stats = super().step(batch)
        return StepStats(stats.loss, float(stats.forward_passes), -1)


@dataclass(eq=False)
class NanMetric(Backprop):
    """Reports a metric that is NaN at step 7."""
    name: ClassVar[str] = "nan-metric"

    def step(self, batch):
        stats = super().step(batch)
        self._count = getattr(self, "_count", 0) + 1
        stats.metrics["noise"] = float("nan") if self._count == 7 else 1.0
        return stats


@dataclass(eq=False)
class ChangingMetrics(Backprop):
    """Adds a metric on every other step only."""
    name: ClassVar[str] = "changing-metrics"

    def step(self, batch):
        stats = super().step(batch)
        self._count = getattr(self, "_count", 0) + 1
        if self._count % 2 == 0:
            stats.metrics["momentum"] = 0.9
        return stats


@dataclass(eq=False)
class BadMetricName(Backprop):
    """Names a metric with capitals and a space (not a valid train/<name>)."""
    name: ClassVar[str] = "bad-metric-name"

    def step(self, batch):
        stats = super().step(batch)
        stats.metrics["Grad Norm"] = 1.0
        return stats


@dataclass(eq=False)
class EvalNotModule(Backprop):
    """eval_model returns the state dict instead of the module."""
    name: ClassVar[str] = "eval-not-module"

    def eval_model(self):
        return self._model.state_dict()


@dataclass(eq=False)
class EvalOtherArchitecture(Backprop):
    """eval_model wraps the model, so its weights do not reload into the model spec."""
    name: ClassVar[str] = "eval-other-architecture"

    def setup(self, model, task, generator):
        super().setup(model, task, generator)
        self._wrapped = nn.Sequential(model)

    def eval_model(self):
        return self._wrapped


@dataclass(eq=False)
class SpaceOutsideValidate(Backprop):
    """Searches lr up to 10, which its own validate() refuses above 1."""
    name: ClassVar[str] = "space-outside-validate"
    search_space: ClassVar[dict] = {"lr": LogUniform(1e-3, 10.0)}

    def validate(self, task):
        super().validate(task)
        if self.lr is not None and self.lr > 1:
            raise ValueError(f"lr must be at most 1; got {self.lr}")


@dataclass(eq=False)
class SpaceUnknownName(Backprop):
    """Searches `learning_rate`, which is not one of its hyper-parameters (lr is)."""
    name: ClassVar[str] = "space-unknown-name"
    search_space: ClassVar[dict] = {"learning_rate": LogUniform(1e-4, 1e-2)}

'''

DUPLICATE = '''
from dataclasses import dataclass
from typing import ClassVar

from learnbench.algorithms.backprop import Backprop


@dataclass(eq=False)
class Duplicate(Backprop):
    """Claims the built-in name."""
    name: ClassVar[str] = "backprop"
'''

# name -> the checks the kit fails (every other check passes)
NEEDS_A_RUN = {"runs", "deterministic", "uses_given_generator", "loss_decreases", "batch_not_mutated",
               "step_stats_plausible", "step_metrics", "eval_model", "init_stores_only"}
FAILS = {
    # backprop's inherited search_space cannot be checked without defaults either
    "required": {"constructible", "hparams_round_trip", "search_space", "init_stores_only"} | NEEDS_A_RUN
    | {"trial_recorded"},
    "alters-default": {"hparams_round_trip"},
    "init-state": {"init_stores_only"},
    "raises-in-setup": NEEDS_A_RUN | {"trial_recorded"},
    "raises": NEEDS_A_RUN | {"trial_recorded"},
    "global-seed": {"uses_given_generator"},
    "nondeterministic": {"deterministic"},
    "no-learning": {"loss_decreases"},
    "nan-after": {"loss_decreases"},  # the 5-step trial ends before the NaN
    "mutates": {"batch_not_mutated", "trial_recorded"},
    "wrong-type": {"loss_decreases", "step_stats_plausible", "trial_recorded"},
    "float-counts": {"step_stats_plausible"},
    "nan-metric": {"step_metrics"},
    "changing-metrics": {"step_metrics"},
    "bad-metric-name": {"step_metrics", "trial_recorded"},  # the runner refuses the name: the trial fails
    "eval-not-module": {"eval_model", "trial_recorded"},
    "eval-other-architecture": {"eval_model", "trial_recorded"},
    "space-outside-validate": {"search_space"},
    "space-unknown-name": {"search_space"},
    "backprop": {"unique_name", "trial_recorded"},
}
