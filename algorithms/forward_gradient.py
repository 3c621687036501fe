"""Forward gradient: weight perturbation (Baydin, Pearlmutter, Syme, Wood & Torr 2022, "Gradients without
Backpropagation", arXiv:2202.08587) and activity perturbation with local greedy losses (Ren, Kornblith, Liao &
Hinton, ICLR 2023, "Scaling Forward Gradient with Local Losses", arXiv:2210.03310; code:
github.com/google-research/google-research/tree/master/local_forward_gradient).

No backward pass through the model: every update comes from directional derivatives computed by forward-mode AD
(`torch.func.jvp`), each an exact dot product of a gradient with a random tangent.

`perturb = "weights"` (FG-W, Baydin et al.; any model): draw v ~ N(0, I) over all trainable parameters, get
d = grad f . v for the minibatch loss f from one jvp over `torch.func.functional_call`, and hand g = d v to the
optimizer as the gradient. E[g] = E[v v^T] grad f = grad f. `directions = K` averages K tangents (one vmapped jvp).

`perturb = "activations"` (LG-FG-A, Ren et al.'s "local greedy, activity-perturbed"; the built-in `mlp` and
`resmlp`): every hidden block l (Linear -> [norm] -> activation, plus its skip in a resmlp) gets its own local
classifier head (a Linear from the block's output to the classes) and its own cross-entropy L_l; the block's input
is detached (stop-gradient between blocks). For each example b a tangent u_b ~ N(0, I) is put on the block's
pre-activations z_b = W x_b + b (the Linear's output), one jvp of the per-example local losses gives
d_b = dL_l,b/dz_b . u_b, and (Ren et al. eq. 3)

    dL_l/dW ~ 1/B sum_b (d_b u_b) x_b^T,    dL_l/db ~ 1/B sum_b d_b u_b

each unbiased, since E[u u^T] = I and the tangents are independent across examples (Ren et al.'s "independent"
perturbation, Table 1). With a ReLU straight after the Linear, inactive units are not perturbed (Ren et al. 3.6:
their true gradient is zero, so the estimate stays unbiased with less variance). The local heads and the model's
own last layer (trained on the detached last hidden output by its own cross-entropy, the loss `step` reports) get
their exact gradients, as in the reference code (`local_classif_grad`, `global_classif_grad`): a head is one
Linear layer, so this needs no backward through the network. The heads are trainer state; `eval_model()` is the
plain model. What we take from Ren et al.: activity perturbation, blockwise local losses with stop-gradient,
per-example tangents, ReLU sparsity, several tangents averaged (their `num_passes`). What we do not: the LocalMixer
architecture (token mixing, patches), patch-wise and channel-group-wise losses (an MLP has no patches, and groups
would change the model's connectivity), layer norm before every Linear, feature aggregators, the contrastive loss.

Published MNIST figures. Ren et al. Table 3 (test / train error %, LocalMixer S/1/1: one block, 256 channels, 272K
parameters): BP 2.66 / 0.00, FG-W 9.25 / 8.93, FG-A 3.24 / 1.53, LG-FG-A 3.24 / 1.53 (one block: the local loss
is the global one); M/1/16 (512 channels, 16 groups): LG-FG-A 2.55 / 0.00, BP 2.41. Baydin et al. train an MLP
784-1024-1024-10 (ReLU) on MNIST with SGD, batch 64, lr 2e-4 decayed as lr e^(-k t), k = 1e-4 (the settings of
the paper's public reproduction, github.com/orobix/fwdgrad), and report training loss against time and iterations.

Defaults: Adam (Kingma & Ba 2015), lr 1e-3, batch 64, one tangent, activity perturbation. Neither paper states
its MNIST optimizer in the text we could retrieve; the reference code's ImageNet config is SGD with momentum 0.9,
lr 0.05, weight decay 1e-4, batch 256 (`configs/supervised.py`). For Baydin et al.'s weight perturbation pass
perturb="weights", optimizer="sgd", lr=2e-4, lr_decay=1e-4 (`lr = None` with sgd gives 2e-4).

Cost. Forward-mode AD carries a tangent beside every primal value; the tangent part of a Linear layer costs one
more matrix product per input that carries a tangent. Per step, B examples, K tangents, n parameters:

* weights: `forward_passes = B` (the primal, computed once for all K tangents) and `backward_passes = K B`: a
  tangent pass multiplies W' x + W x' in every layer (x' = 0 at the input), the matrix products a backward pass
  makes (dL/dW and, past the first layer, dL/dx), so each is charged as one backward. `extra_flops`:
  K n normals + 2 K n (g = 1/K sum_k d_k v_k) + the optimizer step (`learnbench.cost.optimizer_flops`). A model
  with BatchNorm pays B more forward passes: a transform may not write running statistics, so a plain forward
  updates them and the jvp normalises by the batch's statistics alone (`batch_statistics_only`).
* activations: `forward_passes = B` (the model's primal forward, head included), `backward_passes = 0`: no layer
  is differentiated backwards. The rest is declared in `extra_flops` (`activity_flops`), per hidden block of
  D inputs, H units, t modules after its Linear, C classes: K B H normals; K B (t H + 2 H C + 2 C) for the tangent
  passes (through the block's tail, 1 FLOP per unit and module, the local head and the cross-entropy); 4 B H C + B C
  for the local head's forward and exact gradient; 2 K B H for d u averaged over K (+ B H for the ReLU mask);
  2 B D H + B H + D H + H for the weight and bias estimates; plus 2 B H C + B C for the model head's gradient and the
  optimizer step over the model and the heads. Softmax's elementwise work is not counted, as FlopCounterMode does
  not count it in the model either.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from learnbench.cost import optimizer_flops
from learnbench.models import MLP
from learnbench.search_space import Choice, Dimension, LogUniform
from learnbench.spec import Batch, StepStats, TaskInfo

PERTURBATIONS = ("activations", "weights")
OPTIMIZERS = ("adam", "sgd", "momentum")
# lr = None: Adam's published default (Kingma & Ba 2015); for plain SGD Baydin et al.'s MNIST rate 2e-4 (weight
# perturbation, via github.com/orobix/fwdgrad); SGD with momentum 0.9 Ren et al.'s reference config, 0.05.
DEFAULT_LR = {"adam": 1e-3, "sgd": 2e-4, "momentum": 0.05}


@dataclass(eq=False)
class ForwardGradient:
    """Forward-gradient descent: weight-perturbed (Baydin et al.) or activity-perturbed with local losses (Ren et
    al.); no backward pass through the model."""

    name: ClassVar[str] = "forward-gradient"

    batch_size: int = 64
    """Examples per step (Baydin et al.: 64)."""
    perturb: str = "activations"
    """Where tangents go: activations (Ren et al.'s LG-FG-A; mlp and resmlp models) or weights (Baydin et al.)."""
    directions: int = 1
    """Tangents averaged per step (per example and block for activations); each is one jvp's tangent pass."""
    optimizer: str = "adam"
    """One of adam, sgd, momentum (SGD with `momentum`)."""
    lr: float | None = None
    """Learning rate; None takes the optimizer's default (DEFAULT_LR)."""
    momentum: float = 0.9
    """Momentum coefficient of the `momentum` optimizer (Ren et al.'s reference config: 0.9)."""
    weight_decay: float = 0.0
    """L2 penalty added to the estimate by the optimizer (coupled, torch.optim's `weight_decay`)."""
    lr_decay: float = 0.0
    """Baydin et al.'s decay k: the learning rate after t steps is lr * exp(-k t); 0 keeps it constant."""

    search_space: ClassVar[dict[str, Dimension]] = {
        # A decade either side of Adam's default 1e-3 (AlgoPerf's Adam-family range, as backprop declares);
        # `adjust_search_space` moves it to the entry's optimizer.
        "lr": LogUniform(1e-4, 1e-2),
        # Ren et al. average several passes (`num_passes`); a tangent pass costs far less than the primal with
        # activity perturbation, so more directions are cheap there.
        "directions": Choice((1, 4, 16)),
    }

    @property
    def supported_models(self) -> tuple[str, ...] | None:
        """Model kinds this rule trains (checked before a suite runs): activity perturbation needs the built-in
        mlp or resmlp (Linear blocks it can perturb after); weight perturbation takes any model (None)."""
        return ("mlp", "resmlp") if self.perturb == "activations" else None

    @classmethod
    def adjust_search_space(cls, space: dict[str, Dimension], hparams: Mapping[str, Any]) -> dict[str, Dimension]:
        """The declared learning-rate range is for Adam; another optimizer's is scaled by the ratio of defaults."""
        scale = DEFAULT_LR.get(hparams.get("optimizer"), DEFAULT_LR["adam"]) / DEFAULT_LR["adam"]
        lr = space.get("lr")
        if isinstance(lr, LogUniform) and scale != 1:
            space["lr"] = LogUniform(lr.low * scale, lr.high * scale)
        return space

    def validate(self) -> None:
        """Check hyper-parameter values; raises ValueError naming the bad one."""
        if self.perturb not in PERTURBATIONS:
            raise ValueError(f"perturb must be one of {PERTURBATIONS}; got {self.perturb!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")
        if self.batch_size <= 0 or self.directions <= 0:
            raise ValueError(f"batch_size and directions must be positive; got {self.batch_size}, {self.directions}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive; got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum}")
        if self.weight_decay < 0 or self.lr_decay < 0:
            raise ValueError(f"weight_decay and lr_decay must be >= 0; got {self.weight_decay}, {self.lr_decay}")

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self.validate()
        self._model, self._generator = model.train(), generator
        self._params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self._heads: list[tuple[nn.Parameter, nn.Parameter]] = []
        self._batch_norms = [m for m in model.modules()
                             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if self.perturb == "activations":
            check_activity_model(model)
            # One local classifier per hidden block, initialised as nn.Linear is, from the trainer's generator.
            dtype = model.head.weight.dtype
            self._heads = [linear_head(block[0].out_features, task.n_classes, generator, task.device, dtype)
                           for block in model.blocks]
        trained = [*self._params.values(), *(p for head in self._heads for p in head)]
        self._optimizer = self._make_optimizer(trained)
        self._scheduler = (torch.optim.lr_scheduler.ExponentialLR(self._optimizer, math.exp(-self.lr_decay))
                           if self.lr_decay else None)
        self._optimizer_flops = optimizer_flops(self._optimizer)

    def _make_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        lr = self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=self.weight_decay)
        momentum = self.momentum if self.optimizer == "momentum" else 0.0
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=self.weight_decay)

    def step(self, batch: Batch) -> StepStats:
        if not self._model.training:  # the runner switched to eval mode for evaluation
            self._model.train()
        n = batch.y.shape[0]
        forward = n
        if self.perturb == "weights":
            loss = self._estimate_weights(batch)
            forward += n if self._batch_norms else 0  # the forward that updates BatchNorm's running statistics
            passes = {"backward_passes": self.directions * n}
            extra = 3 * self.directions * sum(p.numel() for p in self._params.values())
        else:
            loss = self._estimate_activations(batch)
            passes = {"backward_passes": 0}
            extra = activity_flops(self._model, self._heads[0][0].shape[0], n, self.directions)
        lr = self._optimizer.param_groups[0]["lr"]  # the rate this update applies: lr * exp(-lr_decay * t) at step t
        self._optimizer.step()
        if self._scheduler is not None:
            self._scheduler.step()
        return StepStats(loss=loss, forward_passes=forward, extra_flops=float(extra + self._optimizer_flops),
                         metrics={"lr": lr}, **passes)

    def _estimate_weights(self, batch: Batch) -> Tensor:
        """g = 1/K sum_k (grad f . v_k) v_k into every parameter's .grad; returns the minibatch loss."""
        primals = {name: p.detach() for name, p in self._params.items()}
        tangents = {name: torch.randn(self.directions, *p.shape, generator=self._generator, device=p.device,
                                      dtype=p.dtype)
                    for name, p in primals.items()}  # [K, *shape] per parameter
        if self._batch_norms:  # a transform may not write the running statistics: a plain forward updates them
            with torch.no_grad():
                self._model(batch.x)
        with batch_statistics_only(self._batch_norms):
            loss, d = directional_derivatives(self._model, primals, tangents, batch.x, batch.y)  # [], [K]
        for name, p in self._params.items():
            p.grad = torch.tensordot(d, tangents[name], dims=1) / self.directions
        return loss

    def _estimate_activations(self, batch: Batch) -> Tensor:
        """Every hidden block's local estimate into .grad, block by block (inputs detached); the heads' exact
        gradients likewise. Returns the model's own cross-entropy on the batch."""
        model, y = self._model, batch.y
        h = batch.x.flatten(1)  # [B, D] the block's (detached) input
        with torch.no_grad():
            for i, (block, head) in enumerate(zip(model.blocks, self._heads)):
                linear, tail = block[0], block[1:]
                skip = h if model.residual and i > 0 else None
                z = linear(h)  # [B, H] pre-activations, where the tangents go
                u = torch.randn(self.directions, *z.shape, generator=self._generator, device=z.device,
                                dtype=z.dtype)  # [K, B, H]
                out, d = local_directional_derivatives(z, tail, head, y, u, skip)  # [B, H], [K, B]
                grad_z = activity_estimate(d, u, z if relu_follows(tail) else None)  # [B, H]
                linear.weight.grad = grad_z.T @ h / h.shape[0]
                linear.bias.grad = grad_z.mean(0)
                exact_head_gradient(head, out, y)
                h = out
        return exact_head_gradient((model.head.weight, model.head.bias), h, y)

    def eval_model(self) -> nn.Module:
        return self._model


