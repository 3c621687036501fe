"""pepita against a hand computation of Dellaferrera & Kreiman's rule: one update (with and without dropout) equals
the rule written out with plain tensors, momentum is the paper's velocity form, F and the weights have the
documented distributions, the learning rate decays at the epoch milestones, the declared cost matches the work, bad
settings and models are refused, the conformance kit passes and a short digits run learns."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch.utils.flop_counter import FlopCounterMode

from learnbench import datasets
from learnbench.algorithms.pepita import Pepita, pepita_flops, projection_matrix
from learnbench.cost import model_flops, optimizer_flops
from learnbench.errors import UsageError
from learnbench.models import build
from learnbench.registry import entry_for_class, registered
from learnbench.runner import run_trial
from learnbench.spec import Batch, TaskInfo
from learnbench.testing import check_trainer

from helpers import make_trials

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
D, C, B = 7, 3, 5
TASK = TaskInfo((D,), C, 640, CPU)


def net(hidden=(6,), seed: int = 0, **spec) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build({"kind": "mlp", "hidden": list(hidden), **spec}, (D,), C).double()


def data(n: int = B, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, D, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)


def weights(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    linears = [block[0] for block in model.blocks] + [model.head]
    return [(lin.weight.detach().clone(), lin.bias.detach().clone()) for lin in linears]


def hand_rule(params, x, y, F, masks=None):
    """The paper's Algorithm 1 with plain tensors (biases as weights on a constant 1), batch-averaged:
    e = softmax(out) - onehot(y); x_mod = x + F e; hidden dW_l = (h_l - h_l^mod) (h_(l-1)^mod)^T,
    last dW_L = e (h_(L-1)^mod)^T. Returns [(dW, db)] per layer."""
    def run(inp):
        acts = [inp]
        for i, (w, b) in enumerate(params):
            a = acts[-1] @ w.T + b
            if i < len(params) - 1:
                a = torch.clamp(a, min=0)
                if masks is not None:
                    a = a * masks[i]
            acts.append(a)
        return acts

    h = run(x)
    e = torch.exp(h[-1]) / torch.exp(h[-1]).sum(1, keepdim=True) - torch.eye(C, dtype=x.dtype)[y]
    h_mod = run(x + e @ F.T)
    out = []
    for i in range(len(params)):
        delta = e if i == len(params) - 1 else h[i + 1] - h_mod[i + 1]
        dw = sum(torch.outer(delta[b], h_mod[i][b]) for b in range(len(y))) / len(y)
        out.append((dw, delta.sum(0) / len(y)))
    return out


# --- the rule ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden", [(6,), (6, 5)])
def test_one_update_equals_the_hand_computed_rule(hidden):
    model, (x, y) = net(hidden), data()
    trainer = Pepita(lr=0.3, momentum=0.0, dropout=0.0, init="model")
    trainer.setup(model, TASK, torch.Generator().manual_seed(2))
    before = weights(model)
    F = projection_matrix(D, C, 0.05, torch.Generator().manual_seed(2), CPU, torch.float64)  # setup draws F first
    torch.testing.assert_close(trainer._projection, F, rtol=0, atol=0)
    trainer.step(Batch(x, y))
    for (w, b), (dw, db), (w1, b1) in zip(before, hand_rule(before, x, y, F), weights(model)):
        assert dw.abs().max() > 1e-6  # every layer moves: the test would see a wrong rule
        torch.testing.assert_close(w1, w - 0.3 * dw, rtol=0, atol=1e-6)
        torch.testing.assert_close(b1, b - 0.3 * db, rtol=0, atol=1e-6)


def test_dropout_uses_one_mask_for_both_passes():
    """Masks are drawn from the run's generator after F, one [B, n_l] per hidden layer in order, Bernoulli(keep) /
    keep; the same mask multiplies both passes' hidden activities."""
    model, (x, y) = net((6, 5)), data()
    trainer = Pepita(lr=0.3, momentum=0.0, dropout=0.5, init="model")
    trainer.setup(model, TASK, torch.Generator().manual_seed(3))
    before = weights(model)
    g = torch.Generator().manual_seed(3)
    F = projection_matrix(D, C, 0.05, g, CPU, torch.float64)
    masks = [torch.empty(B, n, dtype=torch.float64).bernoulli_(0.5, generator=g) / 0.5 for n in (6, 5)]
    assert 0 < float((masks[0] == 0).float().mean()) < 1
    trainer.step(Batch(x, y))
    for (w, b), (dw, db), (w1, b1) in zip(before, hand_rule(before, x, y, F, masks), weights(model)):
        torch.testing.assert_close(w1, w - 0.3 * dw, rtol=0, atol=1e-6)
        torch.testing.assert_close(b1, b - 0.3 * db, rtol=0, atol=1e-6)


