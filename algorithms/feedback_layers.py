"""Feedback layers: `Linear` and `Conv2d` whose backward pass sends the error through feedback weights.

`convert(model, rule, generator, ...)` swaps every `nn.Linear` / `nn.Conv2d` of a model, in place, for a
`FeedbackLinear` / `FeedbackConv2d` that holds the *same* `Parameter`s, so the forward pass is the original one
(the autograd functions call `F.linear` and the layer's own `Conv2d._conv_forward`), bit for bit. Only the error
sent to the layer's input changes; the weight and bias gradients are the usual local ones (`delta x^T`):

| rule   | error sent to the input, with `g` the gradient at the layer's output   | feedback weights             |
| ------ | ---------------------------------------------------------------------- | ---------------------------- |
| `fa`   | `g B`, with B fixed and random, shaped like W (Lillicrap et al. 2016)   | buffer `weight_feedback`     |
| `kp`   | `g B`, B given W's updates, both decaying (Akrout et al. 2019):        | buffer: B0 - W0              |
|        | kept as B = W + c (B0 - W0), see below                                 |                              |
| `sign` | `g sign(W) s`, recomputed at every backward (Liao et al. 2016)          | none (from W)                |
| `dfa`  | `e B`: the *output* error `e` [N, C] projected straight to the input    | buffer [C, input numel]      |
|        | (Nøkland 2016); autograd then applies the preceding layers' f'(a)      |                              |

Kolen-Pollack gives B exactly the update W receives (whatever the optimizer does) and decays both by
k = 1 - lr * decay per step, so B - W is only ever multiplied by k: B_t = W_t + c_t (B_0 - W_0), c_t the product of
the k's. The layer stores B_0 - W_0 and c (`mismatch_scale`, kept by the trainer) and forms B when a backward needs
it: the same matrices as updating a stored B, without applying every update twice (the tests check the two agree).

Attaching DFA's matrix to the *consumer* of a hidden activation lets autograd multiply by the derivative of whatever
lies between two layers (activation, norm, pooling, skip connection), so no model code is copied. `e` is the gradient
at the model's output, caught by a forward hook on the model (it is the first gradient of every backward pass).

The pseudo-gradient: the converted model's input gradient (`x.requires_grad_(); loss.backward()`) is what the
feedback pathway delivers to the pixels: `g B` of the first layer for fa/kp/sign, and for DFA `e B_0`, a fixed
random projection of the output error into input space (as BioTorch's DFA produces), which knows nothing about the
input-output map. `Conversion.plain` is a view of the model without feedback layers, sharing every parameter and
buffer, whose backward is the true gradient: trainers return it from `eval_model()`.

Norm layers' affine parameters are trained by their own (local) gradients. Layers that move weights in ways this
module cannot redirect (Conv1d/3d, transposed convs, attention, RNNs, Linear/Conv2d subclasses with their own
forward) are refused with a ValueError rather than silently trained by backprop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import copy
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from learnbench.algorithms.backprop import Backprop
from learnbench.spec import TaskInfo

RULES = ("fa", "kp", "sign", "dfa")
INITS = ("normal", "xavier", "kaiming")
UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear,
               nn.MultiheadAttention, nn.RNNBase)


class ErrorHub:
    """DFA's broadcast of the output error: the model's forward hook arms it, the output's gradient fills it."""

    def __init__(self) -> None:
        self.error: Tensor | None = None  # [N, C] gradient of the loss w.r.t. the model output

    def capture(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.error = None  # never reuse an error from an earlier pass
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(self._store)

    def _store(self, grad: Tensor) -> None:
        self.error = grad.detach().flatten(1)


class _LinearFn(torch.autograd.Function):
    """F.linear forward; backward sends the error to the input through the layer's feedback pathway."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | None, layer: nn.Module):
        ctx.layer = layer
        ctx.save_for_backward(x, weight, feedback)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # grad_out [..., out]
        x, weight, feedback = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        layer, grad_x, grad_w, grad_b = ctx.layer, None, None, None
        dtype = grad_out.dtype  # bfloat16 under autocast: x and W were cast inside F.linear, not saved cast
        if need_x:
            grad_x = (layer.direct_error(x, feedback) if layer.feedback_rule == "dfa"
                      else grad_out @ layer.backward_matrix(weight, feedback).to(dtype))  # [..., in]
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out]
        if need_w:
            grad_w = g2.T @ x.reshape(-1, x.shape[-1]).to(dtype)  # [out, in]: the local delta x^T, as backprop's
        if need_b:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None, None


class _Conv2dFn(torch.autograd.Function):
    """The layer's own conv forward; backward is aten's convolution_backward with B in place of W."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | None, layer: nn.Module):
        ctx.layer = layer
        ctx.save_for_backward(x, weight, feedback)
        return layer._conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # grad_out [N, C_out, H', W']
        x, weight, feedback = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        layer = ctx.layer
        routed = need_x and layer.feedback_rule != "dfa"
        matrix = layer.backward_matrix(weight, feedback) if routed else weight
        dtype = grad_out.dtype  # bfloat16 under autocast (see _LinearFn)
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x.to(dtype), matrix.to(dtype), [weight.shape[0]] if need_b else None, layer.stride,
            layer.int_padding, layer.dilation, False, [0, 0], layer.groups, [routed, need_w, need_b])
        if need_x and not routed:
            grad_x = layer.direct_error(x, feedback)
        return grad_x, grad_w, grad_b, None, None


