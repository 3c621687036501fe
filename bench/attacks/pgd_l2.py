"""PGD-L2 (Madry et al. 2018, the L2 threat model of their paper and of the `robustness` library): a random start
uniform in the L2 ball, then steps of size 2.5 * eps / steps along the L2-normalised input gradient, each followed by
projection onto the ball (radial rescaling) and [0, 1].

The loop, restarts, worst-case bookkeeping and early stop are PGD-Linf's (`pgd.py`); only the geometry differs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import bcast, l2_norms, normal, project_l2, uniform
from .pgd import STEP_FACTOR, STEPS, Geometry, pgd


def _l2_start(x: Tensor, eps: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform in the L2 ball: a Gaussian direction times eps * U^(1/D) (Muller 1959; in high dimension this is
    nearly the sphere)."""
    direction = normal(x.shape, generator, x.device)
    direction = direction / l2_norms(direction).clamp_min(1e-12)
    dims = x[0].numel()
    radius = eps * bcast(uniform((x.shape[0],), generator, x.device).pow(1.0 / dims), x)  # [B, 1, ...]
    return project_l2(x + direction * radius, x, eps)


def _l2_step(x_adv: Tensor, grad: Tensor, size: Tensor) -> Tensor:
    return x_adv + size * grad / l2_norms(grad).clamp_min(1e-12)


L2 = Geometry(start=_l2_start, step=_l2_step, ball=lambda x, eps: (x, eps),
              project=lambda x_adv, ball: project_l2(x_adv, *ball))


def pgd_l2(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, *, generator: torch.Generator,
           steps: int = STEPS, step_factor: float = STEP_FACTOR, restarts: int = 1,
           grad_model: nn.Module | None = None, early_stop: bool = True) -> Tensor:
    """PGD-L2: x [B, ...] in [0, 1], y [B], eps a number or one per point [B] -> x_adv [B, ...] with
    ||x_adv - x||_2 <= eps. Call inside `attack_mode(model)`."""
    return pgd(model, x, y, eps, geometry=L2, generator=generator, steps=steps, step_factor=step_factor,
               restarts=restarts, grad_model=grad_model, early_stop=early_stop)
