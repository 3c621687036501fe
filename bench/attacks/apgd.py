"""APGD-CE, Auto-PGD on the cross-entropy (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with
an ensemble of diverse parameter-free attacks", ICML; reference code fra31/auto-attack, `autopgd_base.py`), Linf.

As published: start at x + eps * t / ||t||_inf with t ~ U[-1, 1]; step size 2 * eps, per point; a momentum step
    z      = P(x_k + eta * sign(grad_k))
    x_k+1  = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_k-1)),   alpha = 0.75 (1 on the first step);
checkpoints w_0 = 0, w_1 = 0.22 N, w_j+1 = w_j + max(w_j - w_j-1 - 0.03 N, 0.06 N); at each checkpoint a point's
step size is halved and it restarts from its best point when
    (1) the loss rose in at most rho = 0.75 of the steps since the last checkpoint, or
    (2) its step size was not halved at the last checkpoint and its best loss has not improved since.
A point is broken as soon as any iterate is misclassified. Restarts run on the points no earlier restart broke.

Differences from the reference code, none of which changes what a point's trajectory is: broken points leave the
batch at once (every quantity above is per point, so the others are unaffected); the first checkpoint's count of
loss increases compares step 1 with the starting point as the paper says (the code compares with an unset 0).
Randomness comes from the given generator, not a global seed.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from .common import bcast, cross_entropy, loss_grad, on_survivors, per_row, project_linf, uniform

STEPS = 100
"""Iterations per restart (AutoAttack's standard and the paper's setting)."""
RHO = 0.75
"""Fraction of loss-increasing steps below which the step size is halved (paper: rho = 0.75)."""
MOMENTUM = 0.75
"""alpha in the update above (paper: 0.75)."""


def apgd_ce(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, *, generator: torch.Generator,
            steps: int = STEPS, restarts: int = 1, rho: float = RHO) -> Tensor:
    """APGD-CE (Linf): x [B, ...] in [0, 1], y [B], eps a number or one per point [B] -> x_adv [B, ...].
    Call inside `attack_mode(model)`."""
    run = partial(_single_run, model, generator=generator, steps=steps, rho=rho)  # (x, y, eps) -> (x_adv, hit)
    return on_survivors(run, x, y, per_row(eps, x), restarts)


def checkpoints(steps: int) -> list[int]:
    """Iterations after which the step size is reviewed, as in the reference code: a first interval of 0.22 N,
    each next one 0.03 N shorter but at least 0.06 N (N = 100: 22, 41, 57, 70, 80, 87, 93, 99)."""
    interval, decrement, minimum = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, at = [], interval
    while at <= steps:
        out.append(at)
        interval = max(interval - decrement, minimum)
        at += interval
    return out


def _start(x: Tensor, eps: Tensor, generator: torch.Generator) -> Tensor:
    t = uniform(x.shape, generator, x.device).mul_(2.0).sub_(1.0)  # [B, ...] U[-1, 1)
    t = t / bcast(t.flatten(1).abs().amax(1).clamp_min(1e-12), x)
    return project_linf(x + eps * t, x, eps)


def _single_run(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, generator: torch.Generator, steps: int,
                rho: float) -> tuple[Tensor, Tensor]:
    """One APGD run. Returns (x_adv [B, ...]: the first misclassified iterate, else the best-loss point;
    hit [B]: whether the point was broken)."""
    n = x.shape[0]
    x_adv = _start(x, bcast(eps, x), generator)
    grad, logits = loss_grad(model, x_adv, y)
    loss = cross_entropy(logits, y)  # [B]
    s = {  # per-point state; every tensor has the active points as its first dimension
        "idx": torch.arange(n, device=x.device), "x": x, "y": y, "eps": eps, "x_adv": x_adv, "x_old": x_adv.clone(),
        "grad": grad, "x_best": x_adv.clone(), "grad_best": grad.clone(), "loss_best": loss.clone(),
        "loss_prev": loss, "step": 2.0 * eps, "ups": torch.zeros(n, device=x.device),
        "reduced": torch.ones(n, dtype=torch.bool, device=x.device), "loss_best_check": loss.clone(),
    }
    out, hit = x_adv.clone(), torch.zeros(n, dtype=torch.bool, device=x.device)
    s = _retire(s, logits.argmax(1) != y, out, hit)
    marks, last = checkpoints(steps), 0
    for i in range(steps):
        if s["idx"].numel() == 0:
            return out, hit
        _momentum_step(s, MOMENTUM if i > 0 else 1.0)
        grad, logits = loss_grad(model, s["x_adv"], s["y"])
        _track(s, grad, cross_entropy(logits, s["y"]))
        s = _retire(s, logits.argmax(1) != s["y"], out, hit)  # before a checkpoint moves x_adv back
        if i + 1 in marks:
            _checkpoint(s, i + 1 - last, rho)
            last = i + 1
    out[s["idx"]] = s["x_best"]
    return out, hit


@torch.no_grad()
def _momentum_step(s: dict[str, Tensor], alpha: float) -> None:
    x, x_adv = s["x"], s["x_adv"]
    step, eps = bcast(s["step"], x), bcast(s["eps"], x)  # [n, 1, ...]
    z = project_linf(x_adv + step * s["grad"].sign(), x, eps)
    new = project_linf(x_adv + alpha * (z - x_adv) + (1.0 - alpha) * (x_adv - s["x_old"]), x, eps)
    s["x_old"], s["x_adv"] = x_adv, new


def _track(s: dict[str, Tensor], grad: Tensor, loss: Tensor) -> None:
    """Record the new gradient and loss; keep each point's best point; count loss increases."""
    s["grad"] = grad
    better = loss > s["loss_best"]
    s["x_best"][better] = s["x_adv"][better]
    s["grad_best"][better] = grad[better]
    s["loss_best"] = torch.where(better, loss, s["loss_best"])
    s["ups"] += (loss > s["loss_prev"]).float()
    s["loss_prev"] = loss


def _checkpoint(s: dict[str, Tensor], interval: int, rho: float) -> None:
    """Halve the step and go back to the best point where progress stalled (conditions 1 and 2 of the paper)."""
    oscillating = s["ups"] <= interval * rho
    stalled = ~s["reduced"] & (s["loss_best_check"] >= s["loss_best"])
    reduce = oscillating | stalled  # [n]
    s["reduced"], s["loss_best_check"] = reduce, s["loss_best"].clone()
    s["step"] = torch.where(reduce, s["step"] / 2.0, s["step"])
    s["x_adv"] = s["x_adv"].clone()
    s["x_adv"][reduce] = s["x_best"][reduce]
    s["grad"] = s["grad"].clone()
    s["grad"][reduce] = s["grad_best"][reduce]
    s["ups"] = torch.zeros_like(s["ups"])


def _retire(s: dict[str, Tensor], wrong: Tensor, out: Tensor, hit: Tensor) -> dict[str, Tensor]:
    """Points misclassified at their current iterate are done: store that iterate, drop them from the state."""
    if not bool(wrong.any()):  # one host sync per step on CUDA
        return s
    out[s["idx"][wrong]] = s["x_adv"][wrong]
    hit[s["idx"][wrong]] = True
    keep = ~wrong
    return {k: v[keep] for k, v in s.items()}
