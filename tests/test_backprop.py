"""The backprop trainer against closed forms and a hand-written autograd loop."""

import pytest
import torch
import torch.nn.functional as F

from learnbench.algorithms.backprop import OPTIMIZERS, Backprop
from learnbench.models import build
from learnbench.spec import Batch, TaskInfo
from helpers import digits_batch

TASK = TaskInfo((1, 8, 8), 10, 1000, torch.device("cpu"))


def _data(n=256):
    return digits_batch(n)


def _model(seed=0):
    torch.manual_seed(seed)
    return build({"kind": "mlp", "hidden": [32]}, (1, 8, 8), 10)


def test_sgd_step_equals_hand_written_gradient_descent():
    x, y = _data()
    ours, ref = _model(), _model()
    trainer = Backprop(optimizer="sgd", lr=0.1, batch_size=32)
    trainer.setup(ours, TASK, torch.Generator())
    for i in range(5):
        xb, yb = x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]
        trainer.step(Batch(xb, yb))
        loss = F.cross_entropy(ref(xb), yb)
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        with torch.no_grad():
            for p, g in zip(ref.parameters(), grads):
                p -= 0.1 * g
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_first_adam_step_moves_every_weight_by_lr_times_sign():
    # Adam's first update is -lr * m/(sqrt(v)+eps) with m = g(1-b1)/(1-b1), v = g^2(1-b2)/(1-b2): -lr*g/(|g|+eps)
    x, y = _data()
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(F.cross_entropy(model(x[:32]), y[:32]), list(model.parameters()))
    trainer = Backprop(optimizer="adam", lr=1e-3, batch_size=32)
    trainer.setup(model, TASK, torch.Generator())
    trainer.step(Batch(x[:32], y[:32]))
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p - b, -1e-3 * g / (g.abs() + 1e-8), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_lowers_the_loss(optimizer):
    x, y = _data(512)
    model = _model()
    b = 512 if optimizer == "lbfgs" else 64  # L-BFGS is a full-batch method: 20 iterations on 64 examples overfit them
    trainer = Backprop(optimizer=optimizer, batch_size=b)
    trainer.setup(model, TASK, torch.Generator())
    first = float(trainer.step(Batch(x[:b], y[:b])).loss)
    for epoch in range(15 if b == 64 else 3):
        for i in range(512 // b):
            trainer.step(Batch(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]))
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) < 0.8 * first, optimizer


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "step"])
def test_schedules_follow_their_closed_forms(schedule):
    x, y = _data()
    trainer = Backprop(optimizer="sgd", lr=0.1, schedule=schedule, horizon_steps=20, step_every=5, step_gamma=0.5)
    trainer.setup(_model(), TASK, torch.Generator())
    lrs = []
    for _ in range(20):
        lrs.append(trainer._optimizer.param_groups[0]["lr"])
        trainer.step(Batch(x[:32], y[:32]))
    final = trainer._optimizer.param_groups[0]["lr"]
    if schedule == "cosine":
        assert lrs[0] == 0.1 and final == pytest.approx(0.0, abs=1e-12)
        assert lrs[10] == pytest.approx(0.05)  # half-way: (1 + cos(pi/2))/2 * 0.1
    elif schedule == "onecycle":
        assert max(lrs) == pytest.approx(0.1, rel=0.05) and lrs[0] < 0.01 and final < 1e-3
    else:
        assert lrs[4] == 0.1 and lrs[5] == 0.05 and lrs[19] == 0.1 * 0.5 ** 3


def test_invalid_values_fail_in_setup_not_init():
    trainer = Backprop(optimizer="lion")  # __init__ stores only
    with pytest.raises(ValueError, match="optimizer"):
        trainer.setup(_model(), TASK, torch.Generator())
    with pytest.raises(ValueError, match="horizon_steps"):
        Backprop(schedule="cosine").setup(_model(), TASK, torch.Generator())
    with pytest.raises(ValueError, match="CUDA"):
        Backprop(amp=True).setup(_model(), TASK, torch.Generator())
