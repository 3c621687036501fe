"""APGD, Auto-PGD, Linf (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML; reference code fra31/auto-attack, `autopgd_base.py`): APGD-CE and APGD-DLR
(untargeted, on the cross-entropy or on the difference of logits ratio) and APGD-T (targeted DLR), one loop.

As published: start at x + eps * t / ||t||_inf with t ~ U[-1, 1]; step size 2 * eps, per point; a momentum step
    z      = P(x_k + eta * sign(grad_k))
    x_k+1  = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_k-1)),   alpha = 0.75 (1 on the first step);
checkpoints w_0 = 0, w_1 = 0.22 N, w_j+1 = w_j + max(w_j - w_j-1 - 0.03 N, 0.06 N); at each checkpoint a point's
step size is halved and it restarts from its best point when
    (1) the loss rose in at most rho = 0.75 of the steps since the last checkpoint, or
    (2) its step size was not halved at the last checkpoint and its best loss has not improved since.
A point is broken as soon as any iterate is misclassified (for APGD-T too: any class other than y, not only the
target). Restarts run on the points no earlier restart broke.

The losses (z the logits [B, C], pi the classes sorted by decreasing logit):
    CE         logsumexp(z) - z_y
    DLR        -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)                    (needs C >= 3)
    DLR-T      -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)                   (needs C >= 4)
APGD-T runs, for k = 1 .. n_targets (at most C - 1), `restarts` runs (AutoAttack: 1) aimed at the target t = the
class of the k-th largest non-true logit at the clean x, each on the points no earlier target or restart broke.

Differences from the reference code, none of which changes what a point's trajectory is: broken points leave the
batch at once (every quantity above is per point, so the others are unaffected); the first checkpoint's count of
loss increases compares step 1 with the starting point as the paper says (the code compares with an unset 0).
The reference attacks only the points correctly classified at x and takes its targets from all logits sorted (the
k+1-th largest, which is the k-th largest non-true logit exactly on those points); here the targets are the k-th
largest non-true logits for every point, and a misclassified clean point is broken at its (random) start. A point
no run breaks keeps the best-loss point of its last run (the reference returns x). Randomness comes from the given
generator, not a global seed.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from .common import bcast, cross_entropy, on_survivors, per_row, project_linf, uniform

STEPS = 100
"""Iterations per restart (AutoAttack's standard and the paper's setting)."""
RHO = 0.75
"""Fraction of loss-increasing steps below which the step size is halved (paper: rho = 0.75)."""
MOMENTUM = 0.75
"""alpha in the update above (paper: 0.75)."""
TARGETS = 9
"""APGD-T's target classes (AutoAttack's standard: 9, all others on 10-class data), one restart each."""

Loss = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(logits [n, C], y [n], t [n] target classes, ignored by untargeted losses) -> per-point loss [n] to maximise."""


def apgd_ce(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, *, generator: torch.Generator,
            steps: int = STEPS, restarts: int = 1, rho: float = RHO) -> Tensor:
    """APGD-CE (Linf): x [B, ...] in [0, 1], y [B], eps a number or one per point [B] -> x_adv [B, ...].
    Call inside `attack_mode(model)`."""
    return _untargeted(_ce, model, x, y, eps, generator, steps, restarts, rho)


def apgd_dlr(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, *, generator: torch.Generator,
             steps: int = STEPS, restarts: int = 1, rho: float = RHO) -> Tensor:
    """APGD-DLR (Linf, untargeted, at least 3 classes): arguments and result as `apgd_ce`."""
    return _untargeted(_dlr, model, x, y, eps, generator, steps, restarts, rho)