class _FeedbackMixin:
    """What the two feedback layers share: the rule, the feedback matrix, DFA's projection."""

    uses_feedback_weights: ClassVar[bool] = True
    """Marks layers whose backward is not the true gradient (the attacks run pseudo-gradient PGD on such models)."""

    feedback_rule: str
    sign_scale: float
    """sign: the factor on sign(W)."""
    mismatch_scale: float
    """kp: c in B = W + c (B0 - W0)."""
    error_hub: ErrorHub | None

    def backward_matrix(self, weight: Tensor, feedback: Tensor | None) -> Tensor:
        """The matrix the error is multiplied by on its way to the input, shaped like W (DFA: [C, input size])."""
        if self.feedback_rule == "sign":
            return torch.sign(weight).mul_(self.sign_scale)
        if self.feedback_rule == "kp":
            return torch.add(weight, feedback, alpha=self.mismatch_scale)
        return feedback

    def feedback_matrix(self) -> Tensor:
        """B as the next backward pass will use it (for diagnostics and tests)."""
        return self.backward_matrix(self.weight.detach(), self.weight_feedback)

    def direct_error(self, x: Tensor, feedback: Tensor) -> Tensor:
        """DFA: the output error of this backward pass projected into this layer's input space."""
        error = self.error_hub.error
        if error is None:
            raise RuntimeError("DFA backward found no output error: backward must start from the model's output")
        return (error.to(feedback.dtype) @ feedback).view(x.shape).to(x.dtype)  # [N, C] @ [C, n] -> x's shape

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feedback={self.feedback_rule}"


