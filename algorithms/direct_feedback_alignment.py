"""Direct feedback alignment (Nøkland 2016, "Direct Feedback Alignment Provides Learning in Deep Neural
Networks", NeurIPS 2016).

The output error e = dL/d(logits) [N, C] is sent straight to every hidden layer through a fixed random matrix:
the error reaching a layer's input is `e B` (B [C, input size]) instead of the backpropagated one, and autograd
multiplies it by the derivative of whatever lies between that input and the previous layer (activation, norm,
pooling, skip connection), so no model code is copied: attaching the matrix to the *consumer* of a hidden
activation is what makes that work. The output layer's update is the true one. No error travels layer to layer,
so with one hidden layer DFA is FA with the output layer's feedback matrix.

`DirectFeedbackAlignmentRule` is the whole rule: it sizes each layer's matrix with one eval-mode forward pass
(`prepare`), catches e with a forward hook on the model that hooks the output's gradient (the first gradient of
every backward pass), and computes each layer's input error from it (`input_error`). Optimizer, schedule and step
are backprop's (`feedback_training`).

The pseudo-gradient this model's backward produces at its input is `e B_0`: the output error projected into input
space by the first layer's random matrix (as BioTorch's DFA produces), which knows nothing about the input-output
map. Evaluation and the real attacks use the plain model; the output error is caught per backward pass, so nothing
of training is reused at evaluation. DFA's matrices map the output error, not a layer's own, so it has no B shaped
like W (`feedback_matrix()` is None and the alignment probe reports no B-W angle).

Defaults: backprop's Adam settings and B ~ N(0, 1/(C + input size)), the same rule as the fa trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from learnbench.algorithms.backprop import Backprop
from learnbench.algorithms.feedback_layers import INITS, FeedbackRule, check_init, feedback_weights
from learnbench.algorithms.feedback_training import train_with_rule
from learnbench.search_space import Choice, Dimension
from learnbench.spec import TaskInfo


@dataclass(eq=False)
class DirectFeedbackAlignmentRule(FeedbackRule):
    """Each layer's input error is the model's output error through a fixed random matrix [C, input numel]."""

    init: str = "normal"
    """Distribution of the matrices (`feedback_layers.feedback_weights`): normal, xavier or kaiming."""
    error: Tensor | None = field(default=None, init=False, repr=False)
    """[N, C] gradient of the loss w.r.t. the model output in the running backward pass (None outside one)."""
    _shapes: dict[str, torch.Size] = field(default_factory=dict, init=False, repr=False)
    _n_out: int = field(default=0, init=False, repr=False)

    def prepare(self, model: nn.Module, layers: dict[str, nn.Module], input_shape: tuple[int, ...] | None) -> None:
        self._shapes, self._n_out = _input_shapes(model, layers, input_shape)

    def make_feedback(self, name: str, layer: nn.Module, generator: torch.Generator) -> Tensor:
        shape = (self._n_out, math.prod(self._shapes[name]))  # maps the output error [N, C] to the layer's input
        return feedback_weights(shape, self.init, generator).to(layer.weight)

    def attach(self, model: nn.Module, layers: dict[str, nn.Module]) -> list[RemovableHandle]:
        return [model.register_forward_hook(self._capture)]

    def backward_matrix(self, layer: nn.Module, weight: Tensor) -> None:
        return None  # the error does not come through the layer's output gradient: see input_error

    def input_error(self, layer: nn.Module, grad_out: Tensor, x: Tensor) -> Tensor:
        if self.error is None:
            raise RuntimeError("DFA backward found no output error: backward must start from the model's output")
        feedback = layer.weight_feedback
        return (self.error.to(feedback.dtype) @ feedback).view(x.shape).to(x.dtype)  # [N, C] @ [C, n] -> x's shape

    def _capture(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.error = None  # never reuse an error from an earlier pass
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(self._store)

    def _store(self, grad: Tensor) -> None:
        self.error = grad.detach().flatten(1)


@torch.no_grad()
def _input_shapes(model: nn.Module, layers: dict[str, nn.Module],
                  input_shape: tuple[int, ...] | None) -> tuple[dict[str, torch.Size], int]:
    """Each layer's input shape (one example) and the output size, from one eval-mode forward of two zero inputs."""
    if input_shape is None:
        raise ValueError("DFA needs the input shape to size its feedback matrices")
    shapes: dict[str, torch.Size] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: shapes.__setitem__(name, args[0].shape[1:]))
             for name, m in layers.items()]
    modes = {m: m.training for m in model.modules()}
    device = next(model.parameters()).device
    try:
        n_out = model.eval()(torch.zeros(2, *input_shape, device=device))[0].numel()
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes.items():
            module.training = mode
    missing = [name for name in layers if name not in shapes]
    if missing:
        raise ValueError(f"DFA: layers {missing} are not used by the model's forward pass")
    return shapes, n_out


@dataclass(eq=False)
class DirectFeedbackAlignment(Backprop):
    """Minibatch training with the output error projected to each layer by fixed random matrices (DFA)."""

    name: ClassVar[str] = "dfa"
    true_gradient: ClassVar[bool] = False  # its backward sends feedback-weight errors: no K-FAC

    feedback_init: str = "normal"
    """Distribution of the matrices: normal N(0, 1/(C + input size)) (as fa), xavier, kaiming."""

    # backprop's ranges for the shared optimizer (AlgoPerf's Adam learning rates; see Backprop.search_space), plus the
    # matrices' distribution.
    search_space: ClassVar[dict[str, Dimension]] = {
        **Backprop.search_space,
        # Every distribution feedback_layers offers: Akrout et al.'s normal and torch's two weight initialisations
        # (under Adam only their shape counts, not their scale: see the module docstring of feedback_alignment).
        "feedback_init": Choice(INITS),
    }

    def validate(self, task: TaskInfo) -> None:
        super().validate(task)
        check_init(self.feedback_init)

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self.validate(task)
        rule = DirectFeedbackAlignmentRule(self.feedback_init)
        self.conversion = train_with_rule(self, rule, model, task, generator)