def apgd_t(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, *, generator: torch.Generator,
           steps: int = STEPS, n_targets: int = TARGETS, restarts: int = 1, rho: float = RHO) -> Tensor:
    """APGD-T (Linf, targeted DLR, at least 4 classes): `restarts` runs per target class, for the n_targets
    largest non-true clean logits in turn, each on the points still standing. Arguments and result as `apgd_ce`."""
    with torch.no_grad():
        targets = target_classes(model(x), y, n_targets)  # [B, K]
    run = partial(_single_run, model, generator=generator, steps=steps, rho=rho, loss=_dlr_targeted)
    return over_targets(lambda xs, ys, es, ts, _: run(xs, ys, es, ts), x, y, per_row(eps, x), targets, restarts)


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio [B]: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12); logits [B, C], C >= 3."""
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    top = logits.topk(3, dim=1).values  # [B, 3] descending
    true = logits.gather(1, y[:, None]).squeeze(1)  # [B]
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)  # [B]
    return -(true - other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits: Tensor, y: Tensor, t: Tensor) -> Tensor:
    """Targeted DLR [B]: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12); logits [B, C], C >= 4."""
    if logits.shape[1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got {logits.shape[1]}")
    top = logits.topk(4, dim=1).values  # [B, 4] descending
    true, target = logits.gather(1, y[:, None]).squeeze(1), logits.gather(1, t[:, None]).squeeze(1)  # [B]
    return -(true - target) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def target_classes(logits: Tensor, y: Tensor, n_targets: int) -> Tensor:
    """[B, K]: column k - 1 is the class of the k-th largest logit other than y's (ties: the lower class index
    first), K = min(n_targets, C - 1). logits [B, C] at the clean points."""
    k = max(1, min(n_targets, logits.shape[1] - 1))
    others = logits.scatter(1, y[:, None], float("-inf"))  # [B, C] the true class last
    return others.sort(dim=1, descending=True, stable=True).indices[:, :k]


def over_targets(run: Callable[[Tensor, Tensor, Tensor, Tensor, int], tuple[Tensor, Tensor]], x: Tensor,
                 y: Tensor, eps: Tensor, targets: Tensor, restarts: int) -> Tensor:
    """`on_survivors` over target classes: for each column of targets [B, K] in turn, `restarts` runs of
    `run(x, y, eps, t, restart) -> (x_adv, hit)` (restart = 0, 1, ...), each on the points no earlier run broke; a
    point keeps the answer of the last run that attacked it. eps: one radius per row [B]. (APGD-T and FAB-T.)"""
    out = x.clone()
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for k in range(targets.shape[1]):
        for restart in range(max(1, restarts)):
            todo = (~fooled).nonzero().squeeze(1)  # [n]
            if todo.numel() == 0:
                return out
            adv, hit = run(x[todo], y[todo], eps[todo], targets[todo, k], restart)
            out[todo] = adv
            fooled[todo[hit]] = True
    return out


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


def _ce(logits: Tensor, y: Tensor, t: Tensor) -> Tensor:
    return cross_entropy(logits, y)


def _dlr(logits: Tensor, y: Tensor, t: Tensor) -> Tensor:
    return dlr_loss(logits, y)


def _dlr_targeted(logits: Tensor, y: Tensor, t: Tensor) -> Tensor:
    return dlr_targeted_loss(logits, y, t)


def _untargeted(loss: Loss, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor,
                generator: torch.Generator, steps: int, restarts: int, rho: float) -> Tensor:
    run = partial(_single_run, model, generator=generator, steps=steps, rho=rho, loss=loss)
    return on_survivors(lambda xs, ys, es: run(xs, ys, es, ys), x, y, per_row(eps, x), restarts)


def _loss_grad(model: nn.Module, x: Tensor, y: Tensor, t: Tensor, loss: Loss) -> tuple[Tensor, Tensor]:
    """Gradient of the summed loss with respect to the input only, and the logits: (grad [n, ...], logits [n, C]).
    With the CE loss, the same operations as `common.loss_grad`."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)  # [n, C]
        total = loss(logits, y, t).sum()
    (grad,) = torch.autograd.grad(total, x)
    return grad, logits.detach()


def _start(x: Tensor, eps: Tensor, generator: torch.Generator) -> Tensor:
    t = uniform(x.shape, generator, x.device).mul_(2.0).sub_(1.0)  # [B, ...] U[-1, 1)
    t = t / bcast(t.flatten(1).abs().amax(1).clamp_min(1e-12), x)
    return project_linf(x + eps * t, x, eps)


def _single_run(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, t: Tensor, generator: torch.Generator,
                steps: int, rho: float, loss: Loss) -> tuple[Tensor, Tensor]:
    """One APGD run maximising `loss` (t [B]: target classes, ignored by untargeted losses). Returns (x_adv
    [B, ...]: the first misclassified iterate, else the best-loss point; hit [B]: whether the point was broken)."""
    n = x.shape[0]
    x_adv = _start(x, bcast(eps, x), generator)
    grad, logits = _loss_grad(model, x_adv, y, t, loss)
    value = loss(logits, y, t)  # [B]
    s = {  # per-point state; every tensor has the active points as its first dimension
        "idx": torch.arange(n, device=x.device), "y": y, "t": t, "x_adv": x_adv,
        "lo": (x - bcast(eps, x)).clamp_(min=0.0), "hi": (x + bcast(eps, x)).clamp_(max=1.0),  # the ball in [0, 1]
        "x_old": x_adv.clone(), "grad": grad, "x_best": x_adv.clone(), "grad_best": grad.clone(),
        "loss_best": value.clone(), "loss_prev": value, "step": 2.0 * eps, "ups": torch.zeros(n, device=x.device),
        "reduced": torch.ones(n, dtype=torch.bool, device=x.device), "loss_best_check": value.clone(),
    }
    out, hit = x_adv.clone(), torch.zeros(n, dtype=torch.bool, device=x.device)
    s = _retire(s, logits.argmax(1) != y, out, hit)
    marks, last = checkpoints(steps), 0
    for i in range(steps):
        if s["idx"].numel() == 0:
            return out, hit
        _momentum_step(s, MOMENTUM if i > 0 else 1.0)
        grad, logits = _loss_grad(model, s["x_adv"], s["y"], s["t"], loss)
        _track(s, grad, loss(logits, s["y"], s["t"]))
        s = _retire(s, logits.argmax(1) != s["y"], out, hit)  # before a checkpoint moves x_adv back
        if i + 1 in marks:
            _checkpoint(s, i + 1 - last, rho)
            last = i + 1
    out[s["idx"]] = s["x_best"]
    return out, hit


@torch.no_grad()
def _momentum_step(s: dict[str, Tensor], alpha: float) -> None:
    """z = P(x_adv + step sign(grad)); x_adv <- P(x_adv + alpha (z - x_adv) + (1 - alpha) (x_adv - x_old)), P the
    projection onto the eps ball within [0, 1]: a clamp between the per-point bounds `lo` and `hi`."""
    x_adv, lo, hi = s["x_adv"], s["lo"], s["hi"]
    z = torch.clamp(x_adv.addcmul(bcast(s["step"], x_adv), s["grad"].sign()), lo, hi)
    new = torch.lerp(x_adv, z, alpha)
    if alpha != 1.0:
        new.add_(x_adv - s["x_old"], alpha=1.0 - alpha)
    s["x_old"], s["x_adv"] = x_adv, torch.clamp(new, lo, hi)


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
