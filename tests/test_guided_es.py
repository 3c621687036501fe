"""guided-es against references: openai-es's perturbations (alpha = 1), the closed-form covariance, the paper's
biased-quadratic demo (Maheswaranathan et al. 2019, Fig. 1), a hand-written feedback-alignment backward for the fa
surrogate, a per-member loop for the ES estimate, the declared passes, and the conformance kit."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from learnbench import population
from learnbench.algorithms import guided_es
from learnbench.algorithms.guided_es import GuidedES, guided_estimate, guided_perturbations
from learnbench.algorithms.openai_es import OpenAIES
from learnbench.models import build
from learnbench.spec import Batch, TaskInfo
from learnbench.testing import check_trainer

CPU = torch.device("cpu")
D = 6
TASK = TaskInfo((D,), 3, 64, CPU)


def make(seed: int = 0, hidden=(8,), **hparams) -> GuidedES:
    torch.manual_seed(seed)
    trainer = GuidedES(**hparams)
    trainer.setup(build({"kind": "mlp", "hidden": list(hidden)}, (D,), 3), TASK, torch.Generator().manual_seed(seed))
    return trainer


def batch(n: int = 32, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(n, D, generator=g), torch.randint(0, 3, (n,), generator=g))


def orthonormal(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).Q


# --- the perturbation distribution ---------------------------------------------------------------------------------

def test_alpha_one_draws_openai_es_perturbations():
    """alpha = 1: eps ~ N(0, sigma^2/n I), openai-es's sigma_es * N(0, I) with sigma = sigma_es sqrt(n)."""
    n, pairs, sigma_es = 50, 4000, 0.02
    es = OpenAIES(popsize=2 * pairs, sigma=sigma_es, noise_table=0)
    es.setup(nn.Sequential(nn.Linear(n - 1, 1)), TaskInfo((n - 1,), 1, 1, CPU), torch.Generator().manual_seed(0))
    theirs = (sigma_es * es.ask()).flatten()  # the members are mean +- these
    ours = guided_perturbations(orthonormal(n, 1).float(), pairs, sigma_es * math.sqrt(n), 1.0,
                                torch.Generator().manual_seed(1)).flatten()
    for moment in (1, 2, 4):
        a, b = ours.double().pow(moment).mean(), theirs.double().pow(moment).mean()
        assert abs(a - b) < 4 * math.sqrt(float(theirs.double().pow(2 * moment).mean()) / theirs.numel()) * 1.5
    assert stats.ks_2samp(ours.numpy(), theirs.numpy()).pvalue > 1e-3
    assert ours.std() == pytest.approx(sigma_es, rel=0.01)


@pytest.mark.parametrize("alpha, k", [(0.5, 2), (0.2, 1), (0.0, 3)])
def test_perturbation_covariance_is_the_closed_form(alpha, k):
    n, sigma, draws = 6, 0.7, 400_000
    basis = orthonormal(n, k)
    eps = guided_perturbations(basis, draws, sigma, alpha, torch.Generator().manual_seed(3))  # [draws, n]
    empirical = eps.T @ eps / draws
    expected = sigma**2 * (alpha / n * torch.eye(n, dtype=torch.float64) + (1 - alpha) / k * basis @ basis.T)
    # each entry's standard error is at most sigma^2 sqrt(2 / draws) ~ 0.0011 here
    torch.testing.assert_close(empirical, expected, atol=6 * sigma**2 * math.sqrt(2 / draws), rtol=0)
    assert float(torch.trace(empirical)) == pytest.approx(sigma**2, rel=0.01)  # E|eps|^2 = sigma^2


def test_estimate_is_unbiased_on_a_linear_function():
    """f(x) = c . x: (f(x+e) - f(x-e)) e = 2 (c.e) e, so E[g] = beta/sigma^2 Cov(eps) c."""
    n, k, sigma, alpha, beta, pairs = 5, 2, 0.3, 0.4, 1.0, 200_000
    basis, c = orthonormal(n, k), torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = guided_perturbations(basis, pairs, sigma, alpha, torch.Generator().manual_seed(5))
    estimate = guided_estimate(eps, torch.cat([eps @ c, -(eps @ c)]), sigma, beta)
    cov = sigma**2 * (alpha / n * torch.eye(n, dtype=torch.float64) + (1 - alpha) / k * basis @ basis.T)
    torch.testing.assert_close(estimate, beta / sigma**2 * cov @ c, atol=0.02, rtol=0)


