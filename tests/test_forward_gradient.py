"""forward-gradient against autograd: both estimators are unbiased (the mean over 20,000 tangents lands within a
few standard errors of the true gradient, coordinate by coordinate and jointly), the jvp's directional derivative is
grad . v exactly, the declared cost matches the work, bad settings are refused, the conformance kit passes and a
short digits run learns."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from learnbench import datasets
from learnbench.algorithms.forward_gradient import (ForwardGradient, activity_estimate, activity_flops,
                                                    directional_derivatives, linear_head,
                                                    local_directional_derivatives, relu_follows)
from learnbench.cost import model_flops, optimizer_flops
from learnbench.models import build
from learnbench.spec import Batch, TaskInfo
from learnbench.testing import check_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
D, C = 5, 3
TASK = TaskInfo((D,), C, 64, CPU)
N_TANGENTS = 20_000


def data(n: int = 16, seed: int = 1, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, D, generator=g, dtype=dtype), torch.randint(0, C, (n,), generator=g)


def model(kind: str = "mlp", hidden=(8,), seed: int = 0, **spec) -> nn.Module:
    torch.manual_seed(seed)
    return build({"kind": kind, "hidden": list(hidden), **spec}, (D,), C).double()


def assert_unbiased(samples: torch.Tensor, truth: torch.Tensor) -> None:
    """`samples` [N, p]: N independent estimates of `truth` [p]. Every coordinate's mean lies within 5 standard
    errors of the truth (z test), the coordinates jointly pass a chi-square test on the sum of squared z scores, and
    the test has power: some coordinate of the truth is many standard errors away from zero."""
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    keep = se > 0  # exactly-zero coordinates (inactive ReLU units) must then be exactly right
    torch.testing.assert_close(mean[~keep], truth[~keep])
    z = (mean[keep] - truth[keep]) / se[keep]
    assert z.abs().max() < 5, f"largest |z| {z.abs().max():.2f}"
    assert stats.chi2.sf(float(z.pow(2).sum()), int(keep.sum())) > 1e-4
    assert (truth[keep].abs() / se[keep]).max() > 10  # a biased estimator could not pass unnoticed


# --- weight perturbation (Baydin et al.) ----------------------------------------------------------------------------

def weight_setting(seed: int = 0):
    net = model(hidden=(8,), seed=seed)
    x, y = data()
    params = {name: p.detach() for name, p in net.named_parameters()}
    truth = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    return net, x, y, params, torch.cat([t.flatten() for t in truth])


def test_weight_perturbed_estimate_is_unbiased():
    net, x, y, params, truth = weight_setting()
    g = torch.Generator().manual_seed(2)
    tangents = {name: torch.randn(N_TANGENTS, *p.shape, generator=g, dtype=p.dtype) for name, p in params.items()}
    _, d = directional_derivatives(net, params, tangents, x, y)  # [N]
    flat = torch.cat([t.flatten(1) for t in tangents.values()], 1)  # [N, n_params]
    assert_unbiased(d[:, None] * flat, truth)


def test_directional_derivative_is_grad_dot_tangent():
    net, x, y, params, truth = weight_setting()
    g = torch.Generator().manual_seed(3)
    for k in (1, 5):  # one tangent (plain jvp) and several (vmapped)
        tangents = {name: torch.randn(k, *p.shape, generator=g, dtype=p.dtype) for name, p in params.items()}
        loss, d = directional_derivatives(net, params, tangents, x, y)
        flat = torch.cat([t.flatten(1) for t in tangents.values()], 1)
        torch.testing.assert_close(d, flat @ truth, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(loss, F.cross_entropy(net(x), y))


def test_weight_step_hands_the_averaged_estimate_to_the_optimizer():
    """With plain SGD the parameter change is -lr * 1/K sum_k d_k v_k for the tangents the generator draws."""
    net, x, y, params, _ = weight_setting()
    before = {name: p.clone() for name, p in params.items()}
    trainer = ForwardGradient(perturb="weights", optimizer="sgd", lr=0.1, directions=3)
    trainer.setup(net, TASK, torch.Generator().manual_seed(4))
    trainer.step(Batch(x, y))
    g = torch.Generator().manual_seed(4)
    tangents = {name: torch.randn(3, *p.shape, generator=g, dtype=p.dtype) for name, p in before.items()}
    _, d = directional_derivatives(model(hidden=(8,)), before, tangents, x, y)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] - 0.1 * torch.tensordot(d, tangents[name], 1) / 3)


# --- activity perturbation with local losses (Ren et al.) -----------------------------------------------------------

def local_setting(kind: str, block: int, activation: str = "relu"):
    """Block `block` of a small network: its detached input, its local head, the batch, and autograd's gradient of
    its local loss (input detached) w.r.t. its Linear's weight and bias, flattened."""
    net = model(kind, hidden=(6, 6), activation=activation)
    x, y = data(n=4)
    h = x
    for i in range(block):  # the inputs the block sees: earlier blocks' outputs, detached
        h = (h + net.blocks[i](h)) if net.residual and i > 0 else net.blocks[i](h)
    h = h.detach()
    head = linear_head(6, C, torch.Generator().manual_seed(5), CPU, torch.float64)
    lin = net.blocks[block][0]
    out = net.blocks[block](h) + (h if net.residual and block > 0 else 0)
    truth = torch.autograd.grad(F.cross_entropy(F.linear(out, *head), y), [lin.weight, lin.bias])
    return net, h, y, head, torch.cat([t.flatten() for t in truth])


