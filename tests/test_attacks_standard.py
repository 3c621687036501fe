"""AutoAttack's standard attacks beyond APGD-CE: APGD-DLR, APGD-T and FAB-T, against references: the DLR losses and
target choice by hand, FAB's minimal perturbation of a linear model in closed form (box inactive) and by linear
programming (box active), strength against APGD-CE on a trained MLP, the box and the ball, and determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attack_models import accuracy, digits, gen, robust_accuracy, trained_mlp
from torch import nn

from learnbench.attacks.apgd import apgd_ce, apgd_dlr, apgd_t, dlr_loss, dlr_targeted_loss, target_classes
from learnbench.attacks.common import attack_mode
from learnbench.attacks.fab import fab_min_norm, fab_t, project_hyperplane_box

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dlr_losses_by_hand():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0], [1.0, 4.0, 2.0, 3.0], [0.0, -2.0, 5.0, 1.0]])
    y = torch.tensor([0, 1, 2])
    # sorted: 4 3 2 1 | 4 3 2 1 | 5 1 0 -2
    expected = [-(1 - 4) / (4 - 2), -(4 - 3) / (4 - 2), -(5 - 1) / (5 - 0)]
    torch.testing.assert_close(dlr_loss(logits, y), torch.tensor(expected))
    t = torch.tensor([3, 0, 1])
    expected = [-(1 - 3) / (4 - (2 + 1) / 2), -(4 - 1) / (4 - (2 + 1) / 2), -(5 + 2) / (5 - (0 - 2) / 2)]
    torch.testing.assert_close(dlr_targeted_loss(logits, y, t), torch.tensor(expected))
    with pytest.raises(ValueError):
        dlr_targeted_loss(logits[:, :3], y.clamp(max=2), t.clamp(max=2))


def test_targets_are_the_largest_non_true_logits():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 1.0], [0.5, 3.0, -1.0, 2.0, 1.0]])
    y = torch.tensor([1, 3])
    assert target_classes(logits, y, 9).tolist() == [[3, 4, 0, 2], [1, 4, 0, 2]]  # clipped to C - 1 = 4
    assert target_classes(logits, y, 2).tolist() == [[3, 4], [1, 4]]


def _linear(w: torch.Tensor, b: torch.Tensor) -> nn.Linear:
    model = nn.Linear(w.shape[1], w.shape[0]).double()
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.copy_(b)
    return model


@pytest.mark.parametrize("classes", [2, 3])
def test_fab_finds_the_closed_form_minimum_on_a_linear_model(classes):
    torch.manual_seed(0)
    d, n = 20, 8
    w, b = torch.randn(classes, d, dtype=torch.float64), torch.zeros(classes, dtype=torch.float64)
    if classes == 3:
        b[2] = -100.0  # a class that never competes: misclassified means z_1 >= z_0
    model = _linear(w, b)
    x = 0.5 + 0.02 * torch.randn(n, d, dtype=torch.float64)
    with torch.no_grad():
        z = model(x)
    y = (z[:, 1] > z[:, 0]).long()  # the predicted class of the two; the target is the other one
    t = 1 - y
    wy, wt = w[y], w[t]
    exact = (z.gather(1, y[:, None]) - z.gather(1, t[:, None])).squeeze(1) / (wy - wt).abs().sum(1)
    assert exact.max() < 0.4  # the box [0, 1] is inactive
    with attack_mode(model):
        adv, norm = fab_min_norm(model, x, y, generator=gen(), target=t, steps=100)
    assert ((norm - exact) / exact).abs().max() < 0.01, (norm / exact)
    torch.testing.assert_close(norm, (adv - x).abs().amax(1))
    with torch.no_grad():
        za = model(adv)
    gap = (za.gather(1, y[:, None]) - za.gather(1, t[:, None])).squeeze(1)  # <= 0: adversarial for t
    assert (gap <= 1e-9 * za.abs().amax(1)).all(), gap


def test_fab_finds_the_linear_programming_minimum_with_the_box_active():
    linprog = pytest.importorskip("scipy.optimize").linprog
    torch.manual_seed(1)
    d, n = 12, 6
    w, b = torch.randn(2, d, dtype=torch.float64), torch.tensor([2.0, 0.0], dtype=torch.float64)
    model = _linear(w, b)
    x = torch.rand(n, d, dtype=torch.float64)
    x = torch.where(x > 0.5, 0.9 + 0.1 * x, 0.1 * x)  # near the box's faces
    y, t = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)
    with torch.no_grad():
        z = model(x)
    assert (z[:, 0] > z[:, 1]).all()
    v = (w[1] - w[0]).numpy()  # z_t - z_y = v . x + (b_t - b_y)
    exact, free = [], []
    for i in range(n):
        xi, c = x[i].numpy(), (z[i, 0] - z[i, 1]).item()
        # variables (d_1 .. d_D, s): min s  s.t.  |d_j| <= s,  v . d >= c,  0 <= x + d <= 1
        cost = np.r_[np.zeros(d), 1.0]
        a_ub = np.vstack([np.c_[np.eye(d), -np.ones(d)], np.c_[-np.eye(d), -np.ones(d)], np.r_[-v, 0.0]])
        b_ub = np.r_[np.zeros(2 * d), -c]
        res = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=[(-a, 1 - a) for a in xi] + [(0, None)], method="highs")
        assert res.status == 0
        exact.append(res.fun)
        free.append(c / np.abs(v).sum())
    exact = torch.tensor(exact, dtype=torch.float64)
    assert (exact > 1.05 * torch.tensor(free, dtype=torch.float64)).all(), "the box should be active"
    with attack_mode(model):
        adv, norm = fab_min_norm(model, x, y, generator=gen(), target=t, steps=100)
    assert ((norm - exact) / exact).abs().max() < 0.01, (norm / exact)
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    with torch.no_grad():
        assert (model(adv).argmax(1) == t).all()


@pytest.mark.parametrize("rows, d, image_like", [(20, 7, False), (8, 300, True)])
def test_projection_is_the_linear_programming_solution(rows, d, image_like):
    linprog = pytest.importorskip("scipy.optimize").linprog
    torch.manual_seed(2)
    p, w = torch.rand(rows, d, dtype=torch.float64), torch.randn(rows, d, dtype=torch.float64)
    if image_like:  # MNIST-like: most pixels exactly 0 or 1, so many rooms tie (Newton's pieces merge)
        p = torch.where(p < 0.6, 0.0, torch.where(p > 0.85, 1.0, p))
    w[0, :3] = 0.0  # coordinates the hyperplane ignores
    # hyperplanes at distances of up to ~0.6 of what the box allows, so the solution crosses many breakpoints
    scale = 0.25 * w.abs().sum(1) if image_like else 1.0
    b = (w * p).sum(1) + scale * torch.randn(rows, dtype=torch.float64)
    got = project_hyperplane_box(p, w, b)
    single = project_hyperplane_box(p.float(), w.float(), b.float())  # FAB's iterates are float32
    assert single.dtype == torch.float32 and torch.allclose(single.double(), got, rtol=1e-4, atol=1e-5)
    for i in range(rows):
        pi, wi = p[i].numpy(), w[i].numpy()
        a_ub = np.vstack([np.c_[np.eye(d), -np.ones(d)], np.c_[-np.eye(d), -np.ones(d)]])
        res = linprog(np.r_[np.zeros(d), 1.0], A_ub=a_ub, b_ub=np.zeros(2 * d), A_eq=np.r_[wi, 0.0][None],
                      b_eq=[b[i].item() - wi @ pi], bounds=[(-a, 1 - a) for a in pi] + [(0, None)], method="highs")
        if res.status == 2:  # out of reach in the box: the corner closest to the hyperplane
            gap = b[i].item() - wi @ pi
            expected = np.where(np.sign(wi) * np.sign(gap) > 0, 1 - pi, -pi) * (wi != 0)
            np.testing.assert_allclose(got[i].numpy(), expected, atol=1e-12)
            continue
        assert res.status == 0
        assert got[i].abs().max().item() == pytest.approx(res.fun, rel=1e-9, abs=1e-12)
        assert (wi @ (pi + got[i].numpy())) == pytest.approx(b[i].item(), rel=1e-9, abs=1e-9)
        assert (p[i] + got[i]).min() >= -1e-15 and (p[i] + got[i]).max() <= 1 + 1e-15


@pytest.mark.slow
def test_targeted_attacks_are_at_least_as_strong_as_apgd_ce():
    model, (_, _, x, y) = trained_mlp(), digits()
    x, y, eps = x[:300], y[:300], 0.08
    clean = accuracy(model, x, y)
    with attack_mode(model):
        ce = robust_accuracy(model, apgd_ce(model, x, y, eps, generator=gen()), x, y)
        targeted = robust_accuracy(model, apgd_t(model, x, y, eps, generator=gen()), x, y)
        fab = robust_accuracy(model, fab_t(model, x, y, eps, generator=gen()), x, y)
        dlr = robust_accuracy(model, apgd_dlr(model, x, y, eps, generator=gen()), x, y)
    assert ce < clean - 0.2 and dlr < clean - 0.2 and fab < clean - 0.2, (clean, ce, dlr, fab)
    assert targeted <= ce + 1 / 300, (targeted, ce)  # at most one point of noise


def _tiny(kind: str, scale: float) -> tuple[nn.Module, tuple[int, ...]]:
    if kind == "image":
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
        shape = (1, 6, 6)
    else:
        model, shape = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)), (12,)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model, shape


STANDARD = {
    "apgd-dlr": lambda m, x, y, e, g: apgd_dlr(m, x, y, e, generator=g, steps=8, restarts=2),
    "apgd-t": lambda m, x, y, e, g: apgd_t(m, x, y, e, generator=g, steps=8, n_targets=3, restarts=2),
    "fab-t": lambda m, x, y, e, g: fab_t(m, x, y, e, generator=g, steps=8, n_targets=3, restarts=2),
}


@pytest.mark.parametrize("name", sorted(STANDARD))
@pytest.mark.parametrize("kind", ["image", "vector"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_stay_in_the_box_and_the_ball_and_repeat_with_the_seed(name, kind, scale):
    torch.manual_seed(3)
    model, shape = _tiny(kind, scale)
    x = torch.rand(9, *shape)
    x[0], x[1] = 0.0, 1.0  # points on the box's corners
    y = torch.randint(0, 5, (9,))
    radius = torch.linspace(0.05, 1.0, 9)  # one radius per point
    with attack_mode(model):
        adv = STANDARD[name](model, x, y, radius, gen(7))
        again = STANDARD[name](model, x, y, radius, gen(7))
    assert torch.equal(adv, again)
    assert adv.shape == x.shape and torch.isfinite(adv).all()
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    size = (adv - x).flatten(1).abs().amax(1)
    assert (size <= radius * (1 + 1e-5) + 1e-6).all(), (size - radius).max().item()


def test_fab_min_norm_repeats_with_the_seed_and_restarts_never_worsen():
    model, (_, _, x, y) = trained_mlp(), digits()
    x, y = x[:40], y[:40]
    with attack_mode(model):
        one = fab_min_norm(model, x, y, generator=gen(5), steps=20)
        two = fab_min_norm(model, x, y, generator=gen(5), steps=20, restarts=3)
        again = fab_min_norm(model, x, y, generator=gen(5), steps=20, restarts=3)
    assert torch.equal(two[0], again[0]) and torch.equal(two[1], again[1])
    assert (two[1] <= one[1]).all()
    found = torch.isfinite(two[1])
    assert found.float().mean() > 0.9
    with torch.no_grad():
        assert (model(two[0][found]).argmax(1) != y[found]).all()
    torch.testing.assert_close(two[1][found], (two[0] - x)[found].flatten(1).abs().amax(1))