def test_momentum_is_the_papers_velocity_form():
    """Three steps: the reference code's v = mu v + lr dW, W -= v (torch's SGD form differs only in where lr sits)."""
    model = net((6,))
    trainer = Pepita(lr=0.2, momentum=0.9, dropout=0.0, init="model")
    trainer.setup(model, TASK, torch.Generator().manual_seed(4))
    params = weights(model)
    velocity = [(torch.zeros_like(w), torch.zeros_like(b)) for w, b in params]
    for seed in (5, 6, 7):
        x, y = data(seed=seed)
        grads = hand_rule(params, x, y, trainer._projection)
        velocity = [(0.9 * vw + 0.2 * dw, 0.9 * vb + 0.2 * db) for (vw, vb), (dw, db) in zip(velocity, grads)]
        params = [(w - vw, b - vb) for (w, b), (vw, vb) in zip(params, velocity)]
        trainer.step(Batch(x, y))
    for (w, b), (w1, b1) in zip(params, weights(model)):
        torch.testing.assert_close(w1, w, rtol=0, atol=1e-6)
        torch.testing.assert_close(b1, b, rtol=0, atol=1e-6)


def test_learning_rate_decays_at_the_epoch_milestones():
    """640 examples at batch 64: 10 steps per epoch, so decay_epochs (1, 2.5) decay after steps 10 and 25."""
    trainer = Pepita(lr=0.1, decay_epochs=(1.0, 2.5), decay_gamma=0.5, dropout=0.0)
    trainer.setup(net((6,)), TASK, torch.Generator().manual_seed(0))
    x, y = data(64)
    rates = []
    for _ in range(30):
        rates.append(trainer._optimizer.param_groups[0]["lr"])
        trainer.step(Batch(x, y))
    assert rates == [0.1] * 10 + [0.05] * 15 + [0.025] * 5


# --- distributions -------------------------------------------------------------------------------------------------

def test_projection_is_uniform_at_the_documented_scale():
    """F [784, 10]: entries U(-a, a), a = f_scale sqrt(6 / 784) (the reference code's 0.05 x He-uniform)."""
    F = projection_matrix(784, 10, 0.05, torch.Generator().manual_seed(8), CPU)
    bound = 0.05 * math.sqrt(6 / 784)
    assert F.shape == (784, 10) and float(F.abs().max()) <= bound
    assert float(F.abs().max()) > 0.99 * bound
    assert stats.kstest(F.flatten().numpy(), stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3
    assert abs(float(F.std()) - bound / math.sqrt(3)) < 0.02 * bound
    twice = projection_matrix(784, 10, 0.1, torch.Generator().manual_seed(8), CPU)
    torch.testing.assert_close(twice, 2 * F)


def test_he_uniform_init_and_model_init():
    torch.manual_seed(0)
    model = build({"kind": "mlp", "hidden": [256, 128]}, (1, 28, 28), 10)
    original = [p.detach().clone() for p in model.parameters()]
    Pepita(init="model").setup(model, TaskInfo((1, 28, 28), 10, 640, CPU), torch.Generator().manual_seed(0))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), original))
    Pepita().setup(model, TaskInfo((1, 28, 28), 10, 640, CPU), torch.Generator().manual_seed(0))
    for lin in [block[0] for block in model.blocks] + [model.head]:
        bound = math.sqrt(6 / lin.in_features)
        w = lin.weight.detach()
        assert float(w.abs().max()) <= bound and abs(float(w.std()) - bound / math.sqrt(3)) < 0.05 * bound
        assert torch.equal(lin.bias.detach(), torch.zeros_like(lin.bias))