@pytest.mark.parametrize("kind,block,activation", [("mlp", 0, "relu"), ("mlp", 1, "relu"), ("resmlp", 1, "relu"),
                                                   ("mlp", 1, "tanh")])
def test_activity_perturbed_local_estimate_is_unbiased(kind, block, activation):
    net, h, y, head, truth = local_setting(kind, block, activation)
    lin, tail = net.blocks[block][0], net.blocks[block][1:]
    skip = h if net.residual and block > 0 else None
    with torch.no_grad():
        z = lin(h)
        u = torch.randn(N_TANGENTS, *z.shape, generator=torch.Generator().manual_seed(6), dtype=z.dtype)
        _, d = local_directional_derivatives(z, tail, head, y, u, skip)  # [N, B]
    mask = (z > 0) if relu_follows(tail) else torch.ones_like(z, dtype=torch.bool)
    grad_z = d[:, :, None] * u * mask  # [N, B, H]: one estimate per tangent
    weight = torch.einsum("nbh,bd->nhd", grad_z, h) / h.shape[0]
    samples = torch.cat([weight.flatten(1), grad_z.mean(1)], 1)  # [N, H*D + H]
    assert_unbiased(samples, truth)
    # The estimator the trainer uses averages the same samples.
    averaged = activity_estimate(d, u, z if relu_follows(tail) else None)
    torch.testing.assert_close(averaged, grad_z.mean(0))


