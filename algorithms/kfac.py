"""K-FAC: natural-gradient preconditioning through Kronecker-factored curvature (Martens & Grosse 2015; convolutions:
Grosse & Martens 2016), for `backprop`'s `optimizer = "kfac"`.

For a Linear layer with inputs a (plus a constant 1 for the bias) and output gradients g, the Fisher block of its
parameters [W | b] (out x in+1) is approximated by A (x) G with A = E[a a^T] ([in+1, in+1]) and G = E[g g^T]
([out, out]), the g's backpropagated from labels *sampled from the model's own predictive distribution* (the true
Fisher, not the empirical one). A Conv2d layer is the same with a = the unfolded input patches (KFC, "expand").

The Kronecker factors come from **curvlinops** (`KFACLinearOperator`, MC Fisher with one sample, weight and bias
together; its public `state_dict()` gives them). Weighed against the others (README, "Backprop's own variants"):
BackPACK's KFAC extension needs every module of the model `extend`-ed and a fully supported graph (our models'
functional flattening and the users' own factories break it); nngeometry's KFAC has had one release since 2023;
curvlinops (F. Dangel et al., maintained, on PyPI) hooks only the Linear/Conv2d layers of any model, supports both
layer kinds and the MC, type-2 and empirical Fishers, and is tested against exact curvature. What is ours: the
running averages, the damping, the inverse and the update.

Every `factor_every` steps the factors of the current batch (one more forward and one backward of B examples,
counted as example-passes; C backwards with `fisher = "type-2"`, the exact expectation over the C labels) enter exponential running averages (`factor_decay`); every `inverse_every` steps each
factor is eigendecomposed, A = Q_A diag(s_A) Q_A^T, G = Q_G diag(s_G) Q_G^T, and each step the gradient V [out,
in+1] is replaced by the exactly damped natural gradient

    (A (x) G + damping I)^-1 vec(V) = Q_G [(Q_G^T V Q_A) / (s_G s_A^T + damping)] Q_A^T

(the damping of George et al. 2018's eigenbasis; with exact factors it *is* the natural gradient (F + damping I)^-1
g, tested against the Fisher of a one-layer model, and damping -> infinity gives the gradient / damping, SGD's
direction). The update is rescaled so that its quadratic model change lr^2 g^T F^-1 g stays under `kl_clip` (Ba et
al. 2017) and handed to SGD with momentum. Layers other than Linear and Conv2d (BatchNorm, say) keep their
plain gradient.

Nominal FLOPs outside the model, per layer with n = in+1 (in*k*k+1 for a convolution, over L = output positions
per example) and m = out, batch B (`step_flops`; checked against torch's FLOP counter for the matrix products):
factors 2*B*L*n^2 + 2*B*L*m^2 plus 3*(n^2 + m^2) for the running average, every `factor_every` steps; the
eigendecompositions 9*(n^3 + m^3) (Golub & Van Loan's count for the symmetric QR algorithm with vectors) every
`inverse_every` steps; each step 4*m*n*(m + n) for the four products, 2*m*n for the division and 4*m*n for the KL
rescaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LAYERS = (nn.Linear, nn.Conv2d)


@dataclass
class _Layer:
    module: nn.Module
    n: int  # rows of A: inputs (+1 for the bias)
    m: int  # rows of G: outputs
    positions: int  # output positions per example (1 for Linear)
    A: torch.Tensor | None = None
    G: torch.Tensor | None = None
    eig: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # s_A, Q_A, s_G, Q_G


class KFACPreconditioner:
    """Running Kronecker factors of a model's Linear/Conv2d layers and the damped natural-gradient transform."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], damping: float, factor_decay: float,
                 kl_clip: float, generator: torch.Generator, fisher: str = "mc"):
        self.model, self.damping, self.decay, self.kl_clip = model, damping, factor_decay, kl_clip
        self.fisher = fisher  # "mc": one label drawn per example; "type-2": the exact expectation over labels
        self.generator = generator
        positions = _output_positions(model, input_shape)
        self.layers = {name: _Layer(module, _columns(module), module.weight.shape[0], positions[name])
                       for name, module in model.named_modules() if isinstance(module, LAYERS)}
        if not self.layers:
            raise ValueError("optimizer 'kfac' needs a model with Linear or Conv2d layers")

    def update_factors(self, x: torch.Tensor) -> None:
        """The batch's factors, averaged in: one forward of `x` [B, ...] and one backward with labels drawn from the
        model (`fisher = "mc"`), or one backward per class (`"type-2"`, the exact expectation; curvlinops backpropagates
        the columns of the loss Hessian's square root)."""
        from curvlinops import KFACLinearOperator

        params = [p for layer in self.layers.values() for p in _params(layer.module)]
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.generator))
        labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # unused by the MC Fisher
        operator = KFACLinearOperator(self.model, nn.CrossEntropyLoss(), params, [(x, labels)], fisher_type=self.fisher,
                                      mc_samples=1, separate_weight_and_bias=False, check_deterministic=False,
                                      num_data=x.shape[0], num_per_example_loss_terms=1, seed=seed)
        operator.compute_kronecker_factors()
        state = operator.state_dict()
        for name, layer in self.layers.items():
            A, G = state["input_covariances"][name], state["gradient_covariances"][name]
            if layer.module.bias is None:  # curvlinops adds the 1 only with a bias; keep one layout for both
                A = torch.block_diag(A, A.new_zeros(1, 1))
            layer.A = A if layer.A is None else layer.A.mul_(self.decay).add_(A, alpha=1 - self.decay)
            layer.G = G if layer.G is None else layer.G.mul_(self.decay).add_(G, alpha=1 - self.decay)

    def update_inverses(self) -> None:
        """Eigendecompose every running factor (symmetric: `torch.linalg.eigh`), in float64: float32's solver
        returned NaN for MNIST's input factor, whose many constant-zero pixels make a highly degenerate zero
        eigenvalue."""
        for layer in self.layers.values():
            s_a, q_a = (t.to(layer.A.dtype) for t in torch.linalg.eigh(layer.A.double()))
            s_g, q_g = (t.to(layer.G.dtype) for t in torch.linalg.eigh(layer.G.double()))
            layer.eig = (s_a.clamp_(min=0), q_a, s_g.clamp_(min=0), q_g)

    def precondition(self, lr: float) -> None:
        """Replace each layer's .grad by its damped natural gradient, rescaled so that lr^2 g^T F^-1 g <= kl_clip."""
        updates, quadratic = {}, 0.0
        for name, layer in self.layers.items():
            if layer.module.weight.grad is None:
                continue
            grad = _gradient_matrix(layer)  # [m, n]
            updates[name] = natural_gradient(grad, *layer.eig, self.damping)
            quadratic += float((updates[name] * grad).sum())
        scale = min(1.0, (self.kl_clip / (lr * lr * quadratic)) ** 0.5) if quadratic > 0 and self.kl_clip > 0 else 1.0
        for name, update in updates.items():
            _write_gradient(self.layers[name], update.mul_(scale))

    def step_flops(self, batch: int, factor_every: int, inverse_every: int) -> float:
        """Average FLOPs per step of the work above (the formula in the module docstring)."""
        total = 0.0
        for layer in self.layers.values():
            n, m, rows = layer.n, layer.m, batch * layer.positions
            factors = 2 * rows * (n * n + m * m) + 3 * (n * n + m * m)
            inverses = 9 * (n ** 3 + m ** 3)
            total += factors / factor_every + inverses / inverse_every + 4 * m * n * (m + n) + 6 * m * n
        return total