# --- cost --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_declared_cost(dropout):
    """The formula written out for 64-32-16-10 at batch 64, and the declared total (model forward x 2B + extra)
    against FlopCounterMode's count of the step's matrix products (only the elementwise work differs)."""
    splits = datasets.load("digits")
    torch.manual_seed(0)
    model = build({"kind": "mlp", "hidden": [32, 16]}, (1, 8, 8), 10)
    trainer = Pepita(dropout=dropout)
    trainer.setup(model, TaskInfo((1, 8, 8), 10, splits.train_x.shape[0], CPU), torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        out = trainer.step(Batch(splits.train_x[:64], splits.train_y[:64]))
    assert (out.forward_passes, out.backward_passes) == (128, 0)
    n_params = sum(p.numel() for p in model.parameters())  # 64*32+32 + 32*16+16 + 16*10+10
    elementwise = 64 * 10 + 64 * 64 + 64 * (32 + 16 + 10) + 64 * (32 + 16) * (5 if dropout else 1) + n_params
    products = 2 * 64 * 64 * 10 + 2 * 64 * (64 * 32 + 32 * 16 + 16 * 10)
    assert pepita_flops([64, 32, 16, 10], 64, dropout > 0) == elementwise + products
    assert optimizer_flops(trainer._optimizer) == 4 * n_params  # SGD with momentum
    assert out.extra_flops == elementwise + products + 4 * n_params
    declared = model_flops(model, (1, 8, 8)).forward * 128 + out.extra_flops
    assert 0.9 * counter.get_total_flops() < declared < 1.25 * counter.get_total_flops()


# --- validation and models ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("hparams", [{"batch_size": 0}, {"lr": 0.0}, {"lr": -0.01}, {"momentum": 1.0},
                                     {"momentum": -0.1}, {"f_scale": 0.0}, {"dropout": 1.0}, {"dropout": -0.1},
                                     {"decay_epochs": (90.0, 60.0)}, {"decay_epochs": (0.0,)},
                                     {"decay_gamma": 0.0}, {"decay_gamma": 1.5}, {"init": "xavier"}])
def test_bad_hyper_parameters_are_rejected(hparams):
    name = next(iter(hparams))
    with pytest.raises(ValueError, match=name):
        Pepita(**hparams).validate()


@pytest.mark.parametrize("kind,spec", [("cnn", {}), ("resmlp", {"hidden": [16, 16]}),
                                       ("mlp", {"hidden": [16], "norm": "layer"})])
def test_models_other_than_a_plain_mlp_are_refused_at_setup(kind, spec):
    torch.manual_seed(0)
    model = build({"kind": kind, **spec}, (1, 28, 28), 10)
    with pytest.raises(ValueError, match="pepita"):
        Pepita().setup(model, TaskInfo((1, 28, 28), 10, 640, CPU), torch.Generator())


def test_a_suite_pairing_pepita_with_a_cnn_is_a_usage_error():
    assert Pepita.supported_models == ("mlp",)
    with registered(entry_for_class(Pepita)):
        with pytest.raises(UsageError, match="pepita"):
            make_trials({"models": [{"kind": "cnn"}], "algorithms": [{"id": "pepita"}]})


# --- the kit and short runs --------------------------------------------------------------------------------------

def test_conformance_kit_passes():
    failed = [r.line() for r in check_trainer(Pepita) if not r.passed]
    assert not failed, failed


