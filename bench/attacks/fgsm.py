"""FGSM, the fast gradient sign method (Goodfellow, Shlens & Szegedy 2015, "Explaining and Harnessing Adversarial
Examples", ICLR): one step of size eps along the sign of the input gradient of the cross-entropy, clipped to [0, 1].

x_adv = clip(x + eps * sign(grad_x CE(f(x), y)), 0, 1). No random start (as published). Linf threat model.
"""

from __future__ import annotations

from torch import Tensor, nn

from .common import bcast, loss_grad, per_row, project_linf


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> Tensor:
    """One signed-gradient step of size eps (a number, or one per point [B]): x [B, ...] in [0, 1], y [B] ->
    x_adv [B, ...]. Call inside `attack_mode(model)` so no weight gradients are built."""
    grad, _ = loss_grad(model, x, y)  # [B, ...]
    eps = bcast(per_row(eps, x), x)  # [B, 1, ...]
    return project_linf(x + eps * grad.sign(), x, eps)
