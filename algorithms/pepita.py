"""PEPITA (Dellaferrera & Kreiman, ICML 2022, "Error-driven Input Modulation: Solving the Credit Assignment Problem
without a Backward Pass", PMLR 162:4937-4955, arXiv:2201.11665; reference code: github.com/GiorgiaD/PEPITA, where
the rule is called ERIN).

No backward pass: a second forward pass on an input modulated by the output error replaces it. On the `mlp` model
(Linear -> activation blocks, then a Linear head), L layers, h_0 = x the flattened input [B, D], C classes:

* Standard pass: h_l = m_l * act(W_l h_(l-1) + b_l) for the hidden layers, logits z = W_L h_(L-1) + b_L, and the
  output error e = softmax(z) - onehot(y) [B, C]. m_l is the dropout mask (Bernoulli(1 - dropout) / (1 - dropout),
  one per example and hidden unit, the same in both passes: the reference code's rule).
* Modulated pass: the same network on x_mod = x + e F^T, F [D, C] fixed and random (the reference code's x + F e;
  F's distribution is symmetric, so the sign convention changes nothing), giving h_l^mod.
* Updates, averaged over the batch and handed to `torch.optim.SGD` (momentum) as the parameters' .grad:
      dW_l = (h_l - h_l^mod)^T h_(l-1)^mod / B,   db_l = mean_b (h_l - h_l^mod)      (hidden layers, l < L)
      dW_L = e^T h_(L-1)^mod / B,                  db_L = mean_b e                     (the head)
  and W <- W - lr dW (with momentum: torch's v = mu v + dW, W -= lr v, the paper's v = mu v + lr dW, W -= v for a
  constant rate). The paper's networks have no biases; ours (nn.Linear) do, and a bias is a weight on an input that
  is 1 in both passes (the error never reaches it), so it follows the same rule with h_(l-1)^mod = 1.
  The head uses the standard pass's error e as Algorithm 1 writes it; the reference code uses the modulated pass's
  output error there (softmax(z^mod) - onehot(y)), which differs from e by the small change F's modulation makes.

Published figures (Dellaferrera & Kreiman 2022, the fully connected results table: one hidden layer of 1024 ReLU
units, no biases, dropout 10%, 100 epochs, mean +- std over runs): test accuracy MNIST 98.01 +- 0.09 %, CIFAR-10
52.57 +- 0.36 %, CIFAR-100 24.91 +- 0.22 % (quoted from the paper as recalled: the PDF could not be opened here).
The paper has no Fashion-MNIST figure. The reference notebook (Tutorial_PEPITA_FullyConnectedNets_CIFAR-10.ipynb,
these defaults) ends at 52.58 % on CIFAR-10 after 100 epochs. The follow-up (Srinivasan et al., ICLR 2024,
arXiv:2302.05440; github.com/ravifrancesco/PEPITA) trains 2 and 3 hidden layers and draws F with the bound
0.05 sqrt(6 / C) instead (C = classes; f_scale = 0.05 sqrt(D / C) here, 0.44 for MNIST).

On MNIST here (55,000 training images, one core, batch 64, the defaults unless named; train CPU seconds, the
evaluation excluded): 784-1024-1024-10 97.0 % test accuracy after 39 epochs (501 s), 97.35 % after 68 (904 s);
with f_scale 0.1, 97.0 % after 21 epochs (267 s), 97.57 % after 68; f_scale 0.2 diverges. 784-1024-10 (the paper's
net) reaches 97.27 % after the full 100-epoch schedule (636 s); with the reference MNIST rate lr 0.1, 97.1 % after 7
epochs (44 s) and 97.89 % after 100 (641 s), near the paper's 98.01 %.

Defaults are the paper's (the CIFAR-10 notebook): batch 64, SGD with momentum 0.9, lr 0.01 divided by 10 at
epochs 60 and 90 (of 100); `decay_epochs` are turned into steps with the training-set size (steps = epochs *
n_train / batch_size), so a budget under 60 epochs sees only the constant phase. The reference code's MNIST
command uses lr 0.1 (`main.py --eta 0.1`). Weights He-uniform, U(+-sqrt(6 / fan_in)), biases 0
(`init = "he_uniform"`, drawn from the run's generator; `init = "model"` keeps the model's own initialisation);
F uniform in +-f_scale sqrt(6 / D), f_scale = 0.05 (both reference codes: He-uniform scaled by 0.05).

Pseudo-gradient (for the attacks). PEPITA's only route from the error to the input is F: the modulated pass moves
the input by e F^T, and the first layer learns to answer x as it answered x + e F^T (h_1 moves toward h_1^mod), so
the rule treats e F^T as the loss-lowering input change. `pseudo_gradient_model()` is the trained model with that
view as its input gradient: dL/dx := -(dL/dz) F^T, which is -e F^T for the cross-entropy loss (dL/dz = e). It is to
PEPITA what the feedback weights' backward is to FA: the gradient an attacker who trusts the rule would follow
(`robustness.pseudo_gradient`). Measured on MNIST (784-256-256-10, the defaults): the median cosine between e F^T
and the true dL/dx goes from 0.00 at initialisation to -0.10, -0.13, -0.16 after epochs 1, 2, 3.

Cost per step (B examples, layer widths n_0 = D, n_1, ..., n_L = C, P trained parameters): forward_passes = 2B,
backward_passes = 0. extra_flops, by `learnbench.cost`'s rule (an elementwise operation 1 FLOP, a multiply-add 2):
  B C                               the error e = softmax(z) - onehot (softmax's elementwise work is not counted,
                                    as FlopCounterMode does not count it in the model either)
  2 B D C + B D                     the projection e F^T and its addition to x
  sum_l (2 B n_l n_(l-1) + B n_l)   the updates' outer products (delta^T h^mod) and bias sums, every layer
  sum_(l<L) B n_l                   the differences h_l - h_l^mod, hidden layers
  sum_(l<L) 4 B n_l                 dropout, when on: draw, scale, and one multiply in each pass
  P                                 the division by B
  + the optimizer (`learnbench.cost.optimizer_flops`: SGD with momentum 4 P, without 2 P).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnbench.cost import optimizer_flops
from learnbench.models import ACTIVATIONS, MLP
from learnbench.search_space import Dimension, LogUniform, Uniform
from learnbench.spec import Batch, StepStats, TaskInfo

INITS = ("he_uniform", "model")
_ACTIVATION_TYPES = tuple(factory for factory in ACTIVATIONS.values() if isinstance(factory, type))

Layer = tuple[nn.Linear, "nn.Module | None"]  # a Linear and the activation after it (None for the head)


# --- pure helpers: the model's layers, F, the initialisation, the rule, the cost ---------------------------------

def linear_layers(model: nn.Module) -> list[Layer]:
    """The built-in `mlp` as (Linear, activation) pairs, the head last with None. ValueError for anything else:
    PEPITA's rule is defined on a plain stack of fully connected layers with elementwise activations."""
    if not isinstance(model, MLP) or model.residual:
        raise ValueError(f"pepita trains the built-in mlp model only (Linear -> activation blocks); got "
                         f"{'a resmlp' if isinstance(model, MLP) else type(model).__name__}")
    layers: list[Layer] = []
    for i, block in enumerate(model.blocks):
        parts = list(block)
        if not isinstance(parts[0], nn.Linear) or len(parts) > 2 or not all(
                isinstance(m, _ACTIVATION_TYPES) for m in parts[1:]):
            raise ValueError(f"pepita needs every hidden block to be Linear -> activation (no norm); block {i} is "
                             f"{' -> '.join(type(m).__name__ for m in parts)}")
        layers.append((parts[0], parts[1] if len(parts) == 2 else None))
    return [*layers, (model.head, None)]