def natural_gradient(grad: torch.Tensor, s_a: torch.Tensor, q_a: torch.Tensor, s_g: torch.Tensor,
                     q_g: torch.Tensor, damping: float) -> torch.Tensor:
    """(A (x) G + damping I)^-1 vec(grad) for grad [m, n], A = Q_A diag(s_A) Q_A^T [n, n], G likewise [m, m]."""
    rotated = q_g.T @ grad @ q_a  # [m, n]: the gradient in the factors' eigenbasis
    rotated /= torch.outer(s_g, s_a) + damping
    return q_g @ rotated @ q_a.T


def _columns(module: nn.Module) -> int:
    return module.weight[0].numel() + 1  # in (x k x k) plus the bias column


def _params(module: nn.Module) -> list[nn.Parameter]:
    return [module.weight] + ([module.bias] if module.bias is not None else [])


def _gradient_matrix(layer: _Layer) -> torch.Tensor:
    """[W.grad flattened | b.grad] as [m, n] (a zero column without a bias)."""
    weight = layer.module.weight.grad.reshape(layer.m, -1)
    bias = layer.module.bias.grad if layer.module.bias is not None else weight.new_zeros(layer.m)
    return torch.cat([weight, bias[:, None]], dim=1)


def _write_gradient(layer: _Layer, update: torch.Tensor) -> None:
    layer.module.weight.grad.copy_(update[:, :-1].reshape(layer.module.weight.shape))
    if layer.module.bias is not None:
        layer.module.bias.grad.copy_(update[:, -1])


def _output_positions(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Output positions per example of each Conv2d (H_out * W_out), 1 for each Linear: one forward of a zero input."""
    positions, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, LAYERS):
            def record(mod, inputs, output, name=name):
                positions[name] = output[0, 0].numel() if isinstance(mod, nn.Conv2d) else 1
            handles.append(module.register_forward_hook(record))
    parameter = next(model.parameters())
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()(torch.zeros(1, *input_shape, device=parameter.device, dtype=parameter.dtype))
            model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return positions
