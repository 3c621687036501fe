"""PGD-Linf, projected gradient descent on the cross-entropy (Madry, Makelov, Schmidt, Tsipras & Vladu 2018,
"Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR; reference code MadryLab/mnist_challenge).

Madry's settings: a uniform random start in the Linf ball, 40 steps of size 2.5 * eps / 40 along the gradient sign,
each followed by projection onto the ball and [0, 1]. Restarts run on the points no earlier restart fooled, and each
point keeps its worst case: an adversarial point if any restart found one, otherwise the iterate of highest loss.

A point counts as broken as soon as any iterate is misclassified (AutoAttack's convention; Madry's code scores only
the last iterate, which can only be higher). With `early_stop` (the default) a broken point leaves the batch at
that moment, so later steps only pay for the points still standing; this changes no result. `early_stop=False`
runs every step on every point and returns the last iterate: the exact work of Madry's code and of ART's
`ProjectedGradientDescentPyTorch`, used by `learnbench perf attacks` and by the transfer attack (examples pushed
to high loss transfer better than examples just across the boundary).

`grad_model` (default: `model`) is the module whose backward gives the direction; the pseudo-gradient attack on
feedback-alignment networks passes the training model here, and the points are scored on `model`.
`pgd_l2.py` reuses this loop with the L2 start, step and projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .common import bcast, cross_entropy, logits_of, loss_grad, per_row, project_linf, uniform

STEPS = 40
"""Madry et al.'s MNIST setting (40 steps, random start)."""
STEP_FACTOR = 2.5
"""Step size = STEP_FACTOR * eps / steps, the rule of thumb of Madry et al.'s `robustness` library: a total walk
of 2.5 eps lets every coordinate reach the ball's boundary from anywhere inside it."""


@dataclass(frozen=True)
class Geometry:
    """How a PGD variant starts, steps and projects (Linf here, L2 in pgd_l2.py). Radii and step sizes are
    per-point tensors shaped [B, 1, ...] to broadcast against x."""

    start: Callable[[Tensor, Tensor, torch.Generator], Tensor]
    """(x, eps, generator) -> random point of the ball around x, inside [0, 1]."""
    step: Callable[[Tensor, Tensor, Tensor], Tensor]
    """(x_adv, grad, step_size) -> x_adv moved uphill (not yet projected); may work in place on x_adv."""
    ball: Callable[[Tensor, Tensor], tuple[Tensor, ...]]
    """(x, eps) -> the per-point tensors `project` needs, computed once per run."""
    project: Callable[[Tensor, tuple[Tensor, ...]], Tensor]
    """(x_adv, ball) -> nearest point of the ball inside [0, 1]."""


def _linf_start(x: Tensor, eps: Tensor, generator: torch.Generator) -> Tensor:
    noise = uniform(x.shape, generator, x.device).mul_(2.0).sub_(1.0)  # U[-1, 1)
    return project_linf(x + eps * noise, x, eps)


def _linf_step(x_adv: Tensor, grad: Tensor, size: Tensor) -> Tensor:
    return x_adv.addcmul_(size, grad.sign_())


def _linf_box(x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """The Linf ball intersected with [0, 1] is a box: [max(x - eps, 0), min(x + eps, 1)] per coordinate."""
    return (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)


LINF = Geometry(start=_linf_start, step=_linf_step, ball=_linf_box,
                project=lambda x_adv, box: x_adv.clamp_(box[0], box[1]))


def pgd_linf(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, *, generator: torch.Generator,
             steps: int = STEPS, step_factor: float = STEP_FACTOR, restarts: int = 1,
             grad_model: nn.Module | None = None, early_stop: bool = True) -> Tensor:
    """PGD-Linf: x [B, ...] in [0, 1], y [B], eps a number or one per point [B] -> x_adv [B, ...].
    Call inside `attack_mode(model, grad_model)`."""
    return pgd(model, x, y, eps, geometry=LINF, generator=generator, steps=steps, step_factor=step_factor,
               restarts=restarts, grad_model=grad_model, early_stop=early_stop)


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, *, geometry: Geometry,
        generator: torch.Generator, steps: int, step_factor: float, restarts: int = 1,
        grad_model: nn.Module | None = None, early_stop: bool = True) -> Tensor:
    """Restarts of `_single_run` on the points still standing; each point keeps its worst case (see module doc).
    The step size is step_factor * eps / steps, per point."""
    grad_model = model if grad_model is None else grad_model
    eps = per_row(eps, x)  # [B]
    if restarts <= 1:  # one candidate per point: nothing to choose between
        return _single_run(grad_model, x, y, eps, geometry, generator, steps, step_factor, early_stop)
    best = x.clone()
    best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(max(1, restarts)):
        todo = (~fooled).nonzero().squeeze(1)  # [n] points no restart has broken yet
        if todo.numel() == 0:
            break
        adv = _single_run(grad_model, x[todo], y[todo], eps[todo], geometry, generator, steps, step_factor,
                          early_stop)
        logits = logits_of(model, adv)  # [n, C] scored on the plain model
        loss = cross_entropy(logits, y[todo])
        wrong = logits.argmax(1) != y[todo]
        better = wrong | (loss > best_loss[todo])
        best[todo[better]] = adv[better]
        best_loss[todo[better]] = loss[better]
        fooled[todo[wrong]] = True
    return best


def _single_run(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, geometry: Geometry,
                generator: torch.Generator, steps: int, step_factor: float, early_stop: bool) -> Tensor:
    """One random start and `steps` projected steps; with early_stop, a point leaves once misclassified."""
    eps = bcast(eps, x)  # [B, 1, ...]
    x_adv = geometry.start(x, eps, generator)
    ball, size = geometry.ball(x, eps), step_factor * eps / steps
    out = x_adv.clone()  # [B, ...] the answer per point: its first misclassified iterate, else the last
    idx = torch.arange(x.shape[0], device=x.device)  # [n] rows of `out` still being attacked
    for _ in range(steps):
        grad, logits = loss_grad(model, x_adv, y)
        if early_stop:
            hit = logits.argmax(1) != y  # [n] one host sync per step on CUDA: the price of shrinking the batch
            if hit.any():
                out[idx[hit]] = x_adv[hit]
                keep = ~hit
                idx, x_adv, y, size, grad = idx[keep], x_adv[keep], y[keep], size[keep], grad[keep]
                ball = tuple(b[keep] for b in ball)
                if idx.numel() == 0:
                    return out
        x_adv = geometry.project(geometry.step(x_adv, grad, size), ball)
    out[idx] = x_adv
    return out