def test_local_directional_derivative_is_grad_dot_tangent():
    net, h, y, head, _ = local_setting("resmlp", 1)
    lin, tail = net.blocks[1][0], net.blocks[1][1:]
    z = lin(h).detach().requires_grad_()
    out = tail(z) + h
    per_example = F.cross_entropy(F.linear(out, *head), y, reduction="none")
    grad_z = torch.autograd.grad(per_example.sum(), z)[0]  # row b: dCE_b/dz_b (examples are independent)
    u = torch.randn(7, *z.shape, generator=torch.Generator().manual_seed(7), dtype=z.dtype)
    with torch.no_grad():
        block_out, d = local_directional_derivatives(z.detach(), tail, head, y, u, h)
    torch.testing.assert_close(d, (u * grad_z).sum(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block_out, out.detach())


def test_activity_step_trains_heads_exactly_and_blocks_greedily():
    """One SGD step: the model's head moves by -lr times its exact gradient on the detached last hidden output;
    the first block's update matches the estimate rebuilt from the same tangents; no gradient crosses blocks."""
    net = model(hidden=(6, 6))
    x, y = data()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    trainer = ForwardGradient(perturb="activations", optimizer="sgd", lr=0.5, directions=2)
    trainer.setup(net, TASK, torch.Generator().manual_seed(8))
    heads = [tuple(p.detach().clone() for p in head) for head in trainer._heads]
    trainer.step(Batch(x, y))
    ref = model(hidden=(6, 6))
    hidden = ref.blocks[1](ref.blocks[0](x)).detach()
    w, b = ref.head.weight.detach().requires_grad_(), ref.head.bias.detach().requires_grad_()
    gw, gb = torch.autograd.grad(F.cross_entropy(F.linear(hidden, w, b), y), [w, b])
    torch.testing.assert_close(net.head.weight.detach(), before["head.weight"] - 0.5 * gw)
    torch.testing.assert_close(net.head.bias.detach(), before["head.bias"] - 0.5 * gb)
    g = torch.Generator().manual_seed(8)
    for _ in trainer._heads:  # setup drew the heads first
        torch.rand(C, 6, generator=g, dtype=torch.float64), torch.rand(C, generator=g, dtype=torch.float64)
    with torch.no_grad():
        z = ref.blocks[0][0](x)
        u = torch.randn(2, *z.shape, generator=g, dtype=z.dtype)
        _, d = local_directional_derivatives(z, ref.blocks[0][1:], heads[0], y, u)
        grad_z = activity_estimate(d, u, z)
    torch.testing.assert_close(net.blocks[0][0].weight.detach(), before["blocks.0.0.weight"] - 0.5 * grad_z.T @ x / 16)


# --- cost ---------------------------------------------------------------------------------------------------------

def digits_task() -> tuple[TaskInfo, Batch]:
    splits = datasets.load("digits")
    return TaskInfo((1, 8, 8), 10, splits.train_x.shape[0], CPU), Batch(splits.train_x[:64], splits.train_y[:64])


def test_declared_cost_of_weight_perturbation():
    task, batch = digits_task()
    torch.manual_seed(0)
    net = build({"kind": "mlp", "hidden": [32]}, (1, 8, 8), 10)
    trainer = ForwardGradient(perturb="weights", directions=4)
    trainer.setup(net, task, torch.Generator().manual_seed(0))
    stats_ = trainer.step(batch)
    n = sum(p.numel() for p in net.parameters())
    assert (stats_.forward_passes, stats_.backward_passes) == (64, 4 * 64)
    # 4 n normals, 2 * 4 n for the average of d_k v_k, and Adam's 14 FLOPs per parameter
    assert stats_.extra_flops == 3 * 4 * n + optimizer_flops(trainer._optimizer) == 3 * 4 * n + 14 * n


def test_declared_cost_of_activity_perturbation_matches_the_matrix_products():
    """Declared FLOPs (model forward per example x passes + extra) against FlopCounterMode's count of one step's
    matrix products: the same up to the elementwise work only the declaration counts and the local heads' forward,
    which the implementation repeats for their exact gradient."""
    task, batch = digits_task()
    torch.manual_seed(0)
    net = build({"kind": "mlp", "hidden": [32, 32]}, (1, 8, 8), 10)
    per_example = model_flops(net, (1, 8, 8))
    trainer = ForwardGradient(perturb="activations")
    trainer.setup(net, task, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        stats_ = trainer.step(batch)
    assert (stats_.forward_passes, stats_.backward_passes) == (64, 0)
    assert stats_.extra_flops == activity_flops(net, 10, 64, 1) + optimizer_flops(trainer._optimizer)
    declared = per_example.forward * 64 + stats_.extra_flops
    measured = counter.get_total_flops()
    assert 0.85 * measured < declared < 1.25 * measured, (declared, measured)


# --- validation -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hparams", [{"perturb": "outputs"}, {"optimizer": "lbfgs"}, {"directions": 0},
                                     {"batch_size": 0}, {"lr": -1.0}, {"lr": 0.0}, {"momentum": 1.0},
                                     {"weight_decay": -1e-4}, {"lr_decay": -1.0}])
