"""What every attack shares: the attack-mode context (eval mode, weights frozen), the true input gradient, the
projections onto the eps balls and [0, 1], margins, random draws from a given generator, and chunking.

Every attack takes `model` (a plain `nn.Module`, logits out), clean inputs `x` in [0, 1] ([B, ...] on any device),
labels `y` [B] and returns adversarial inputs of x's shape, inside [0, 1] and inside the eps ball around x. Gradients
are taken with `torch.autograd.grad` with respect to the input only; `attack_mode` switches the weights'
`requires_grad` off so autograd builds no weight-gradient graph at all (about a third less work per step than a
`loss.backward()` that fills `.grad` of every parameter, which is what ART's PyTorch estimator does).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def attack_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode and frozen weights for the duration of an attack; both restored afterwards, even on error.

    The models may share modules and parameters (a feedback-alignment training model and its plain evaluation
    model do): every flag is read before any is changed."""
    modules = list({id(m): m for model in models for m in model.modules()}.values())
    params = list({id(p): p for model in models for p in model.parameters()}.values())
    modes, flags = [m.training for m in modules], [p.requires_grad for p in params]
    for m in modules:
        m.training = False
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-point cross-entropy [B] as logsumexp(z) - z_y: the same value as `F.cross_entropy(reduction="none")`,
    about 5x cheaper than its log_softmax on [B, 10] logits on CPU (a visible share of a small model's PGD step)."""
    return logits.logsumexp(1) - logits.gather(1, y[:, None]).squeeze(1)


def loss_grad(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient of the summed cross-entropy with respect to the input only, and the logits at x.

    Summed, not averaged, so that a point's gradient does not shrink with the batch size (the zero-gradient check
    reads magnitudes). Returns (grad [B, ...], logits [B, C])."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)  # [B, C]
        loss = cross_entropy(logits, y).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


@torch.no_grad()
def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, chunk: int) -> Tensor:
    """Predicted classes [B], in chunks of `chunk` points."""
    return torch.cat([model(part).argmax(1) for part in x.split(chunk)])


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """logit of the true class minus the largest other logit [B]; <= 0 means misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.amax(1)


def per_row(eps: float | Tensor, x: Tensor) -> Tensor:
    """eps as a vector [B] (x's dtype and device). Every attack takes one radius for the batch or one per point:
    the robustness evaluation stacks the whole eps grid into one batch, so per-step overheads are paid once, not
    once per eps (what makes small models cheap to attack)."""
    return torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(x.shape[0]).contiguous()


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """A per-row vector [B] viewed as [B, 1, ...] to broadcast against x."""
    return v.view(-1, *([1] * (x.dim() - 1)))


def project_linf(x_adv: Tensor, x: Tensor, eps: float | Tensor) -> Tensor:
    """Nearest point of the Linf ball around x intersected with [0, 1] (clipping to [0, 1] after the ball never
    leaves the ball, since x itself is in [0, 1]). A tensor eps must broadcast against x ([B, 1, ...])."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def l2_norms(v: Tensor) -> Tensor:
    """Per-example L2 norms, shaped to broadcast against v: [B, 1, ...]."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def project_l2(x_adv: Tensor, x: Tensor, eps: float | Tensor) -> Tensor:
    """Scale the perturbation back onto the L2 ball if outside, then clip to [0, 1] (which only shrinks it).
    A tensor eps must already broadcast against x ([B, 1, ...]), as in `project_linf`."""
    delta = x_adv - x
    scale = (eps / l2_norms(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta * scale).clamp_(0.0, 1.0)


def uniform(shape: torch.Size | tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """U[0, 1) draws from `generator` (on its own device), moved to `device`: works whichever device the runner's
    generator lives on."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def normal(shape: torch.Size | tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def randint(high: Tensor | int, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """n integers uniform in [0, high) (high may differ per draw), int64 on `device`."""
    return (uniform((n,), generator, device) * high).long()


def chunked(attack: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, y: Tensor, eps: Tensor,
            chunk: int) -> Tensor:
    """Run `attack(x, y, eps)` on consecutive chunks of at most `chunk` rows (bounds memory; each chunk is one
    batch). eps: one radius per row [B]."""
    if x.shape[0] <= chunk:
        return attack(x, y, eps)
    return torch.cat([attack(*part) for part in zip(x.split(chunk), y.split(chunk), eps.split(chunk))])


def on_survivors(single_run: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]], x: Tensor, y: Tensor,
                 eps: Tensor, restarts: int) -> Tensor:
    """Restarts of `single_run(x, y, eps) -> (x_adv, hit)`, each on the points no earlier run broke; a point keeps
    the answer of the last run that attacked it (its breaking point, once broken). eps: one radius per row [B]."""
    out = x.clone()
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(max(1, restarts)):
        todo = (~fooled).nonzero().squeeze(1)  # [n]
        if todo.numel() == 0:
            break
        adv, hit = single_run(x[todo], y[todo], eps[todo])
        out[todo] = adv
        fooled[todo[hit]] = True
    return out


def random_sign(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """+1/-1 with probability 1/2 each."""
    return uniform(shape, generator, device).lt_(0.5).mul_(2.0).sub_(1.0)  # (in place: no bool tensor)