class FeedbackLinear(_FeedbackMixin, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        if not x.requires_grad:  # no error leaves this layer (the first one, in training): backprop's own backward
            return F.linear(x, self.weight, self.bias)  # computes the same local W and b gradients, in C++
        return _LinearFn.apply(x, self.weight, self.bias, self.weight_feedback, self)


class FeedbackConv2d(_FeedbackMixin, nn.Conv2d):
    int_padding: tuple[int, int]
    """Symmetric integer padding equal to the layer's (possibly 'same'/'valid') padding, for the backward."""

    def forward(self, x: Tensor) -> Tensor:
        if not x.requires_grad:  # as in FeedbackLinear
            return self._conv_forward(x, self.weight, self.bias)
        return _Conv2dFn.apply(x, self.weight, self.bias, self.weight_feedback, self)


FEEDBACK_CLASSES = {nn.Linear: FeedbackLinear, nn.Conv2d: FeedbackConv2d}


@dataclass(eq=False)
class Conversion:
    """The result of `convert`: the model (changed in place), its plain view, and the way back."""

    model: nn.Module
    """The training model: the same object that was converted, now holding feedback layers."""
    plain: nn.Module
    """A structural copy without feedback layers that shares every Parameter and buffer: true gradients."""
    layers: dict[str, nn.Module]
    """Qualified name -> feedback layer, in module order."""
    _slots: list[tuple[nn.Module, str, nn.Module]] = field(repr=False)
    _hook: RemovableHandle | None = field(default=None, repr=False)

    def undo(self) -> nn.Module:
        """Put the original layer objects back (their Parameters were trained in place) and drop the DFA hook."""
        for parent, child_name, original in self._slots:
            setattr(parent, child_name, original)
        if self._hook is not None:
            self._hook.remove()
        return self.model


def convert(model: nn.Module, rule: str, generator: torch.Generator, *, init: str = "normal",
            sign_scale: bool = True, input_shape: tuple[int, ...] | None = None) -> Conversion:
    """Swap `model`'s Linear/Conv2d layers in place for feedback layers following `rule` (one of RULES).

    Feedback weights are drawn from `generator` in module order with `init` (see `feedback_weights`). DFA needs
    `input_shape` (one example, no batch dimension) to size its matrices with one forward pass in eval mode."""
    if rule not in RULES:
        raise ValueError(f"feedback rule must be one of {RULES}; got {rule!r}")
    if init not in INITS:
        raise ValueError(f"feedback init must be one of {INITS}; got {init!r}")
    slots, names = _find_layers(model)
    shapes, n_out = _dfa_shapes(model, names, input_shape) if rule == "dfa" else ({}, 0)
    plain = _shared_copy(model)
    hub = ErrorHub() if rule == "dfa" else None
    clones: dict[int, nn.Module] = {}
    for name, layer in names.items():
        # DFA's matrix maps the output error [N, C] to this layer's input; the others are shaped like W
        shape = (n_out, math.prod(shapes[name])) if rule == "dfa" else tuple(layer.weight.shape)
        feedback = None if rule == "sign" else feedback_weights(shape, init, generator).to(layer.weight)
        clones[id(layer)] = _feedback_layer(name, layer, rule, feedback, sign_scale, hub)
    for parent, child_name, layer in slots:
        setattr(parent, child_name, clones[id(layer)])
    hook = model.register_forward_hook(hub.capture) if hub is not None else None
    return Conversion(model, plain, {name: clones[id(m)] for name, m in names.items()}, slots, hook)


def _feedback_layer(name: str, layer: nn.Module, rule: str, feedback: Tensor | None, sign_scale: bool,
                    hub: ErrorHub | None) -> nn.Module:
    """The feedback version of `layer`, holding the same Parameters."""
    clone = _clone_as(layer, FEEDBACK_CLASSES[_base_class(layer)])
    clone.feedback_rule, clone.error_hub = rule, hub
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
    clone.sign_scale = math.sqrt(2.0 / (fan_in + fan_out)) if sign_scale else 1.0
    if isinstance(clone, nn.Conv2d):
        clone.int_padding = _int_padding(name, layer)
    if rule == "kp":  # store B0 - W0; B = W + c (B0 - W0)
        feedback, clone.mismatch_scale = feedback - layer.weight.detach(), 1.0
    clone.register_buffer("weight_feedback", feedback)
    return clone


@torch.no_grad()
def set_feedback_to_weights(conversion: Conversion) -> None:
    """Make every layer's B equal W (B = W^T in the papers' notation): the backward becomes backprop's. For tests."""
    for layer in conversion.layers.values():
        if layer.feedback_rule == "kp":
            layer.weight_feedback.zero_()
        elif layer.feedback_rule != "sign":
            layer.weight_feedback.copy_(layer.weight)


def feedback_weights(shape: tuple[int, ...], init: str, generator: torch.Generator) -> Tensor:
    """Random feedback weights (fan-in/out as torch computes them for a weight of this shape):

    * `normal`  N(0, 1/(fan_in + fan_out)), the feedback of Akrout et al.'s reference code (FCNN_FA.py, FCNN_KP.py);
    * `xavier`  U(+-sqrt(6/(fan_in + fan_out))), Glorot & Bengio 2010, BioTorch's default;
    * `kaiming` U(+-1/sqrt(fan_in)), the distribution torch draws Linear/Conv2d weights from."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(torch.empty(shape, device="meta"))
    if init == "normal":
        return torch.randn(shape, generator=generator, device=generator.device) / math.sqrt(fan_in + fan_out)
    bound = math.sqrt(6.0 / (fan_in + fan_out)) if init == "xavier" else 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator, device=generator.device) * 2 - 1) * bound


class FeedbackTrainer(Backprop, ABC):
    """Backprop's optimizer, schedule and step on a converted model; subclasses say how to convert.

    `setup` converts the model in place, then builds backprop's optimizer and schedule; `eval_model` is the plain
    view (true gradients for evaluation and attacks)."""

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self.validate(task)
        self._conversion = self.convert_model(model, task, generator)
        super().setup(model, task, generator)

    @abstractmethod
    def convert_model(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> Conversion:
        """Convert `model` in place for this trainer's rule and return the conversion."""

    def eval_model(self) -> nn.Module:
        return self._conversion.plain

    @property
    def conversion(self) -> Conversion:
        """The converted model's layers (name -> feedback layer), plain view and `undo`."""
        return self._conversion


def _find_layers(model: nn.Module) -> tuple[list[tuple[nn.Module, str, nn.Module]], dict[str, nn.Module]]:
    """Every (parent, child name, layer) slot holding a convertible layer, and each layer once by its first name."""
    if _base_class(model) is not None:
        raise ValueError("the model is a single layer; wrap it in nn.Sequential to convert it")
    names: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, _FeedbackMixin):
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


@torch.no_grad()
def _dfa_shapes(model: nn.Module, names: dict[str, nn.Module],
                input_shape: tuple[int, ...] | None) -> tuple[dict[str, torch.Size], int]:
    """Each layer's input shape (one example) and the output size, from one eval-mode forward of two zero inputs."""
    if input_shape is None:
        raise ValueError("DFA needs the input shape to size its feedback matrices")
    shapes: dict[str, torch.Size] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: shapes.__setitem__(name, args[0].shape[1:]))
             for name, m in names.items()]
    modes = {m: m.training for m in model.modules()}
    device = next(model.parameters()).device
    try:
        n_out = model.eval()(torch.zeros(2, *input_shape, device=device))[0].numel()
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes.items():
            module.training = mode
    missing = [name for name in names if name not in shapes]
    if missing:
        raise ValueError(f"DFA: layers {missing} are not used by the model's forward pass")
    return shapes, n_out
