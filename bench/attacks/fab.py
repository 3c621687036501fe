"""FAB, the fast adaptive boundary attack, Linf (Croce & Hein 2020, "Minimally distorted adversarial examples with a
fast adaptive boundary attack", ICML; reference code fra31/fab-attack and fra31/auto-attack, `fab_base.py`,
`fab_pt.py`): FAB-T as run by AutoAttack (`fab_t`), and the minimum-norm attack itself (`fab_min_norm`).

FAB looks for the adversarial point closest to x0 (the clean point). Each step, at the iterate x:
* linearise the boundary between the true class y and a class k, g_k(z) = z_k(z) - z_y(z), around x:
  g_k(x) + grad g_k(x) . (z - x) = 0; targeted: k = t; untargeted: the k of smallest linearised distance
  |g_k(x)| / ||grad g_k(x)||_1 (the Linf distance to that hyperplane);
* project x and x0 onto that hyperplane intersected with the [0, 1] box in the Linf sense: d = argmin ||d||_inf
  subject to w . (p + d) = b, 0 <= p + d <= 1 (`project_hyperplane_box`: exact, by Newton's method, see there);
* extrapolate: x <- clip((1 - a)(x + eta d_x) + a (x0 + eta d_x0)), a = min(|d_x| / (|d_x| + |d_x0|), alpha_max)
  (Linf norms, each at least 1e-8), biasing the step towards the projection of the original point;
* if x is now misclassified, keep it when it is the closest adversarial yet and step back towards the original:
  x <- x0 + beta (x - x0).
AutoAttack's FAB-T: 100 steps, alpha_max = 0.1, eta = 1.05, beta = 0.9, one run per target class for the 9 largest
non-true logits at x0 (`apgd.target_classes`), each on the points no earlier target broke within eps; a run starts
at x0, a later restart at x0 + r u / ||u||_inf clipped to [0, 1], u ~ U[-1, 1], r = min(best norm found, eps) / 2.
A point counts as broken when misclassified (any class, as in the reference), not only when it reaches the target.

Differences from the reference code: the projection is our own exact solution by Newton's method (the reference
finds the same threshold by a bisection over the sorted breakpoints); where the box keeps the hyperplane out of
reach, the projection goes to the box corner that comes closest to it (w . d as large as the box allows, in the
direction of the hyperplane). The prediction at each iterate the gradient is taken at is checked too (the reference
checks only the extrapolated point), which can only find more or closer adversarial points. `fab_t` lets a point
leave the batch as soon as it has an adversarial point within its eps (the reference refines every point for all
steps; the robust accuracy is the same, the returned point may be less minimal); it returns that point projected
onto the eps ball (a no-op up to float rounding) and x itself for points it did not break (as the reference).
Targets are the k-th largest non-true logits for every point (the reference attacks only correctly classified
points, where that is the (k+1)-th largest logit); a misclassified clean point is broken at once with norm 0 (the
reference skips it). Restarts of `fab_min_norm` re-run every point (each may find a closer point). Randomness from
the given generator.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from .apgd import over_targets, target_classes
from .common import bcast, per_row, project_linf, uniform

STEPS = 100
"""Iterations per run (AutoAttack's FAB-T setting)."""
TARGETS = 9
"""Target classes of FAB-T, one run each (AutoAttack's standard)."""
ALPHA_MAX = 0.1
"""Largest weight of the original point's projection in the extrapolation step (paper and AutoAttack, Linf)."""
ETA = 1.05
"""Overshoot of the projections (paper and AutoAttack)."""
BETA = 0.9
"""Backward step towards the original point once adversarial (paper and AutoAttack)."""
START_RADIUS = 0.3
"""`fab_min_norm`'s cap on the random-restart radius while no adversarial point is known (the reference's default
Linf eps)."""


def fab_t(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, *, generator: torch.Generator,
          steps: int = STEPS, n_targets: int = TARGETS, restarts: int = 1, alpha_max: float = ALPHA_MAX,
          eta: float = ETA, beta: float = BETA) -> Tensor:
    """FAB-T (Linf): x [B, ...] in [0, 1], y [B], eps a number or one per point [B] -> x_adv [B, ...]: per point,
    the closest adversarial point found if within eps, else x. `restarts` runs per target class (the first from
    x, later ones from random points). Call inside `attack_mode(model)`."""
    with torch.no_grad():
        targets = target_classes(model(x), y, n_targets)  # [B, K]

    def run(xs: Tensor, ys: Tensor, es: Tensor, ts: Tensor, restart: int) -> tuple[Tensor, Tensor]:
        start = xs if restart == 0 else _random_start(xs, es / 2.0, generator)  # best norm > eps: radius eps / 2
        best, norm = _single_run(model, xs, ys, ts[:, None], start, es, steps, alpha_max, eta, beta)
        hit = norm <= es  # [n]
        return torch.where(bcast(hit, xs), project_linf(best, xs, bcast(es, xs)), xs), hit

    return over_targets(run, x, y, per_row(eps, x), targets, restarts)


def fab_min_norm(model: nn.Module, x: Tensor, y: Tensor, *, generator: torch.Generator,
                 target: int | Tensor | None = None, steps: int = STEPS, restarts: int = 1,
                 alpha_max: float = ALPHA_MAX, eta: float = ETA, beta: float = BETA,
                 start_radius: float = START_RADIUS) -> tuple[Tensor, Tensor]:
    """FAB without a radius: the closest misclassified point found per point. target: None (untargeted: every
    other class's boundary is linearised each step), one class or one per point [B]. Returns (x_adv [B, ...], x
    where nothing was found; norm [B], the Linf norm of x_adv - x, inf where nothing was found). Restart r > 0
    starts at a random point at distance min(best norm so far, start_radius) / 2 (Linf) from x."""
    n, classes = x.shape[0], None
    if target is None:
        with torch.no_grad():
            classes = model(x[:1]).shape[1]
        others = torch.arange(classes, device=x.device).expand(n, classes)  # [B, C]
        cands = others[others != y[:, None]].view(n, classes - 1)  # [B, C - 1] every class but y
    else:
        cands = torch.as_tensor(target, device=x.device).long().expand(n)[:, None]  # [B, 1]
    best, norm = x.clone(), torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    for restart in range(max(1, restarts)):
        start = x if restart == 0 else _random_start(x, norm.clamp(max=start_radius) / 2.0, generator)
        adv, found = _single_run(model, x, y, cands, start, None, steps, alpha_max, eta, beta)
        better = found < norm
        best[better], norm = adv[better], torch.where(better, found, norm)
    return best, norm


def project_hyperplane_box(p: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """d [R, D] of least Linf norm with w . (p + d) = b and 0 <= p + d <= 1, for rows p [R, D] in [0, 1],
    w [R, D], b [R].

    Exact. Flip the signs so that c = b - w . p >= 0; moving coordinate i by up to tau in the direction of
    sign(w_i), within its room r_i (1 - p_i or p_i), reaches f(tau) = sum_i |w_i| min(tau, r_i): piecewise linear,
    increasing and concave, with breakpoints at the rooms. Solve f(tau) = c by Newton's method from tau = 0: on
    the piece at tau, f(t) = sum_{r_i <= tau} |w_i| r_i + t sum_{r_i > tau} |w_i|, whose root is the next tau.
    A concave function's tangent lies above it, so every iterate stays at or below the root and the set of
    coordinates still moving only shrinks; once it stops shrinking, the piece is the root's and tau is exact (the
    same formula on the same set, so the iteration stops on a repeated value). At most D + 1 iterations, 3-4 on
    MNIST's FAB steps, each a few passes over [R, D]: cheaper than sorting the rooms (the textbook solution, and
    the reference code's), which took most of a FAB step's time. If f never reaches c (the box keeps the
    hyperplane out of reach), tau = inf: every coordinate moves to the end of its room. Computed in the inputs'
    dtype: float32 for FAB's iterates (tau to a relative ~1e-6, below the iterates' own rounding; float64 took 2.4x
    as long)."""
    c = b.to(w) - torch.linalg.vecdot(w, p)  # [R]
    w = w * torch.where(c < 0, -1.0, 1.0).to(w)[:, None]
    c = c.abs()
    # Elementwise work in floating point only: on CPU, torch's kernels that read or write bool tensors (where,
    # comparisons into bool, bool -> float) run 5-30x slower than float ones; a comparison written into a float
    # tensor (`out=`) runs at float speed.
    up = torch.gt(w, 0.0, out=torch.empty_like(w))  # [R, D] 1.0 where the coordinate moves up, else 0.0
    room = up.sub_(p).abs_()  # [R, D] 1 - p moving up, p moving down (exact for p in [0, 1])
    weight = w.abs()
    reach = weight * room  # [R, D] what each coordinate adds to f once tau passes its room
    total = reach.sum(1)  # [R] f's largest value
    reachable = total >= c
    tau = torch.zeros_like(c)  # [R]
    moving = torch.empty_like(w)  # [R, D] 1.0 where the coordinate's room is not used up at tau, else 0.0
    for iteration in itertools.count():
        torch.gt(room, tau[:, None], out=moving)
        slope = torch.linalg.vecdot(weight, moving)  # [R]
        stopped = total - torch.linalg.vecdot(reach, moving)  # [R] what the used-up coordinates add
        root = (c - stopped) / slope.clamp_min(torch.finfo(c.dtype).tiny)  # [R] the root of f's piece at tau
        grow = reachable & (root > tau)
        # Most rows need two steps; checking from the third iteration on spares CUDA a host sync per iteration.
        if iteration >= 2 and not bool(grow.any()):
            break
        tau = torch.where(grow, root, tau)
    tau = torch.where(reachable, tau, float("inf"))
    return torch.minimum(room, tau[:, None]).mul_(w.sign_())


def _random_start(x: Tensor, radius: Tensor, generator: torch.Generator) -> Tensor:
    """x + radius u / ||u||_inf clipped to [0, 1], u ~ U[-1, 1]; radius [B]."""
    u = uniform(x.shape, generator, x.device).mul_(2.0).sub_(1.0)  # [B, ...]
    u = u / bcast(u.flatten(1).abs().amax(1).clamp_min(1e-12), x)
    return (x + bcast(radius, x) * u).clamp(0.0, 1.0)


def _boundary(model: nn.Module, x: Tensor, y: Tensor, cands: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """g_k = z_k - z_y at x [m, ...] for the classes cands [m, K], their input gradients, and the logits:
    (g [m, K], grad [m, K, D], logits [m, C]); one forward and K backward passes."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)  # [m, C]
        g = logits.gather(1, cands) - logits.gather(1, y[:, None])  # [m, K]
    k = cands.shape[1]
    grads = [torch.autograd.grad(g[:, j].sum(), x, retain_graph=j < k - 1)[0].flatten(1) for j in range(k)]
    return g.detach(), grads[0][:, None] if k == 1 else torch.stack(grads, 1), logits.detach()


def _single_run(model: nn.Module, x0: Tensor, y: Tensor, cands: Tensor, start: Tensor, stop: Tensor | None,
                steps: int, alpha_max: float, eta: float, beta: float) -> tuple[Tensor, Tensor]:
    """One FAB run from `start` towards the boundaries of the classes cands [B, K]. Returns (the closest
    misclassified point found [B, ...], x0 where none; its Linf distance to x0 [B], inf where none). With `stop`
    [B], a point leaves the batch once it has a point within its stop distance."""
    shape, n = x0.shape, x0.shape[0]
    out = x0.flatten(1).clone()  # [B, D] the closest misclassified point found per point
    norm = torch.full((n,), float("inf"), dtype=x0.dtype, device=x0.device)  # [B] its distance to x0
    s = {"idx": torch.arange(n, device=x0.device), "x0": x0.flatten(1), "x": start.flatten(1), "y": y,
         "c": cands, "norm": norm.clone(), **({} if stop is None else {"stop": stop})}  # per-point state
    for _ in range(steps):
        g, grad, logits = _boundary(model, s["x"].view(-1, *shape[1:]), s["y"], s["c"])  # [m, K], [m, K, D]
        _record(s, logits.argmax(1) != s["y"], s["x"], out, norm)  # the iterate itself (e.g. a wrong start)
        if g.shape[1] == 1:  # targeted: the one boundary
            w, g_j = grad[:, 0], g[:, 0]  # [m, D], [m]
        else:
            rows = torch.arange(g.shape[0], device=g.device)
            j = (g.abs() / (grad.abs().sum(2) + 1e-12)).argmin(1)  # [m] nearest linearised boundary
            w, g_j = grad[rows, j], g[rows, j]
        x, x0 = s["x"], s["x0"]  # [m, D]
        b = torch.linalg.vecdot(w, x) - g_j  # [m] the hyperplane w . z = b
        d = project_hyperplane_box(torch.cat((x, x0)), torch.cat((w, w)), torch.cat((b, b)))  # [2m, D]
        d_x, d_x0 = d.split(x.shape[0])
        size = d.abs().amax(1).clamp_min(1e-8)  # [2m] Linf norms (torch's vector_norm(inf) is ~5x slower on CPU)
        size_x, size_x0 = size.split(x.shape[0])
        alpha = (size_x / (size_x + size_x0)).clamp(max=alpha_max)[:, None]  # [m, 1]
        x = torch.lerp(x.add(d_x, alpha=eta), x0.add(d_x0, alpha=eta), alpha).clamp_(0.0, 1.0)
        with torch.no_grad():
            adv = model(x.view(-1, *shape[1:])).argmax(1) != s["y"]  # [m]
        _record(s, adv, x, out, norm)
        # x0 + beta (x - x0) where adversarial, else x (lerp's weight 1.0 returns x exactly; a where over [m, D] with a
        # bool mask is ~15x slower on CPU)
        s["x"] = torch.lerp(x0, x, torch.where(adv, beta, 1.0).to(x)[:, None])
        if stop is not None:
            done = s["norm"] <= s["stop"]
            if bool(done.any()):  # one host sync per step on CUDA
                s = {key: v[~done] for key, v in s.items()}
                if s["idx"].numel() == 0:
                    break
    return out.view(shape), norm


def _record(s: dict[str, Tensor], adv: Tensor, x: Tensor, out: Tensor, norm: Tensor) -> None:
    """Keep x [m, D] where it is misclassified (adv [m]) and closer to x0 than the point kept so far."""
    dist = (x - s["x0"]).abs_().amax(1)  # [m]
    better = adv & (dist < s["norm"])
    s["norm"] = torch.where(better, dist, s["norm"])
    rows = s["idx"][better]
    out[rows], norm[rows] = x[better], dist[better]