# --- the paper's demo: a quadratic with a deliberately biased gradient ----------------------------------------------

def biased_quadratic_run(method: str, iterations: int = 2000, n: int = 100, m: int = 200, seed: int = 2) -> list:
    """The reference demo's perturbed quadratic (guided-evolutionary-strategies, Demo notebook), n = 100, m = 200:
    f(x) = |Ax - b|^2 / (2m); the surrogate is grad f + (fixed unit bias + 1.5 fresh unit noise) |grad f|; gradient
    descent at 5e-3 on it, vanilla ES (alpha 1, beta 1) and guided ES (alpha 0.5, beta 2) at 0.2, sigma 0.1, one
    antithetic pair. Returns f - f* per iteration."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    bias = torch.randn(n, generator=g, dtype=torch.float64)
    bias /= bias.norm()
    optimum = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
    f_star = float((a @ optimum - b).pow(2).sum() / (2 * m))
    f = lambda x: (x @ a.T - b).pow(2).sum(-1) / (2 * m)  # noqa: E731  [..., n] -> [...]
    x, noise = torch.zeros(n, dtype=torch.float64), torch.Generator().manual_seed(seed + 1)
    gaps = []
    for _ in range(iterations):
        grad = a.T @ (a @ x - b) / m
        fresh = torch.randn(n, generator=noise, dtype=torch.float64)
        surrogate = grad + (bias + 1.5 * fresh / fresh.norm()) * grad.norm()
        if method == "gradient descent":
            x = x - 5e-3 * surrogate
        else:
            alpha, beta = (1.0, 1.0) if method == "vanilla es" else (0.5, 2.0)
            eps = guided_perturbations((surrogate / surrogate.norm())[:, None], 1, 0.1, alpha, noise)
            x = x - 0.2 * guided_estimate(eps, f(torch.cat([x + eps, x - eps])), 0.1, beta)
        gaps.append(float(f(x)) - f_star)
    return gaps


def test_guided_es_converges_where_the_biased_gradient_stalls_and_faster_than_vanilla_es():
    gd, ves, ges = (biased_quadratic_run(m) for m in ("gradient descent", "vanilla es", "guided es"))
    assert gd[-1] > 0.02 and gd[-1] > 0.8 * gd[len(gd) // 2]  # stalled: no progress over the second half
    assert ges[-1] < gd[-1] / 20  # guided ES goes on past the bias
    assert ges[-1] < ves[-1] / 4 and ges[len(ges) // 4] < ves[len(ves) // 4]  # and faster than plain ES throughout
    assert ves[-1] < gd[-1]  # ES is unbiased: it too gets past the plateau, slowly


# --- the trainer -----------------------------------------------------------------------------------------------------

def test_fa_surrogate_is_feedback_alignments_gradient_by_hand():
    """784-style MLP with one hidden layer: dW2 = e^T h, dW1 = ((e B2) * relu'(z1))^T x, e = softmax - onehot / B."""
    trainer = make(surrogate="fa", hidden=(8,))
    data = batch()
    first, second = [m for m in trainer._model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        z1 = data.x @ first.weight.T + first.bias
        h = z1.relu()
        error = (F.softmax(h @ second.weight.T + second.bias, -1) - F.one_hot(data.y, 3)) / data.y.shape[0]
        delta = (error @ second.weight_feedback) * (z1 > 0)  # B2 [3, 8] in W2^T's place
    expected = torch.cat([(delta.T @ data.x).flatten(), delta.sum(0), (error.T @ h).flatten(), error.sum(0)])
    assert not torch.allclose(second.weight_feedback, second.weight)  # B is not W: this is not backprop
    trainer.step(data)
    torch.testing.assert_close(trainer.update_parts["surrogate"], -expected, atol=1e-6, rtol=1e-5)


def test_backprop_surrogate_is_the_true_gradient():
    trainer = make(surrogate="backprop")
    twin, data = copy.deepcopy(trainer.eval_model()), batch()
    F.cross_entropy(twin(data.x), data.y).backward()
    trainer.step(data)
    expected = torch.cat([p.grad.flatten() for p in twin.parameters()])
    torch.testing.assert_close(trainer.update_parts["surrogate"], -expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("surrogate", ["fa", "dfa", "sign-symmetry", "backprop"])
def test_estimate_and_update_equal_a_per_member_loop(monkeypatch, surrogate):
    drawn = []

    def recording(*args, **kwargs):
        drawn.append(guided_perturbations(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(guided_es, "guided_perturbations", recording)
    trainer = make(surrogate=surrogate, popsize=6, sigma=0.5, beta=1.5, lr=0.1)
    model, data = copy.deepcopy(trainer.eval_model()), batch()
    mean = population.flatten(model).clone()
    stats_ = trainer.step(data)
    [noise] = drawn  # [3, n]
    losses = []
    for sign in (1, -1):
        for row in noise:
            population.load(model, mean + sign * row)
            losses.append(float(F.cross_entropy(model.eval()(data.x), data.y).detach()))
    diff = torch.tensor(losses[:3]) - torch.tensor(losses[3:])
    expected = 1.5 / (2 * 0.25 * 3) * (diff @ noise)
    torch.testing.assert_close(trainer.update_parts["es-estimate"], -expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(population.flatten(trainer.eval_model()), mean - 0.1 * expected, atol=1e-6, rtol=1e-5)
    assert stats_.forward_passes == 7 * 32 and stats_.backward_passes == 32


def test_the_subspace_is_the_last_k_surrogates():
    trainer = make(surrogate="backprop", k=2, alpha=0.0, popsize=40)
    seen = []
    for seed in range(3):
        trainer.step(batch(seed=seed))
        seen.append(-trainer.update_parts["surrogate"])
        span = torch.stack(seen[-2:]).T  # [n, <=2]
        # alpha = 0: the estimate lies in the span of the last k surrogates (least-squares residual ~ 0)
        estimate = trainer.update_parts["es-estimate"]
        residual = estimate - span @ torch.linalg.lstsq(span, estimate[:, None]).solution[:, 0]
        assert float(residual.norm()) < 1e-4 * float(estimate.norm())


def test_guided_es_with_the_true_gradient_is_well_aligned():
    """k = 1, the true gradient as surrogate: E[g] = beta (alpha/n + 1 - alpha) grad f, along it; 32 pairs average
    the full-space part's noise down (its norm relative to the mean ~ alpha / sqrt(n pairs))."""
    trainer = make(surrogate="backprop", popsize=64, hidden=(32,))
    trainer.step(batch())
    parts = trainer.update_parts
    assert float(F.cosine_similarity(parts["surrogate"], parts["es-estimate"], dim=0)) > 0.95


def test_same_seed_same_result():
    runs = [[float(make(seed=s).step(batch(seed=i)).loss) for i in range(3)] for s in (0, 0)]
    assert runs[0] == runs[1]
    first = [make(seed=s) for s in (0, 0, 1)]
    for trainer in first:
        for i in range(3):
            trainer.step(batch(seed=i))
    weights = [population.flatten(t.eval_model()) for t in first]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


@pytest.mark.parametrize("bad", [dict(surrogate="kp"), dict(popsize=3), dict(alpha=1.5), dict(k=0),
                                 dict(sigma=0), dict(optimizer="lbfgs"), dict(feedback_init="uniform")])
def test_bad_hyper_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        GuidedES(**bad).validate()


@dataclass(eq=False)
class GuidedByBackprop(GuidedES):
    name: ClassVar[str] = "guided-es-backprop"
    surrogate: str = "backprop"


@pytest.mark.parametrize("cls", [GuidedES, GuidedByBackprop], ids=["fa", "backprop"])
def test_guided_es_passes_the_conformance_kit(cls):
    failed = [result.line() for result in check_trainer(cls) if not result.passed]
    assert not failed, failed