@pytest.mark.parametrize("hidden", [[64], [64, 64]])
def test_short_digits_run_learns(hidden):
    """The paper's defaults, 600 steps of 64 (about 30 epochs of the 1,293 training digits)."""
    splits = datasets.load("digits")
    torch.manual_seed(0)
    model = build({"kind": "mlp", "hidden": hidden}, (1, 8, 8), 10)
    trainer = Pepita()
    trainer.setup(model, TaskInfo((1, 8, 8), 10, splits.train_x.shape[0], CPU), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    for _ in range(600):
        idx = torch.randint(0, splits.train_x.shape[0], (64,), generator=g)
        trainer.step(Batch(splits.train_x[idx], splits.train_y[idx]))
    with torch.no_grad():
        accuracy = (trainer.eval_model()(splits.test_x).argmax(1) == splits.test_y).float().mean().item()
    assert accuracy > 0.8, accuracy  # chance is 0.1


def test_tiny_trial_through_the_runner():
    """The tiny suite's MLP 64-16-10, 200 steps: learns well above chance through the real runner."""
    with registered(entry_for_class(Pepita)):
        trial = make_trials({"algorithms": [{"id": "pepita", "lr": 0.05}], "budget": {"steps": 200}})[0]
        result = run_trial(trial, None)
    assert result.status == "done", result.error
    assert result.metrics["test/accuracy"] > 0.6


# --- the pseudo-gradient: PEPITA's own view of the input gradient ----------------------------------------------------

def test_pseudo_gradient_model_is_the_model_with_minus_e_F_transposed_as_input_gradient():
    """Logits bit for bit the model's; the cross-entropy's input gradient is -(softmax(z) - onehot(y)) F^T / B
    (closed form), in the input's shape; the module declares feedback weights (the attacks look for that)."""
    model = net(hidden=(6, 5))
    trainer = Pepita()
    trainer.setup(model, TASK, torch.Generator().manual_seed(0))
    pseudo = trainer.pseudo_gradient_model()
    x, y = data(n=8)
    x = x.clone().requires_grad_(True)
    logits = pseudo(x)
    torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    torch.nn.functional.cross_entropy(logits, y).backward()
    error = torch.softmax(model(x).detach(), 1) - torch.nn.functional.one_hot(y, C).double()  # [B, C]
    torch.testing.assert_close(x.grad, -(error @ trainer._projection.T) / 8)
    assert getattr(type(pseudo), "uses_feedback_weights", False)


def test_pseudo_gradient_aligns_with_the_true_gradient_as_pepita_learns():
    """The rule's direction -e F^T against autograd's dL/dx on held-out digits: cosine ~0 at initialisation, and
    positive after training (the first layer learns to treat x + e F^T as the better input). Measured with these
    settings: median cosine -0.03 at initialisation, 0.25 after 600 steps."""
    splits = datasets.load("digits")
    torch.manual_seed(0)
    model = build({"kind": "mlp", "hidden": [64, 64]}, (1, 8, 8), 10)
    trainer = Pepita(lr=0.05)
    trainer.setup(model, TaskInfo((1, 8, 8), 10, splits.train_x.shape[0], CPU), torch.Generator().manual_seed(0))

    def median_cosine() -> float:
        x = splits.test_x.clone().requires_grad_(True)
        true, = torch.autograd.grad(torch.nn.functional.cross_entropy(model.eval()(x), splits.test_y), x)
        x.grad = None
        rule, = torch.autograd.grad(torch.nn.functional.cross_entropy(trainer.pseudo_gradient_model()(x),
                                                                      splits.test_y), x)
        model.train()
        return torch.nn.functional.cosine_similarity(rule.flatten(1), true.flatten(1), dim=1).median().item()

    before = median_cosine()
    g = torch.Generator().manual_seed(1)
    for _ in range(600):
        idx = torch.randint(0, splits.train_x.shape[0], (64,), generator=g)
        trainer.step(Batch(splits.train_x[idx], splits.train_y[idx]))
    after = median_cosine()
    assert abs(before) < 0.05 and after > 0.1, (before, after)


def test_a_trial_reports_the_pseudo_gradient_attack():
    """Through the runner with `robustness.pseudo_gradient`: pgd-linf-pseudo is recorded beside pgd-linf."""
    with registered(entry_for_class(Pepita)):
        trial = make_trials({"algorithms": [{"id": "pepita", "lr": 0.05}], "budget": {"steps": 100},
                             "robustness": {"examples": 50, "attacks": ["pgd-linf"], "eps_linf": [0.1]}})[0]
        result = run_trial(trial, None)
    assert result.status == "done", result.error
    assert {"robust/pgd-linf/0.1", "robust/pgd-linf-pseudo/0.1"} <= set(result.metrics)
