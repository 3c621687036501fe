"""Backprop's second-order optimizers (issue 23): L-BFGS against the closed-form least-squares solution and its
counted evaluations; K-FAC against the exact natural gradient of a one-layer model, its damping limit, and its
declared FLOPs against torch's count of the operations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from learnbench import datasets, models
from learnbench.algorithms.backprop import Backprop, lbfgs_step
from learnbench.algorithms.kfac import KFACPreconditioner
from learnbench.spec import Batch, TaskInfo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lbfgs_solves_least_squares_to_the_closed_form() -> None:
    """A strictly convex quadratic: mean((X w - y)^2) over 64 points in 6 dimensions, float64."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(64, generator=generator, dtype=torch.float64)
    exact = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]  # [6]
    w = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=20, history_size=100, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-12, tolerance_change=1e-14)
    calls = 0

    def loss_fn() -> torch.Tensor:
        nonlocal calls
        calls += 1
        return ((x @ w - y) ** 2).mean()

    counted = 0
    for _ in range(3):
        _, evaluations = lbfgs_step(optimizer, loss_fn)
        counted += evaluations
    assert torch.allclose(w.detach(), exact, atol=1e-6, rtol=0), (w - exact).abs().max()
    assert counted == calls > 1


def test_lbfgs_counts_every_evaluation_as_example_passes() -> None:
    """forward_passes == (forward calls of the model, seen by a hook) x B; the line search makes several per step."""
    splits = datasets.load("digits")
    model = models.build({"kind": "mlp", "hidden": [16]}, splits.input_shape, splits.n_classes)
    forwards = 0

    def count(*_):
        nonlocal forwards
        forwards += 1
    model.register_forward_hook(count)
    trainer = Backprop(optimizer="lbfgs", batch_size=256, max_iter=5)
    task = TaskInfo(splits.input_shape, splits.n_classes, len(splits.train_y), torch.device("cpu"))
    trainer.setup(model, task, torch.Generator().manual_seed(0))
    passes = 0
    for step in range(3):
        batch = Batch(splits.train_x[256 * step:256 * (step + 1)], splits.train_y[256 * step:256 * (step + 1)])
        stats = trainer.step(batch)
        assert stats.forward_passes == stats.backward_passes and stats.extra_flops > 0
        passes += stats.forward_passes
    assert passes == forwards * 256 and forwards > 3


def one_layer(d: int = 5, classes: int = 4) -> nn.Module:
    """A linear softmax classifier with zero weights: every example's predictive distribution is uniform, so the
    Fisher is exactly E[a a^T] (x) H, the case where K-FAC is the Fisher (Martens & Grosse 2015, section 3)."""
    model = nn.Sequential(nn.Linear(d, classes))
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    return model


def exact_natural_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, damping: float) -> torch.Tensor:
    """(F + damping I)^-1 g of the mean cross-entropy, F = mean_n J_n^T (diag p_n - p_n p_n^T) J_n from explicit
    per-example Jacobians of the logits w.r.t. vec([W | b]) (row-major, the layout K-FAC's update uses)."""
    layer = model[0]
    theta = torch.cat([layer.weight, layer.bias[:, None]], dim=1).detach()  # [m, n]
    m, n = theta.shape

    def logits(flat: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        matrix = flat.reshape(m, n)
        return matrix[:, :-1] @ a + matrix[:, -1]

    fisher = torch.zeros(m * n, m * n, dtype=torch.float64)
    for a in x:
        jacobian = torch.autograd.functional.jacobian(lambda flat: logits(flat, a), theta.reshape(-1))  # [m, m*n]
        p = torch.softmax(logits(theta.reshape(-1), a), 0)
        fisher += jacobian.T @ (torch.diag(p) - torch.outer(p, p)) @ jacobian / len(x)
    flat = theta.reshape(-1).requires_grad_()
    loss = F.cross_entropy(torch.stack([logits(flat, a) for a in x]), y)
    gradient = torch.autograd.grad(loss, flat)[0]
    return torch.linalg.solve(fisher + damping * torch.eye(m * n, dtype=torch.float64), gradient).reshape(m, n)


def kfac_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, damping: float) -> torch.Tensor:
    """K-FAC's preconditioned [W | b] gradient (type-2 Fisher: the exact expectation over labels; no KL clip)."""
    kfac = KFACPreconditioner(model, (x.shape[1],), damping, factor_decay=0.0, kl_clip=0.0,
                              generator=torch.Generator().manual_seed(0), fisher="type-2")
    kfac.update_factors(x)
    kfac.update_inverses()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    kfac.precondition(lr=1.0)
    layer = model[0]
    return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)


