"""Gaussian noise at matched L2 norm: the baseline every gradient attack must beat.

x_noisy = clip(x + eps * g / ||g||_2, 0, 1) with g ~ N(0, I), one draw per point, on the L2 grid, so each noisy
point sits on the same sphere PGD-L2 searches (clipping to [0, 1] only shrinks the perturbation). A white-box
attack that does no better than this random direction is not following a useful gradient: the robustness module
flags it (`flag/masking/black-box-beats-white-box`). This is the comparison behind the pseudo-gradient story of
feedback alignment (an attack through the feedback weights does about as well as random noise of its size).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import bcast, l2_norms, normal, per_row


def gaussian_noise(x: Tensor, eps: float | Tensor, *, generator: torch.Generator) -> Tensor:
    """x [B, ...] in [0, 1] -> x + a random perturbation of L2 norm eps (a number, or one per point [B]) per point,
    clipped to [0, 1]."""
    g = normal(x.shape, generator, x.device)  # [B, ...]
    return (x + bcast(per_row(eps, x), x) * g / l2_norms(g).clamp_min(1e-12)).clamp_(0.0, 1.0)
