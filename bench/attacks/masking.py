"""Gradient-masking checks, in the spirit of AutoAttack's (Croce & Hein 2020, `autoattack/checks.py`) and of
Athalye, Carlini & Wagner 2018 ("Obfuscated gradients give a false sense of security", Sec. 3.1's warning signs).

A model whose gradients are useless to an attacker (quantised, saturated, or attacked through the wrong backward)
looks robust to white-box attacks without being robust. Each check becomes a 0/1 metric `flag/masking/<check>`;
a check that cannot be made with the attacks that ran is left out, never reported as 0 (reports and `show` list
every `flag/masking/*` metric that is 1). With N attacked points and margin m (`masking_margin`, a fraction of the
N points):

* `black-box-beats-white-box`: at some eps, more than m N points survive every white-box attack of that threat
  model (Linf: fgsm, pgd-linf, apgd-ce; L2: pgd-l2) but fall to the black-box one (square; noise for L2).
  AutoAttack's `check_square_sr` with a margin, per point. With the standard preset, also when the ensemble's
  Square breaks more than m N of the points its APGD-CE, APGD-T and FAB-T left (ensemble.py).
* `accuracy-not-falling`: for a gradient attack, accuracy stays within a band of width m across the whole eps grid
  while above m (a flat curve: the gradient moves nothing), or, for an iterative attack (pgd-linf, pgd-l2,
  apgd-ce), rises by more than m from one eps to the next. A rise of FGSM is not counted: its single step of length
  eps overshoots the nearest boundary more as eps grows, so its curve climbs at large eps on unmasked models too
  (measured on the MNIST-1D MLPs: 1.2% at eps 0.05, 5.1% at 0.3, PGD 0% throughout).
* `zero-gradients`: more than m of the correctly classified points have an input gradient that is exactly zero
  or not finite (AutoAttack's `check_zero_gradients`, which warns at any such point).
* `more-iterations-help`: at the Linf eps where PGD leaves about half the clean accuracy (the standard preset
  without PGD: where the worst case does, with APGD-CE), PGD with
  `masking_steps_factor` times the steps and `masking_restarts` restarts, run on the points default PGD left
  standing, breaks more than m N of them: the default attack had not converged.
* `transfer-beats-white-box` (added by the transfer attack after the run): the backprop model's PGD examples beat
  the model's own white-box attacks by more than m at some eps.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .common import loss_grad

WHITE_BOX = {"linf": ("fgsm", "pgd-linf", "apgd-ce", "apgd-t", "fab-t"), "l2": ("pgd-l2",)}
BLACK_BOX = {"linf": ("square",), "l2": ("noise",)}
GRADIENT_ATTACKS = ("fgsm", "pgd-linf", "pgd-l2", "apgd-ce", "apgd-t", "fab-t", "worst-case")
ITERATIVE_ATTACKS = ("pgd-linf", "pgd-l2", "apgd-ce", "apgd-t", "fab-t", "worst-case")
"""Their accuracy falls with eps, up to noise. `worst-case` is the standard preset's per-example worst case
(ensemble.py), checked like an attack's curve."""

Robust = dict[str, dict[float, Tensor]]
"""attack id -> eps -> [N] bool: the point is classified correctly on clean input and after the attack."""


def black_box_beats_white_box(robust: Robust, margin: float) -> float | None:
    """1.0 if a black-box attack breaks more than `margin` of the points every white-box attack left standing."""
    fired, checked = False, False
    for norm in ("linf", "l2"):
        white = [robust[a] for a in WHITE_BOX[norm] if a in robust]
        for black in (robust[a] for a in BLACK_BOX[norm] if a in robust):
            if not white:
                continue
            for eps, black_mask in black.items():
                survivors = torch.stack([w[eps] for w in white]).all(0)  # [N]
                checked = True
                fired |= (survivors & ~black_mask).float().mean().item() > margin
    return float(fired) if checked else None


def accuracy_not_falling(robust: Robust, margin: float) -> float | None:
    """1.0 if some gradient attack's accuracy is flat above the floor across the grid, or some iterative one's rises
    with eps."""
    curves = {a: [robust[a][eps].float().mean().item() for eps in sorted(robust[a])]
              for a in GRADIENT_ATTACKS if a in robust and len(robust[a]) > 1}
    if not curves:
        return None
    for attack, acc in curves.items():
        rises = attack in ITERATIVE_ATTACKS and any(b > a + margin for a, b in zip(acc, acc[1:]))
        flat = max(acc) - min(acc) <= margin and min(acc) > margin
        if rises or flat:
            return 1.0
    return 0.0


def zero_gradient_fraction(model: nn.Module, x: Tensor, y: Tensor, chunk: int) -> float:
    """Fraction of points whose cross-entropy input gradient is exactly zero or has a non-finite entry.
    Call inside `attack_mode(model)`."""
    if x.shape[0] == 0:
        return 0.0
    bad = 0
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        grad, _ = loss_grad(model, xs, ys)
        flat = grad.flatten(1)  # [b, D]
        bad += int(((flat == 0).all(1) | ~torch.isfinite(flat).all(1)).sum())
    return bad / x.shape[0]


def check_eps(pgd_robust: dict[float, Tensor], clean: Tensor) -> float:
    """The grid eps where default PGD leaves accuracy closest to half the clean accuracy (the most informative
    point for a stronger attack: neither everything nor nothing is broken)."""
    half = clean.float().mean().item() / 2
    return min(pgd_robust, key=lambda eps: abs(pgd_robust[eps].float().mean().item() - half))


def more_iterations_help(pgd_robust: dict[float, Tensor], clean: Tensor, strong: Callable[[Tensor, float], Tensor],
                         margin: float) -> float:
    """1.0 if the stronger PGD (`strong(points, eps)` -> [n] bool still correct) breaks more than `margin` of all
    points among those default PGD left standing at `check_eps`."""
    eps = check_eps(pgd_robust, clean)
    survivors = pgd_robust[eps].nonzero().squeeze(1)  # [n]
    if survivors.numel() == 0:
        return 0.0
    newly_broken = (~strong(survivors, eps)).sum().item()
    return float(newly_broken / clean.numel() > margin)