def test_bad_hyper_parameters_are_rejected(hparams):
    with pytest.raises(ValueError):
        ForwardGradient(**hparams).validate()


@pytest.mark.parametrize("spec", [{"kind": "cnn"}, {"kind": "mlp", "hidden": [16], "norm": "batch"},
                                  {"kind": "mlp", "hidden": []}])
def test_activity_perturbation_refuses_models_it_cannot_train(spec):
    torch.manual_seed(0)
    net = build(spec, (1, 8, 8), 10)
    with pytest.raises(ValueError, match="perturb='activations'"):
        ForwardGradient(perturb="activations").setup(net, TaskInfo((1, 8, 8), 10, 64, CPU), torch.Generator())


@pytest.mark.parametrize("spec", [{"kind": "cnn"}, {"kind": "mlp", "hidden": [16], "norm": "batch"}])
def test_weight_perturbation_trains_any_model(spec):
    task, batch = digits_task()
    torch.manual_seed(0)
    net = build(spec, (1, 8, 8), 10)
    trainer = ForwardGradient(perturb="weights", directions=2)
    trainer.setup(net, task, torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in net.parameters()]
    stats_before = [b.clone() for name, b in net.named_buffers() if name.endswith("running_mean")]
    steps = [trainer.step(batch) for _ in range(3)]
    assert all(math.isfinite(float(s.loss)) for s in steps)
    assert all(not torch.equal(p, q) for p, q in zip(net.parameters(), before))
    running = [b for name, b in net.named_buffers() if name.endswith("running_mean")]
    assert all(not torch.equal(b, c) for b, c in zip(running, stats_before))  # BatchNorm's statistics still move
    assert steps[0].forward_passes == (2 if running else 1) * 64


# --- the kit and a short run ----------------------------------------------------------------------------------------

@dataclass(eq=False)
class WeightPerturbed(ForwardGradient):
    """The kit runs a trainer's defaults: this one defaults to weight perturbation."""

    name: ClassVar[str] = "forward-gradient-weights"
    perturb: str = "weights"


@pytest.mark.parametrize("cls", [ForwardGradient, WeightPerturbed])
def test_conformance_kit_passes(cls):
    failed = [r.line() for r in check_trainer(cls) if not r.passed]
    assert not failed, failed


@pytest.mark.parametrize("hparams,hidden,steps,floor", [
    ({"perturb": "activations"}, [64, 64], 300, 0.85),
    # Weight perturbation's variance grows with the parameter count: a small net, 16 tangents, plain SGD.
    ({"perturb": "weights", "directions": 16, "optimizer": "sgd", "lr": 0.02}, [16], 500, 0.5)])
@pytest.mark.slow
def test_short_digits_run_learns(hparams, hidden, steps, floor):
    splits = datasets.load("digits")
    torch.manual_seed(0)
    net = build({"kind": "mlp", "hidden": hidden}, (1, 8, 8), 10)
    trainer = ForwardGradient(**hparams)
    trainer.setup(net, TaskInfo((1, 8, 8), 10, splits.train_x.shape[0], CPU), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, splits.train_x.shape[0], (64,), generator=g)
        trainer.step(Batch(splits.train_x[idx], splits.train_y[idx]))
    with torch.no_grad():
        accuracy = (trainer.eval_model().eval()(splits.test_x).argmax(1) == splits.test_y).float().mean().item()
    assert accuracy > floor, accuracy  # chance is 0.1