def projection_matrix(n_inputs: int, n_classes: int, f_scale: float, generator: torch.Generator,
                      device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """F [D, C], entries uniform in +-f_scale * sqrt(6 / D): He-uniform for fan-in D, scaled by f_scale."""
    bound = f_scale * math.sqrt(6.0 / n_inputs)
    return (torch.rand(n_inputs, n_classes, generator=generator, device=device, dtype=dtype) * 2 - 1) * bound


@torch.no_grad()
def he_uniform_(layers: list[Layer], generator: torch.Generator) -> None:
    """Weights U(+-sqrt(6 / fan_in)) from `generator`, layer by layer; biases 0 (the paper's nets have none)."""
    for linear, _ in layers:
        bound = math.sqrt(6.0 / linear.in_features)
        w = torch.rand(linear.weight.shape, generator=generator, device=linear.weight.device,
                       dtype=linear.weight.dtype)
        linear.weight.copy_((w * 2 - 1) * bound)
        if linear.bias is not None:
            linear.bias.zero_()


def forward_pass(layers: list[Layer], x: Tensor, masks: list[Tensor] | None) -> list[Tensor]:
    """[h_0 = x, h_1, ..., h_(L-1), z]: every layer's output, hidden ones after activation and dropout mask."""
    hs = [x]
    for i, (linear, act) in enumerate(layers):
        h = linear(hs[-1])
        if i < len(layers) - 1:
            h = act(h) if act is not None else h
            h = h * masks[i] if masks is not None else h
        hs.append(h)
    return hs


@torch.no_grad()
def pepita_updates(layers: list[Layer], x: Tensor, y: Tensor, projection: Tensor,
                   masks: list[Tensor] | None = None) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """PEPITA's (dW, db) per layer, averaged over the batch (module docstring), and the standard pass's logits.
    `x` [B, D] flattened inputs, `y` [B] labels, `projection` F [D, C], `masks` one [B, n_l] per hidden layer."""
    hs = forward_pass(layers, x, masks)
    e = torch.softmax(hs[-1], 1)
    e[torch.arange(len(y), device=y.device), y] -= 1  # softmax(z) - onehot(y) [B, C]
    hs_mod = forward_pass(layers, x + e @ projection.T, masks)  # x_mod = x + e F^T [B, D]
    n = x.shape[0]
    updates = []
    for i in range(len(layers)):
        delta = hs[i + 1] - hs_mod[i + 1] if i < len(layers) - 1 else e  # [B, n_l]
        updates.append((delta.T @ hs_mod[i] / n, delta.mean(0)))  # [n_l, n_(l-1)], [n_l]
    return updates, hs[-1]


def pepita_flops(widths: list[int], batch: int, dropout: bool) -> float:
    """FLOPs of one step outside the model's two forwards, optimizer excluded (module docstring); `widths` are
    [D, n_1, ..., C]."""
    d, c, hidden = widths[0], widths[-1], widths[1:-1]
    total = batch * c + 2 * batch * d * c + batch * d  # error, projection, modulated input
    total += sum(2 * batch * n_in * n_out + batch * n_out for n_in, n_out in zip(widths[:-1], widths[1:]))
    total += sum(batch * n for n in hidden) * (1 + (4 if dropout else 0))  # differences, dropout
    total += sum(n_in * n_out + n_out for n_in, n_out in zip(widths[:-1], widths[1:]))  # / B
    return float(total)


class _ErrorToInput(torch.autograd.Function):
    """Identity on the logits z [B, C]; the gradient it sends to the input x is -(dL/dz) F^T, reshaped to x."""

    @staticmethod
    def forward(ctx, x: Tensor, logits: Tensor, projection: Tensor) -> Tensor:
        ctx.save_for_backward(projection)
        ctx.input_shape = x.shape
        return logits.clone()

    @staticmethod
    def backward(ctx, grad_logits: Tensor) -> tuple[Tensor, None, None]:
        (projection,) = ctx.saved_tensors
        return -(grad_logits @ projection.T).reshape(ctx.input_shape), None, None  # [B, D] -> x's shape


class ErrorProjectionGradient(nn.Module):
    """The trained model seen through PEPITA's feedback F: logits = model(x); input gradient -(dL/dz) F^T."""

    uses_feedback_weights = True  # F plays the feedback weights' part (the pseudo-gradient attacks look for this)

    def __init__(self, model: nn.Module, projection: Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("projection", projection)  # F [D, C]

    def forward(self, x: Tensor) -> Tensor:
        return _ErrorToInput.apply(x, self.model(x.detach()), self.projection)


# --- the trainer ---------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Pepita:
    """PEPITA: a second forward pass on the error-modulated input replaces the backward pass."""

    name: ClassVar[str] = "pepita"
    supported_models: ClassVar[tuple[str, ...]] = ("mlp",)

    batch_size: int = 64
    """Examples per step (the paper: 64)."""
    lr: float = 0.01
    """SGD learning rate (the paper's CIFAR settings and notebook: 0.01; the reference MNIST command: 0.1)."""
    momentum: float = 0.9
    """SGD momentum coefficient (the paper: 0.9); 0 is plain SGD."""
    f_scale: float = 0.05
    """F's entries are uniform in +-f_scale * sqrt(6 / input size) (the reference code: 0.05)."""
    dropout: float = 0.1
    """Dropout rate of the hidden units, the same mask in both passes (the paper: 10%); 0 disables it."""
    decay_epochs: tuple[float, ...] = (60.0, 90.0)
    """Epochs after which the learning rate is multiplied by `decay_gamma` (the paper: 60 and 90 of 100)."""
    decay_gamma: float = 0.1
    """Learning-rate factor at each of `decay_epochs` (the paper: 0.1)."""
    init: str = "he_uniform"
    """he_uniform (the paper's: weights U(+-sqrt(6 / fan_in)), biases 0) or model (the model's own init)."""

    search_space: ClassVar[dict[str, Dimension]] = {
        # A decade either side of the paper's 0.01; the reference MNIST command's 0.1 is the top.
        "lr": LogUniform(1e-3, 1e-1),
        # F's scale multiplies the hidden layers' effective step: the reference code's 0.05, a factor 4 below and 2
        # above. On MNIST with 784-1024-1024-10, 0.1 is stable for 68 epochs, while 0.2 diverged after ~8 epochs and
        # 0.44 (Srinivasan et al.'s bound) within one.
        "f_scale": LogUniform(0.0125, 0.1),
        "momentum": Uniform(0.0, 0.95),
    }

    def validate(self, task: TaskInfo | None = None) -> None:
        """Check hyper-parameter values; raises ValueError naming the bad one."""
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive; got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive; got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum}")
        if not self.f_scale > 0:
            raise ValueError(f"f_scale must be positive (0 leaves the hidden layers untrained); got {self.f_scale}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")
        epochs = list(self.decay_epochs)
        if any(not e > 0 for e in epochs) or epochs != sorted(epochs):
            raise ValueError(f"decay_epochs must be positive and increasing; got {self.decay_epochs}")
        if not 0 < self.decay_gamma <= 1:
            raise ValueError(f"decay_gamma must be in (0, 1]; got {self.decay_gamma}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}; got {self.init!r}")
        if task is not None and task.n_classes < 2:
            raise ValueError(f"pepita needs at least 2 classes; got {task.n_classes}")

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self.validate(task)
        self._model, self._generator = model.train(), generator
        self._layers = linear_layers(model)
        weight = self._layers[0][0].weight
        widths = [self._layers[0][0].in_features, *(linear.out_features for linear, _ in self._layers)]
        if widths[-1] != task.n_classes:
            raise ValueError(f"the model's head has {widths[-1]} outputs for {task.n_classes} classes")
        # F first, then the weights: both from the run's generator, in this order.
        self._projection = projection_matrix(widths[0], widths[-1], self.f_scale, generator, weight.device,
                                             weight.dtype)  # [D, C]
        if self.init == "he_uniform":
            he_uniform_(self._layers, generator)
        params = [p for linear, _ in self._layers for p in linear.parameters()]
        self._optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        steps_per_epoch = task.n_train / self.batch_size
        milestones = [max(1, round(e * steps_per_epoch)) for e in self.decay_epochs]
        self._scheduler = torch.optim.lr_scheduler.MultiStepLR(self._optimizer, milestones, self.decay_gamma)
        self._widths = widths
        self._optimizer_flops = optimizer_flops(self._optimizer)

    def step(self, batch: Batch) -> StepStats:
        x = batch.x.flatten(1)  # [B, D]
        n = x.shape[0]
        masks = self._dropout_masks(n, x.device, x.dtype) if self.dropout > 0 else None
        updates, logits = pepita_updates(self._layers, x, batch.y, self._projection, masks)
        for (linear, _), (dw, db) in zip(self._layers, updates):
            linear.weight.grad, linear.bias.grad = dw, db
        lr = self._optimizer.param_groups[0]["lr"]  # this update's rate: lr * decay_gamma^(milestones passed)
        self._optimizer.step()
        self._scheduler.step()
        loss = F.cross_entropy(logits, batch.y)  # the standard pass's, for monitoring only
        extra = pepita_flops(self._widths, n, self.dropout > 0) + self._optimizer_flops
        return StepStats(loss=loss, forward_passes=2 * n, backward_passes=0, extra_flops=extra, metrics={"lr": lr})

    def _dropout_masks(self, n: int, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
        """One inverted-dropout mask [B, n_l] per hidden layer, drawn in layer order from the run's generator."""
        keep = 1.0 - self.dropout
        return [torch.empty(n, width, device=device, dtype=dtype).bernoulli_(keep, generator=self._generator) / keep
                for width in self._widths[1:-1]]

    def eval_model(self) -> nn.Module:
        return self._model

    def pseudo_gradient_model(self) -> nn.Module:
        """The model whose input gradient is PEPITA's own, -e F^T (module docstring), for pseudo-gradient attacks."""
        return ErrorProjectionGradient(self._model, self._projection)
