"""What the probes share: the layers they report on, the true gradient at the parameters before a step, the
parameters' snapshot, angles, cosines and norms between them, and `StepProbe`, the before/after protocol over them.

`step_state(model, batch)` is the one place a probe computes the true gradient. The runner calls every probe's
`before_step` on the same batch, back to back, so the probes of one step (alignment, gradient-flow, update-grad)
share one forward/backward: the state is cached for that batch and model, and reused only while every parameter
still holds the snapshot's value.

A *layer* is a Linear or Conv2d module, named as in the model (`blocks.3.0`, `head`); its parameters are its weight
and bias. Parameters outside such layers (norms' affine weights) count only in whole-model quantities.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnbench.spec import Batch, TaskInfo, Trainer


@dataclass(frozen=True)
class StepState:
    """Trainable parameters before a step and the true gradient there, by parameter name (never modified)."""

    before: dict[str, Tensor]
    grad: dict[str, Tensor]


_CACHE: list = []  # at most one (weakref to batch, weakref to model, StepState)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> every Linear/Conv2d (feedback layers included) of `model`, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def feedback_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> every layer of `model` whose backward routes the error through feedback weights."""
    return {name: m for name, m in model.named_modules() if getattr(m, "uses_feedback_weights", False)}


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameter name -> parameter, for those that require grad (what a trainer moves; ES flattens the same)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def layer_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Layer name -> the names (as in `trainable`) of its weight and bias; a layer whose weight is frozen or tied
    to an earlier layer's keeps only what `named_parameters` lists under another name, and is left out if empty."""
    names = {id(p): name for name, p in trainable(model).items()}
    out = {}
    for layer_name, layer in weight_layers(model).items():
        own = [names[id(p)] for p in (layer.weight, layer.bias) if p is not None and id(p) in names]
        if own:
            out[layer_name] = own
    return out


def true_gradients(model: nn.Module, params: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
    """d cross-entropy / d param for each of `params` (tensors of `model`), by autograd on the plain `model` in
    train mode, as the step sees it, leaving no trace: `.grad`, buffers (BatchNorm statistics), module modes,
    requires_grad flags and the RNG (dropout draws the step's masks under a forked RNG) are as before."""
    tensors = list(params.values())
    flags = [t.requires_grad for t in tensors]
    modes = {m: m.training for m in model.modules()}
    buffers = list(model.buffers())
    saved = [b.clone() for b in buffers]
    devices = [batch.x.device] if batch.x.device.type == "cuda" else []
    try:
        for t in tensors:
            t.requires_grad_(True)
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            loss = F.cross_entropy(model.train()(batch.x), batch.y)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
        for t, flag in zip(tensors, flags):
            t.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode
    return {name: (g if g is not None else torch.zeros_like(t)) for name, g, t in zip(params, grads, tensors)}


def step_state(model: nn.Module, batch: Batch) -> StepState:
    """The trainable parameters of `model` and their true gradient on `batch`, shared by the probes of one step."""
    params = trainable(model)
    if _CACHE:
        batch_ref, model_ref, state = _CACHE[0]
        if (batch_ref() is batch and model_ref() is model and state.before.keys() == params.keys()
                and all(torch.equal(p, state.before[n]) for n, p in params.items())):
            return state
    before = {name: p.detach().clone() for name, p in params.items()}
    state = StepState(before, true_gradients(model, params, batch))
    _CACHE[:] = [(weakref.ref(batch), weakref.ref(model), state)]
    return state


def deltas(model: nn.Module, state: StepState) -> dict[str, Tensor]:
    """Parameter name -> its change since `state` was taken (what the step applied, through the optimizer)."""
    return {name: p.detach() - state.before[name] for name, p in trainable(model).items() if name in state.before}


def dot_and_norms(a: list[Tensor], b: list[Tensor]) -> tuple[float, float, float]:
    """<a, b>, |a|, |b| of two tensor lists seen as one vector each, in float64."""
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    return dot, norm(a), norm(b)


def norm(tensors: list[Tensor]) -> float:
    """Euclidean norm of a list of tensors seen as one vector (float64)."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def cosine(a: list[Tensor], b: list[Tensor]) -> float:
    """Cosine between two tensor lists seen as vectors; NaN when either is zero."""
    dot, na, nb = dot_and_norms(a, b)
    return dot / (na * nb) if na * nb > 0 else math.nan


def angle(a: Tensor, b: Tensor) -> float:
    """Angle in degrees between two tensors seen as vectors; NaN when either is zero."""
    c = cosine([a.detach().flatten()], [b.detach().flatten()])
    return math.nan if math.isnan(c) else math.degrees(math.acos(max(-1.0, min(1.0, c))))


def put(values: dict[str, float], key: str, value: float) -> None:
    """Record a value unless it is NaN (a zero update or gradient has no direction)."""
    if not math.isnan(value):
        values[key] = value


class StepProbe(ABC):
    """Probe(training_model, trainer, task): `before_step(batch)` takes the shared step state on the plain model
    (`trainer.eval_model()`), `after_step(batch)` hands it to `measure` and drops it. Subclasses define `measure`."""

    def __init__(self, training_model: nn.Module, trainer: Trainer, task: TaskInfo):
        self.training_model = training_model
        self.trainer = trainer
        self.task = task
        self._state: StepState | None = None

    def before_step(self, batch: Batch) -> None:
        self._state = step_state(self.trainer.eval_model(), batch)  # shared with the other probes of this step

    def after_step(self, batch: Batch) -> dict[str, float]:
        if self._state is None:
            raise RuntimeError(f"{type(self).__name__}.after_step called without before_step")
        values = self.measure(self.trainer.eval_model(), self._state)
        self._state = None
        return values

    @abstractmethod
    def measure(self, model: nn.Module, state: StepState) -> dict[str, float]:
        """{metric: value} from the plain model after the step and the state taken before it."""