@pytest.mark.parametrize("damping", [1e-3, 1e-1])
def test_kfac_is_the_exact_natural_gradient_of_a_one_layer_model(damping: float) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (12,), generator=generator)
    model = one_layer().double()
    expected = exact_natural_gradient(model, x, y, damping)
    got = kfac_update(model, x, y, damping)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-9), (got - expected).abs().max()


def test_kfac_with_infinite_damping_is_plain_sgd() -> None:
    """(A (x) G + d I)^-1 g -> g / d: times d, the plain gradient (SGD's step with lr / d)."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (16,), generator=generator)
    model = nn.Sequential(nn.Linear(5, 4)).double()  # random weights: any model, not only the exact case
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    plain = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], dim=1).clone()
    damping = 1e10
    assert torch.allclose(kfac_update(model, x, y, damping) * damping, plain, rtol=1e-6, atol=1e-12)


def test_declared_kfac_flops_match_the_counted_products() -> None:
    """One Linear layer 30 -> 7, batch 16: the factors (and the one forward and backward curvlinops runs for them)
    and the preconditioning, as torch's FLOP counter sees the matrix products, against `step_flops`' terms."""
    b, d, m = 16, 30, 7
    n = d + 1
    model = nn.Sequential(nn.Linear(d, m))
    x = torch.randn(b, d, generator=torch.Generator().manual_seed(3))
    kfac = KFACPreconditioner(model, (d,), 1e-3, 0.95, 0.0, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as factors:
        kfac.update_factors(x)
    model_passes = 2 * b * d * m * 2  # the forward (addmm) and the weight gradient (mm) of the one layer
    assert factors.get_total_flops() == model_passes + 2 * b * (n * n + m * m)
    kfac.update_inverses()
    F.cross_entropy(model(x), torch.zeros(b, dtype=torch.long)).backward()
    with FlopCounterMode(display=False) as preconditioning:
        kfac.precondition(lr=0.01)
    assert preconditioning.get_total_flops() == 4 * m * n * (m + n)
    # step_flops adds what the counter does not see: running averages, eigendecompositions, elementwise work
    declared = kfac.step_flops(b, factor_every=1, inverse_every=1)
    assert declared == 2 * b * (n * n + m * m) + 3 * (n * n + m * m) + 9 * (n ** 3 + m ** 3) \
        + 4 * m * n * (m + n) + 6 * m * n


@pytest.mark.parametrize("spec", [{"kind": "mlp", "hidden": [32]}, {"kind": "cnn"}], ids=["mlp", "cnn"])
def test_kfac_trains_and_counts_its_curvature_passes(spec: dict) -> None:
    """Linear and Conv2d layers (the cnn): the factors' extra passes are counted, and digits is learnt."""
    splits = datasets.load("digits")
    model = models.build(spec, splits.input_shape, splits.n_classes)
    trainer = Backprop(optimizer="kfac", batch_size=64, factor_every=2, inverse_every=4)
    task = TaskInfo(splits.input_shape, splits.n_classes, len(splits.train_y), torch.device("cpu"))
    trainer.setup(model, task, torch.Generator().manual_seed(0))
    passes = []
    for step in range(40):
        index = torch.arange(64 * step, 64 * (step + 1)) % len(splits.train_y)
        stats = trainer.step(Batch(splits.train_x[index], splits.train_y[index]))
        passes.append(stats.forward_passes)
    assert passes[:4] == [128, 64, 128, 64]  # the factors' extra forward every factor_every steps
    with torch.no_grad():
        accuracy = (trainer.eval_model()(splits.val_x).argmax(1) == splits.val_y).float().mean()
    assert accuracy > 0.8, accuracy


def test_kfac_is_refused_for_the_feedback_alignment_family() -> None:
    from learnbench.algorithms.feedback_alignment import FeedbackAlignment

    task = TaskInfo((64,), 10, 100, torch.device("cpu"))
    with pytest.raises(ValueError, match="true gradient"):
        FeedbackAlignment(optimizer="kfac").validate(task)
    FeedbackAlignment(optimizer="lbfgs").validate(task)  # L-BFGS on the rule's own direction is allowed


@pytest.mark.slow
@pytest.mark.parametrize("given", [{"optimizer": "lbfgs", "batch_size": 512, "max_iter": 5},
                                   {"optimizer": "kfac"}, {"optimizer": "kfac", "fisher": "type-2"}],
                         ids=["lbfgs", "kfac-mc", "kfac-type2"])
def test_second_order_backprop_passes_the_conformance_kit(given: dict) -> None:
    from learnbench.testing import check_trainer

    failed = [r.line() for r in check_trainer(Backprop, hparams=given) if not r.passed]
    assert not failed, failed