# --- estimators ------------------------------------------------------------------------------------------------

def directional_derivatives(model: nn.Module, params: dict[str, Tensor], tangents: dict[str, Tensor],
                            x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The minibatch cross-entropy f at `params` and d_k = grad f . v_k for each tangent `tangents[name][k]`,
    from forward-mode AD (one jvp, vmapped over the K tangents). Returns (f [], d [K])."""

    def loss(p: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    if next(iter(tangents.values())).shape[0] == 1:  # no vmap for one tangent: its overhead is measurable on CPU
        f, d = jvp(loss, (params,), ({name: t[0] for name, t in tangents.items()},))
        return f, d.reshape(1)
    f, d = vmap(lambda v: jvp(loss, (params,), (v,)), out_dims=(None, 0))(tangents)
    return f, d


def local_directional_derivatives(z: Tensor, tail: nn.Module, head: tuple[Tensor, Tensor], y: Tensor,
                                  u: Tensor, skip: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One block's local loss along activity tangents. `z` [B, H] pre-activations, `tail` what follows the Linear
    (norm, activation), `head` the local classifier (weight [C, H], bias [C]), `u` [K, B, H] tangents on z, `skip`
    the block input for a residual block. Returns the block output [B, H] and d [K, B] with
    d_kb = dCE_b/dz_b . u_kb, the per-example cross-entropies' directional derivatives (one jvp)."""
    k = u.shape[0]

    def local_losses(delta: Tensor) -> tuple[Tensor, Tensor]:
        out = tail(z + delta)  # [K, B, H]; the primal is the same for every k
        if skip is not None:
            out = out + skip
        logits = F.linear(out, *head)  # [K, B, C]
        return F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none").view(k, -1), out

    _, d, out = jvp(local_losses, (torch.zeros_like(u),), (u,), has_aux=True)
    return out[0], d


def activity_estimate(d: Tensor, u: Tensor, relu_input: Tensor | None = None) -> Tensor:
    """The forward-gradient estimate of every example's dL_b/dz_b [B, H]: 1/K sum_k d_kb u_kb, zero where a ReLU
    on `relu_input` is inactive (the true gradient is zero there, so this only removes variance)."""
    grad = torch.einsum("kb,kbh->bh", d, u) / d.shape[0]
    return grad * (relu_input > 0) if relu_input is not None else grad


def exact_head_gradient(head: tuple[Tensor, Tensor], h: Tensor, y: Tensor) -> Tensor:
    """A linear classifier's exact cross-entropy gradient on detached features `h` [B, H], into .grad (the heads
    are single Linear layers: this differentiates nothing below them). Returns the loss."""
    with torch.enable_grad():
        loss = F.cross_entropy(F.linear(h.detach(), *head), y)
        head[0].grad, head[1].grad = torch.autograd.grad(loss, head)
    return loss.detach()


# --- model checks and cost -------------------------------------------------------------------------------------

@contextmanager
def batch_statistics_only(batch_norms: list[nn.Module]) -> Iterator[None]:
    """BatchNorm layers in training mode normalise by the batch's statistics without writing their running ones
    (`track_running_stats = False` for the duration): the same forward, and nothing mutated inside a transform."""
    for m in batch_norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in batch_norms:
            m.track_running_stats = True


def check_activity_model(model: nn.Module) -> None:
    """ValueError unless activity perturbation applies: the built-in mlp/resmlp, at least one hidden block, each
    starting with its Linear, no BatchNorm (it mixes examples, so per-example tangents would miss its terms)."""
    if not isinstance(model, MLP):
        raise ValueError(f"perturb='activations' needs the built-in mlp or resmlp model (learnbench.models.MLP); "
                         f"got {type(model).__name__}: use perturb='weights' for other models")
    if not len(model.blocks) or not all(isinstance(b[0], nn.Linear) and b[0].bias is not None for b in model.blocks):
        raise ValueError("perturb='activations' needs at least one hidden layer, each a Linear with bias")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError("perturb='activations' cannot train a model with BatchNorm (it couples the examples); "
                         "use norm='layer' or 'none', or perturb='weights'")


def relu_follows(tail: nn.Module) -> bool:
    """True when the block's Linear feeds a ReLU directly (no norm between), so inactive units have zero gradient."""
    return len(tail) == 1 and isinstance(tail[0], nn.ReLU)


def linear_head(n_in: int, n_out: int, generator: torch.Generator, device: torch.device,
                dtype: torch.dtype = torch.float32) -> tuple[nn.Parameter, nn.Parameter]:
    """(weight [n_out, n_in], bias [n_out]) drawn as nn.Linear draws them, U(-1/sqrt(n_in), 1/sqrt(n_in)), but from
    `generator`."""
    bound = 1 / math.sqrt(n_in)

    def draw(*shape: int) -> nn.Parameter:
        return nn.Parameter((torch.rand(*shape, generator=generator, device=device, dtype=dtype) * 2 - 1) * bound)

    return draw(n_out, n_in), draw(n_out)


def activity_flops(model: MLP, n_classes: int, batch: int, directions: int) -> float:
    """FLOPs of one activity-perturbed step outside the model's forward, optimizer excluded (module docstring)."""
    b, k, c, total = batch, directions, n_classes, 0.0
    for block in model.blocks:
        d_in, h, t = block[0].in_features, block[0].out_features, len(block) - 1
        total += k * b * h  # normals
        total += k * b * (t * h + 2 * h * c + 2 * c)  # tangent passes: tail, local head, cross-entropy
        total += 4 * b * h * c + b * c  # local head: forward and exact gradient
        total += 2 * k * b * h + (b * h if relu_follows(block[1:]) else 0)  # 1/K sum_k d u, ReLU mask
        total += 2 * b * d_in * h + b * h + d_in * h + h  # grad_z^T x, bias sum, / B
    h_last = model.head.in_features
    return total + 2 * b * h_last * c + b * c  # the model head's exact gradient
