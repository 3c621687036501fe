"""The attacks against references: a closed form (FGSM), an independent library (ART's PGD), the published
schedules (APGD's checkpoints, Square's p), and invariants (box and ball, no weight gradients, per-example squares)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from attack_models import accuracy, digits, gen, robust_accuracy, trained_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from learnbench.attacks import apgd_ce, attack_mode, fgsm, gaussian_noise, pgd_l2, pgd_linf, square_linf
from learnbench.attacks.apgd import apgd_t, checkpoints
from learnbench.attacks.fab import fab_t
from learnbench.attacks.square import _square_windows, p_schedule

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_fgsm_equals_closed_form_on_a_linear_model():
    torch.manual_seed(0)
    model = nn.Linear(20, 5)
    x, y, eps = torch.rand(16, 20), torch.randint(0, 5, (16,)), 0.1
    w, b = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    xn = x.double().numpy()
    logits = xn @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(16), y.numpy()] -= 1.0  # d CE / d logits = softmax - onehot
    expected = np.clip(xn + eps * np.sign(p @ w), 0.0, 1.0)  # d CE / d x = (softmax - onehot) W
    with attack_mode(model):
        got = fgsm(model, x, y, eps)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def test_pgd_agrees_with_art():
    pytest.importorskip("art", reason="ART (adversarial-robustness-toolbox) is not installed: "
                                       "pip install 'learnbench[peers]' to run this cross-check")
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    model, (_, _, x, y) = trained_mlp(), digits()
    eps, steps = 0.1, 40
    classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10,
                                   clip_values=(0.0, 1.0))
    attack = ProjectedGradientDescentPyTorch(classifier, norm=np.inf, eps=eps, eps_step=2.5 * eps / steps,
                                             max_iter=steps, num_random_init=1, batch_size=500, verbose=False)
    np.random.seed(0)  # ART draws its random start from numpy's global generator
    art_adv = torch.from_numpy(attack.generate(x=x.numpy(), y=y.numpy()))
    with attack_mode(model):
        ours = pgd_linf(model, x, y, eps, generator=gen(), steps=steps)
    ours_acc, art_acc = robust_accuracy(model, ours, x, y), robust_accuracy(model, art_adv, x, y)
    assert 0.2 < art_acc < accuracy(model, x, y) - 0.2, "eps should leave a mid-range accuracy to compare"
    assert abs(ours_acc - art_acc) <= 0.02, (ours_acc, art_acc)


def test_apgd_at_least_as_strong_as_pgd():
    model, (_, _, x, y) = trained_mlp(), digits()
    for eps in (0.05, 0.1):
        with attack_mode(model):
            pgd_acc = robust_accuracy(model, pgd_linf(model, x, y, eps, generator=gen()), x, y)
            apgd_acc = robust_accuracy(model, apgd_ce(model, x, y, eps, generator=gen()), x, y)
        assert apgd_acc <= pgd_acc + 0.004, (eps, apgd_acc, pgd_acc)  # at most 2 of 500 points of noise


class NoBackward(torch.autograd.Function):
    """Identity forward; any backward through it is an error (proves an attack never differentiates)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("the black-box attack asked for a gradient")


def test_square_lowers_accuracy_without_gradients():
    model, (_, _, x, y) = trained_mlp(), digits()
    blind = nn.Sequential(model)
    blind.forward = lambda inp: model(NoBackward.apply(inp.requires_grad_(True)))
    clean = accuracy(model, x, y)
    adv = square_linf(blind, x, y, 0.1, generator=gen(), queries=300)
    acc = robust_accuracy(model, adv, x, y)
    assert acc < clean - 0.2, (clean, acc)
    assert (adv - x).abs().max() <= 0.1 + 1e-6


def test_square_gives_each_example_its_own_square():
    windows = _square_windows(200, 28, 28, 0.05, gen(), torch.device("cpu"))  # [200, k] flat pixel indices
    side = int(round((0.05 * 28 * 28) ** 0.5))
    masks = torch.zeros(200, 28 * 28, dtype=torch.bool).scatter_(1, windows, True).view(200, 28, 28)
    assert (masks.flatten(1).sum(1) == side * side).all()  # side x side distinct pixels each
    for mask in masks:  # ... forming one square: the rows and columns it touches are side long
        rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
        assert rows.numel() == cols.numel() == side and rows[-1] - rows[0] == cols[-1] - cols[0] == side - 1
    corners = {tuple(m.nonzero()[0].tolist()) for m in masks}
    assert len(corners) > 100  # 200 independent positions out of 21 x 21


