"""Feedback layers: `Linear` and `Conv2d` whose backward pass sends the error to their input as a `FeedbackRule`
says. This is the mechanism the feedback-alignment family shares; it knows no rule by name.

`convert(model, rule, generator, input_shape=...)` swaps every `nn.Linear` / `nn.Conv2d` of a model, in place, for
a `FeedbackLinear` / `FeedbackConv2d` that holds the *same* `Parameter`s, so the forward pass is the original one
(the autograd functions call `F.linear` and the layer's own `Conv2d._conv_forward`), bit for bit. Only the error
sent to the layer's input changes, and the rule object decides it; the weight and bias gradients are the usual
local ones (`delta x^T`). Rules follow the shape of `torch.optim` (one `Optimizer` base, one file per optimizer):
one `FeedbackRule` base here, one file per rule, each file also holding its trainer:

| file                           | rule                          | error sent to the input (`g`: output gradient) |
| ------------------------------ | ----------------------------- | ---------------------------------------------- |
| `feedback_alignment.py`        | `FeedbackAlignmentRule`       | `g B`, B fixed and random, shaped like W       |
| `direct_feedback_alignment.py` | `DirectFeedbackAlignmentRule` | `e B`: the model's output error, projected     |
| `sign_symmetry.py`             | `SignSymmetryRule`            | `g sign(W) s`, from W at every backward        |
| `kolen_pollack.py`             | `KolenPollackRule`            | `g B`, B given W's updates, both decaying      |

A rule whose error is `g M`, M a matrix shaped like W, returns M from `backward_matrix`: the Linear backward
multiplies by it and the Conv2d backward hands it to aten's `convolution_backward` in W's place, so one method
serves both layer types. A rule whose error does not come from the layer's own output gradient (DFA) returns
None there and computes the error in `input_error`. A new rule is one new file: a `FeedbackRule` subclass and a
`Backprop` subclass whose `setup` hands it to `feedback_training.train_with_rule` (examples/feedback-rule/ does it
as a plugin).

The pseudo-gradient: the converted model's input gradient (`x.requires_grad_(); loss.backward()`) is what the
feedback pathway delivers to the pixels (`g B` of the first layer for fa, kolen-pollack and sign-symmetry; for
DFA a fixed random projection of the output error). `Conversion.plain` is a view of the model without feedback
layers, sharing every parameter and buffer, whose backward is the true gradient: trainers return it from
`eval_model()`, and attacks find feedback layers by their class attribute `uses_feedback_weights`.

Norm layers' affine parameters are trained by their own (local) gradients. Layers that move weights in ways this
module cannot redirect (Conv1d/3d, transposed convs, attention, RNNs, Linear/Conv2d subclasses with their own
forward) are refused with a ValueError rather than silently trained by backprop.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

INITS = ("normal", "xavier", "kaiming")
UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear,
               nn.MultiheadAttention, nn.RNNBase)


class FeedbackRule(ABC):
    """What one feedback rule decides: the feedback weights each layer keeps, the error each layer sends to its
    input, and how the feedback changes during training. Implement `backward_matrix` (or return None from it and
    implement `input_error`); the other hooks are optional, their defaults do nothing (`set_to_weights`, needed
    only by reference tests, raises NotImplementedError).

    Order of the calls: `convert` calls `prepare` once, `make_feedback` per layer in module order and `attach`
    once after the swap; every backward pass calls `backward_matrix` (then, if it gave None, `input_error`) per
    layer; `feedback_training.train_with_rule` runs `after_optimizer_step` after every optimizer step, declares
    `step_flops()` and reports `metrics()` per step. One rule object serves one conversion: it may keep state for
    it (DFA's output error, Kolen-Pollack's mismatch scale). A `layer` argument is a feedback layer: the original's
    `weight`, `bias` and attributes, plus `feedback_rule` (this object) and the buffer `weight_feedback` that
    `make_feedback` made."""

    def prepare(self, model: nn.Module, layers: dict[str, nn.Module], input_shape: tuple[int, ...] | None) -> None:
        """Before any feedback is made: look at the unconverted model. `layers` maps qualified names to its
        Linear/Conv2d layers in module order; `input_shape` is one example's shape (no batch dimension) or None."""

    def make_feedback(self, name: str, layer: nn.Module, generator: torch.Generator) -> Tensor | None:
        """The layer's buffer `weight_feedback` (None: this rule keeps none), on the layer's device and dtype.
        Randomness comes from `generator` (the trainer's), drawn in module order."""
        return None

    def attach(self, model: nn.Module, layers: dict[str, nn.Module]) -> list[RemovableHandle]:
        """After the swap (`layers`: name -> feedback layer): keep what later hooks need and register hooks on the
        model; `Conversion.undo` removes the handles returned."""
        return []

    @abstractmethod
    def backward_matrix(self, layer: nn.Module, weight: Tensor) -> Tensor | None:
        """The matrix that takes W's place in the backward pass to the layer's input, shaped like W ([out, in] or
        [C_out, C_in / groups, kH, kW]), from `weight` (W as the forward pass used it) and the layer's buffers; None
        when the rule computes the input error itself (`input_error`). Also the B that diagnostics compare with W."""

    def input_error(self, layer: nn.Module, grad_out: Tensor, x: Tensor) -> Tensor:
        """The error sent to the layer's input `x` (same shape and dtype as x), when `backward_matrix` gave None.
        `grad_out` is the gradient at the layer's output ([..., out] or [N, C_out, H', W'])."""
        raise NotImplementedError(f"{type(self).__name__}.backward_matrix gave None but input_error is missing")

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After every optimizer step: move feedback that learns (Kolen-Pollack's decay)."""

    def step_flops(self) -> int:
        """FLOPs per step of the work `after_optimizer_step` does (outside the model, `learnbench.cost`)."""
        return 0

    def metrics(self) -> dict[str, float | Tensor]:
        """Named values the trainer reports after every step (`StepStats.metrics`, recorded as `train/<name>`):
        floats or 0-d tensors left on the device (Kolen-Pollack's B-W distance); none by default."""
        return {}

    def set_to_weights(self, layer: nn.Module) -> None:
        """Make the layer's B equal W so that its backward is backprop's: the reference the tests compare with."""
        raise NotImplementedError(f"{type(self).__name__} cannot make its feedback equal W")


class _LinearFn(torch.autograd.Function):
    """F.linear forward; backward sends the error to the input through the layer's feedback rule."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, layer: nn.Module):
        ctx.layer = layer
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # grad_out [..., out]
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        layer, grad_x, grad_w, grad_b = ctx.layer, None, None, None
        dtype = grad_out.dtype  # bfloat16 under autocast: x and W were cast inside F.linear, not saved cast
        if need_x:
            rule = layer.feedback_rule
            matrix = rule.backward_matrix(layer, weight)  # [out, in], or None: the rule gives the error itself
            grad_x = rule.input_error(layer, grad_out, x) if matrix is None else grad_out @ matrix.to(dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out]
        if need_w:
            grad_w = g2.T @ x.reshape(-1, x.shape[-1]).to(dtype)  # [out, in]: the local delta x^T, as backprop's
        if need_b:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None


class _Conv2dFn(torch.autograd.Function):
    """The layer's own conv forward; backward is aten's convolution_backward with the rule's matrix in W's place."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, layer: nn.Module):
        ctx.layer = layer
        ctx.save_for_backward(x, weight)
        return layer._conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # grad_out [N, C_out, H', W']
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        layer = ctx.layer
        matrix = layer.feedback_rule.backward_matrix(layer, weight) if need_x else None  # W's shape, or None
        routed = matrix is not None
        dtype = grad_out.dtype  # bfloat16 under autocast (see _LinearFn)
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x.to(dtype), (matrix if routed else weight).to(dtype), [weight.shape[0]] if need_b else None,
            layer.stride, layer.int_padding, layer.dilation, False, [0, 0], layer.groups, [routed, need_w, need_b])
        if need_x and not routed:
            grad_x = layer.feedback_rule.input_error(layer, grad_out, x)
        return grad_x, grad_w, grad_b, None


