"""Square Attack, Linf (Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV; reference code max-andr/square-attack, `square_attack_linf`).

Score-based black box: the model is only queried for logits, never differentiated, so gradient masking cannot
hide from it. As published:
* start at vertical stripes, x + eps * (random sign per example, channel and column), clipped to [0, 1];
* every iteration, **each example gets its own** square of side s at a random position, and its own random sign
  per channel: the square's perturbation is set to +-eps (signs redrawn until the square changes the point);
  the candidate is kept when it lowers the margin loss logit_y - max_{j != y} logit_j;
* s = round(sqrt(p * H * W)) clipped to [1, H - 1], with p halved on a fixed schedule (`p_schedule`) rescaled to
  the query budget; p_init = 0.8 (the paper's MNIST value and AutoAttack's default);
* an example is done once misclassified (margin <= 0); restarts run on the examples still standing.
ART's `SquareAttack` moves one square for the whole batch per iteration, a much weaker search; AutoAttack's
PyTorch port does the same for speed. Here the per-example squares are batched as masks.

Vectors [B, D] are treated as 1 x D images (a window of round(p * D) features); [B, C, L] as C x 1 x L.
"""

from __future__ import annotations

import math
from functools import lru_cache, partial

import torch
from torch import Tensor, nn

from .common import logits_of, margin, on_survivors, per_row, randint, random_sign

QUERIES = 5000
"""AutoAttack's standard budget per restart (the suite default is smaller; see robustness.py)."""
P_INIT = 0.8
"""Initial fraction of pixels in the square (the paper's MNIST setting; AutoAttack's default)."""
MAX_REDRAWS = 20
"""Sign redraws for a square that would leave the point unchanged (the reference loops until it changes)."""


def p_schedule(p_init: float, it: int, queries: int) -> float:
    """The reference's piecewise-constant schedule for p, with iterations rescaled to a 10,000-query budget."""
    it = int(it / queries * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256), (10000, 512)):
        if it <= bound:
            return p_init / div
    return p_init


def square_linf(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, *, generator: torch.Generator,
                queries: int = QUERIES, p_init: float = P_INIT, restarts: int = 1) -> Tensor:
    """Square Attack (Linf): x [B, ...] in [0, 1], y [B], eps a number or one per point [B] -> x_adv [B, ...].
    Forward passes only."""
    run = partial(_single_run, model, generator=generator, queries=queries, p_init=p_init)  # (x, y, eps) -> ...
    return on_survivors(run, x, y, per_row(eps, x), restarts)


def as_image(x: Tensor) -> Tensor:
    """[B, D] -> [B, 1, 1, D]; [B, C, L] -> [B, C, 1, L]; [B, C, H, W] unchanged (a view)."""
    if x.dim() == 2:
        return x[:, None, None, :]
    if x.dim() == 3:
        return x[:, :, None, :]
    return x