def test_square_p_schedule_is_the_published_one():
    # max-andr/square-attack, p_selection: halvings at 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10,000.
    assert [p_schedule(0.8, it, 10000) for it in (0, 10, 11, 50, 51, 500, 501, 9000)] == \
           [0.8, 0.8, 0.4, 0.4, 0.2, 0.1, 0.05, 0.8 / 512]
    assert p_schedule(0.8, 100, 1000) == p_schedule(0.8, 1000, 10000)  # rescaled to the budget


def test_apgd_checkpoints_follow_the_paper():
    # Croce & Hein 2020, Sec. 3.2: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert checkpoints(100) == [round(100 * q) for q in p[1:]]


def test_attacks_compute_no_weight_gradients_and_restore_the_model():
    model = copy.deepcopy(trained_mlp())
    _, _, x, y = digits()
    model.train()
    for p in model.parameters():
        p.grad = None  # the trainer's last step left gradients
    before = [p.requires_grad for p in model.parameters()]
    with attack_mode(model):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        pgd_linf(model, x[:50], y[:50], 0.1, generator=gen())
        apgd_ce(model, x[:50], y[:50], 0.1, generator=gen(), steps=10)
    assert all(p.grad is None for p in model.parameters())
    assert model.training and [p.requires_grad for p in model.parameters()] == before


def _tiny_model(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    if kind == "image":
        return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)), (1, 6, 6)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)), (12,)


ATTACKS = {
    "fgsm": ("linf", lambda m, x, y, e, g: fgsm(m, x, y, e)),
    "pgd-linf": ("linf", lambda m, x, y, e, g: pgd_linf(m, x, y, e, generator=g, steps=5, restarts=2)),
    "pgd-linf-full": ("linf", lambda m, x, y, e, g: pgd_linf(m, x, y, e, generator=g, steps=5, early_stop=False)),
    "pgd-l2": ("l2", lambda m, x, y, e, g: pgd_l2(m, x, y, e, generator=g, steps=5, restarts=2)),
    "apgd-ce": ("linf", lambda m, x, y, e, g: apgd_ce(m, x, y, e, generator=g, steps=12, restarts=2)),
    "square": ("linf", lambda m, x, y, e, g: square_linf(m, x, y, e, generator=g, queries=30)),
    "apgd-t": ("linf", lambda m, x, y, e, g: apgd_t(m, x, y, e, generator=g, steps=6, n_targets=2)),
    "fab-t": ("linf", lambda m, x, y, e, g: fab_t(m, x, y, e, generator=g, steps=6, n_targets=2)),
    "noise": ("l2", lambda m, x, y, e, g: gaussian_noise(x, e, generator=g)),
}


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(ATTACKS)), kind=st.sampled_from(["image", "vector"]),
       eps=st.floats(0.01, 1.5), seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 30.0]),
       per_point=st.booleans())
def test_every_attack_stays_in_the_box_and_the_ball(name, kind, eps, seed, scale, per_point):
    torch.manual_seed(seed)
    model, shape = _tiny_model(kind)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)  # large weights: saturated, near-zero gradients
    x = torch.rand(9, *shape)
    x[0] = 0.0
    x[1] = 1.0  # points on the box's corners
    y = torch.randint(0, 4, (9,))
    norm, attack = ATTACKS[name]
    eps = min(eps, 1.0) if norm == "linf" else eps
    radius = eps * torch.linspace(0.1, 1.0, 9) if per_point else torch.full((9,), eps)  # one radius per point
    with attack_mode(model):
        adv = attack(model, x, y, radius if per_point else eps, gen(seed))
    assert adv.shape == x.shape and torch.isfinite(adv).all()
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= radius * (1 + 1e-5) + 1e-6).all(), (name, (size - radius).max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_attacks_run_on_the_device(device):
    dev = torch.device(device)
    model = copy.deepcopy(trained_mlp()).to(dev)
    _, _, x, y = digits()
    xs, ys = x[:64].to(dev), y[:64].to(dev)
    with attack_mode(model):
        for norm, attack in ATTACKS.values():
            adv = attack(model, xs, ys, 0.1 if norm == "linf" else 0.5, gen())
            assert adv.device.type == dev.type


@pytest.mark.slow
def test_perf_attacks_smoke(capsys):
    pytest.importorskip("art", reason="ART is not installed: pip install 'learnbench[peers]'")
    from learnbench.cli import main

    code = main(["perf", "attacks", "--device", "cpu", "--dataset", "digits", "--examples", "100", "--steps", "10",
                 "--repeats", "1", "--epochs", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "ART ProjectedGradientDescentPyTorch" in out and "ratio learnbench / ART (same work)" in out