class FeedbackLayer:
    """What the two feedback layers add to nn.Linear / nn.Conv2d: the rule they follow and their B."""

    uses_feedback_weights: ClassVar[bool] = True
    """Marks layers whose backward is not the true gradient (the attacks run pseudo-gradient PGD on such models)."""

    feedback_rule: FeedbackRule
    """The rule this layer's backward follows (one object for every layer of a conversion)."""

    def feedback_matrix(self) -> Tensor | None:
        """B shaped like W as the next backward pass will use it, or None when the rule has no such matrix (DFA):
        for diagnostics and tests."""
        return self.feedback_rule.backward_matrix(self, self.weight.detach())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feedback={self.feedback_rule!r}"


class FeedbackLinear(FeedbackLayer, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        if not x.requires_grad:  # no error leaves this layer (the first one, in training): backprop's own backward
            return F.linear(x, self.weight, self.bias)  # computes the same local W and b gradients, in C++
        return _LinearFn.apply(x, self.weight, self.bias, self)


class FeedbackConv2d(FeedbackLayer, nn.Conv2d):
    int_padding: tuple[int, int]
    """Symmetric integer padding equal to the layer's (possibly 'same'/'valid') padding, for the backward."""

    def forward(self, x: Tensor) -> Tensor:
        if not x.requires_grad:  # as in FeedbackLinear
            return self._conv_forward(x, self.weight, self.bias)
        return _Conv2dFn.apply(x, self.weight, self.bias, self)


FEEDBACK_CLASSES = {nn.Linear: FeedbackLinear, nn.Conv2d: FeedbackConv2d}


@dataclass(eq=False)
class Conversion:
    """The result of `convert`: the model (changed in place), its plain view, the rule, and the way back."""

    model: nn.Module
    """The training model: the same object that was converted, now holding feedback layers."""
    plain: nn.Module
    """A structural copy without feedback layers that shares every Parameter and buffer: true gradients."""
    layers: dict[str, nn.Module]
    """Qualified name -> feedback layer, in module order."""
    rule: FeedbackRule
    """The rule every layer follows."""
    _slots: list[tuple[nn.Module, str, nn.Module]] = field(repr=False)
    _handles: list[RemovableHandle] = field(default_factory=list, repr=False)

    def undo(self) -> nn.Module:
        """Put the original layer objects back (their Parameters were trained in place) and drop the rule's hooks."""
        for parent, child_name, original in self._slots:
            setattr(parent, child_name, original)
        for handle in self._handles:
            handle.remove()
        return self.model


def convert(model: nn.Module, rule: FeedbackRule, generator: torch.Generator, *,
            input_shape: tuple[int, ...] | None = None) -> Conversion:
    """Swap `model`'s Linear/Conv2d layers in place for feedback layers whose backward follows `rule`.

    The rule makes each layer's feedback in module order, drawing from `generator`. `input_shape` (one example, no
    batch dimension) is passed to the rule's `prepare`; rules that size their matrices by it (DFA) need it. Nothing
    of the model changes when a ValueError is raised."""
    if not isinstance(rule, FeedbackRule):
        raise ValueError(f"rule must be a FeedbackRule object (learnbench.algorithms.feedback_layers); got {rule!r}")
    slots, names = _find_layers(model)
    rule.prepare(model, names, input_shape)
    plain = _shared_copy(model)
    clones = {id(layer): _feedback_layer(name, layer, rule, generator) for name, layer in names.items()}
    for parent, child_name, layer in slots:
        setattr(parent, child_name, clones[id(layer)])
    layers = {name: clones[id(m)] for name, m in names.items()}
    return Conversion(model, plain, layers, rule, slots, rule.attach(model, layers))


def _feedback_layer(name: str, layer: nn.Module, rule: FeedbackRule, generator: torch.Generator) -> nn.Module:
    """The feedback version of `layer`, holding the same Parameters and the rule's buffer."""
    clone = _clone_as(layer, FEEDBACK_CLASSES[_base_class(layer)])
    clone.feedback_rule = rule
    if isinstance(clone, nn.Conv2d):
        clone.int_padding = _int_padding(name, layer)
    clone.register_buffer("weight_feedback", rule.make_feedback(name, clone, generator))
    return clone


@torch.no_grad()
def set_feedback_to_weights(conversion: Conversion) -> None:
    """Make every layer's B equal W (B = W^T in the papers' notation): the backward becomes backprop's. For tests."""
    for layer in conversion.layers.values():
        conversion.rule.set_to_weights(layer)


def check_init(init: str) -> None:
    """ValueError unless `init` names a distribution of `feedback_weights` (the trainers' `feedback_init`)."""
    if init not in INITS:
        raise ValueError(f"feedback_init must be one of {INITS}; got {init!r}")


def feedback_weights(shape: tuple[int, ...], init: str, generator: torch.Generator) -> Tensor:
    """Random feedback weights on the generator's device (fan-in/out as torch computes them for a weight of this
    shape):

    * `normal`  N(0, 1/(fan_in + fan_out)), the feedback of Akrout et al.'s reference code (FCNN_FA.py, FCNN_KP.py);
    * `xavier`  U(+-sqrt(6/(fan_in + fan_out))), Glorot & Bengio 2010, BioTorch's default;
    * `kaiming` U(+-1/sqrt(fan_in)), the distribution torch draws Linear/Conv2d weights from."""
    check_init(init)
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(torch.empty(shape, device="meta"))
    if init == "normal":
        return torch.randn(shape, generator=generator, device=generator.device) / math.sqrt(fan_in + fan_out)
    bound = math.sqrt(6.0 / (fan_in + fan_out)) if init == "xavier" else 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator, device=generator.device) * 2 - 1) * bound