def window_size(p: float, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of the square for fraction p: s x s on images, 1 x round(p W) on 1-row inputs."""
    if height == 1:
        return 1, min(max(int(round(p * width)), 1), width - 1)
    side = min(max(int(round(math.sqrt(p * height * width))), 1), min(height, width) - 1)
    return side, side


def _single_run(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, generator: torch.Generator, queries: int,
                p_init: float) -> tuple[Tensor, Tensor]:
    """One run; returns (x_adv [B, ...], hit [B])."""
    shape, xi = x.shape, as_image(x)  # xi: [B, C, H, W]
    n, channels, height, width = xi.shape
    eps = eps.view(-1, 1, 1)  # [B, 1, 1]
    stripes = random_sign((n, channels, 1, width), generator, x.device)  # vertical stripes
    flat = xi.reshape(n, channels, height * width)  # [B, C, H W]: windows are gathered from and scattered into rows
    best = (xi + eps[..., None] * stripes).clamp(0.0, 1.0).reshape(n, channels, height * width)
    marg = margin(logits_of(model, best.view(shape)), y)  # [B] the first query
    out, hit = best.clone(), marg <= 0
    idx = (~hit).nonzero().squeeze(1)  # [m] examples still standing
    xc, yc, eps, best, marg = flat[idx], y[idx], eps[idx], best[idx], marg[idx]
    for it in range(queries - 1):
        if idx.numel() == 0:
            break
        window, square, before = _propose(xc, best, eps, p_schedule(p_init, it, queries), height, width, generator)
        candidate = best.scatter(2, window, square)  # [m, C, H W]
        new_marg = margin(logits_of(model, candidate.view(-1, *shape[1:])), yc)
        better = new_marg < marg  # [m]
        # Write the improved windows into best in place: only [m, C, k] elements, and no host sync on CUDA (unlike
        # best[better] = ...); a torch.where over all of [m, C, H W] took ~4% of a query's time on CPU.
        best.scatter_(2, window, torch.where(better[:, None, None], square, before))
        marg = torch.where(better, new_marg, marg)
        done = marg <= 0
        if bool(done.any()):  # one host sync per iteration on CUDA
            out[idx[done]], hit[idx[done]] = best[done], True
            keep = ~done
            idx, xc, yc, eps, best, marg = idx[keep], xc[keep], yc[keep], eps[keep], best[keep], marg[keep]
    out[idx] = best
    return out.view(shape), hit


def _propose(x: Tensor, best: Tensor, eps: Tensor, p: float, height: int, width: int,
             generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """One candidate per example: its current best point [m, C, H W] with a fresh +-eps square at its own random
    position, signs per channel redrawn (up to MAX_REDRAWS times) until the candidate differs from `best`. Only the
    windows are computed: returns (window [m, C, k], the flat pixel indices, k = the window's pixels, a few dozen
    after the first queries; square [m, C, k], their new values; best's values there [m, C, k]); the candidate is
    `best` with the square written in."""
    m, channels, _ = x.shape
    window = _square_windows(m, height, width, p, generator, x.device)[:, None, :].expand(m, channels, -1)
    x_win, best_win = x.gather(2, window), best.gather(2, window)  # [m, C, k]
    signs = eps * random_sign((m, channels, 1), generator, x.device)  # [m, C, 1]
    square = (x_win + signs).clamp_(0.0, 1.0)
    unchanged = (square == best_win).flatten(1).all(1)  # [m] squares that changed nothing
    if channels == 1:
        # One channel: the only other draw is the opposite sign, and it changes every pixel of the square (for
        # x in [0, 1] and eps > 0, clip(x + eps) != clip(x - eps)); so flipping is exactly the distribution of
        # the reference's redraw-until-changed loop, in one pass (and no host sync on CUDA).
        return window, torch.where(unchanged[:, None, None], (x_win - signs).clamp_(0.0, 1.0), square), best_win
    redo = unchanged.nonzero().squeeze(1)  # [r]
    for _ in range(MAX_REDRAWS):
        if redo.numel() == 0:  # one host sync per iteration on CUDA
            break
        signs = eps[redo] * random_sign((redo.numel(), channels, 1), generator, x.device)
        square[redo] = (x_win[redo] + signs).clamp_(0.0, 1.0)
        redo = redo[(square[redo] == best_win[redo]).flatten(1).all(1)]
    return window, square, best_win


def _square_windows(m: int, height: int, width: int, p: float, generator: torch.Generator,
                    device: torch.device) -> Tensor:
    """[m, k] flat pixel indices (row * W + column) of one window of `window_size(p)` (k = rows x cols pixels)
    per example, at a uniform position (top-left corner in [0, H - rows) x [0, W - cols), as the reference's
    randint(0, h - s))."""
    rows, cols = window_size(p, height, width)
    top = randint(height - rows, m, generator, device) if height > 1 else torch.zeros(m, dtype=torch.long,
                                                                                       device=device)
    left = randint(width - cols, m, generator, device)
    return (top * width + left)[:, None] + _window_offsets(rows, cols, width, device)  # [m, k]


@lru_cache(maxsize=64)
def _window_offsets(rows: int, cols: int, width: int, device: torch.device) -> Tensor:
    """[k] a window's flat pixel indices relative to its top-left corner (cached: the window's size changes only
    a few times per run, and building it took a handful of small ops per query)."""
    r, c = torch.arange(rows, device=device), torch.arange(cols, device=device)
    return (r[:, None] * width + c[None, :]).flatten()