def _find_layers(model: nn.Module) -> tuple[list[tuple[nn.Module, str, nn.Module]], dict[str, nn.Module]]:
    """Every (parent, child name, layer) slot holding a convertible layer, and each layer once by its first name."""
    if _base_class(model) is not None:
        raise ValueError("the model is a single layer; wrap it in nn.Sequential to convert it")
    names: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, FeedbackLayer):
            raise ValueError(f"layer {name!r} is already a feedback layer; undo the first conversion")
        if isinstance(module, UNSUPPORTED) or (isinstance(module, (nn.Linear, nn.Conv2d))
                                               and _base_class(module) is None):
            raise ValueError(f"layer {name!r} ({type(module).__name__}) cannot be converted: feedback layers "
                             "replace nn.Linear and nn.Conv2d (and subclasses that keep their forward)")
        if _base_class(module) is not None:
            if isinstance(module.weight, nn.parameter.UninitializedParameter):
                raise ValueError(f"layer {name!r} is lazy and not initialised yet; run one forward pass first")
            names[name] = module
    slots = [(parent, child_name, child) for parent in model.modules()
             for child_name, child in parent.named_children() if _base_class(child) is not None]
    return slots, names


def _base_class(module: nn.Module) -> type | None:
    """nn.Linear or nn.Conv2d when `module` is one (or a subclass using its forward), else None."""
    for base in FEEDBACK_CLASSES:
        if isinstance(module, base) and type(module).forward is base.forward:
            return base
    return None


def _clone_as(layer: nn.Module, cls: type) -> nn.Module:
    """A new `cls` object with the layer's attributes and the very same Parameter objects. Containers (parameter,
    buffer, hook dicts) are copied so registering on the clone leaves the original untouched."""
    clone = cls.__new__(cls)
    clone.__dict__.update({key: copy.copy(value) if isinstance(value, (dict, set, list)) else value
                           for key, value in layer.__dict__.items()})
    return clone


def _shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the module structure whose Parameters and buffers are the original tensors (no copies)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _int_padding(name: str, layer: nn.Conv2d) -> tuple[int, int]:
    if layer.padding_mode != "zeros":
        raise ValueError(f"layer {name!r}: feedback Conv2d supports padding_mode='zeros' only")
    if layer.padding == "valid":
        return (0, 0)
    if layer.padding == "same":
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        if any(t % 2 for t in totals):
            raise ValueError(f"layer {name!r}: padding='same' with an even kernel pads unevenly; use integers")
        return tuple(t // 2 for t in totals)
    return tuple(layer.padding)
