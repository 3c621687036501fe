"""openai-es, snes and cma-es against closed forms, pycma itself, and a tiny training budget on digits."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import cma
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from learnbench import population
from learnbench.algorithms.cma_es import MAX_FULL_PARAMS, CMAES, torch_randn
from learnbench.algorithms.openai_es import OpenAIES, gradient_estimate
from learnbench.algorithms.snes import SNES, nes_utilities
from learnbench.models import build
from learnbench.noise import NoiseTable, normal
from learnbench.spec import Batch, TaskInfo

CPU = torch.device("cpu")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double(), b.double(), dim=0).item()


def mean_cosine(estimate, truth, popsizes, repeats=6):
    return [sum(cosine(estimate(p, r), truth) for r in range(repeats)) / repeats for p in popsizes]


def test_openai_es_gradient_estimate_approaches_true_gradient_on_quadratic():
    torch.manual_seed(0)
    d = 30
    q = torch.randn(d, d, dtype=torch.float64)
    a, b, theta = q @ q.T / d + torch.eye(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64), torch.randn(d)
    f = lambda t: 0.5 * ((t.double() @ a) * t.double()).sum(-1) + t.double() @ b  # [P] losses
    true_descent = -(a @ theta.double() + b)  # closed-form gradient, negated: the ES estimate points downhill

    def estimate(popsize, repeat):
        g = torch.Generator().manual_seed(repeat)
        noise = normal(g, popsize // 2, d)
        loss = torch.cat([f(theta + 0.01 * noise), f(theta - 0.01 * noise)])
        return gradient_estimate(noise, loss, 0.01)

    cos = mean_cosine(estimate, true_descent, [8, 64, 512, 4096])
    assert all(later > earlier for earlier, later in zip(cos, cos[1:])), cos
    assert cos[0] < 0.7 and cos[-1] > 0.95, cos


def test_openai_es_gradient_estimate_approaches_true_gradient_on_linear_model():
    torch.manual_seed(0)
    model = build({"kind": "mlp", "hidden": []}, (6,), 3)  # softmax regression, 21 parameters
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    # closed form: dL/dW = (softmax(x W^T + b) - onehot(y))^T x / B, dL/db = mean(softmax - onehot)
    residual = (model(x).softmax(-1) - F.one_hot(y, 3)).detach()  # [B, 3]
    true_descent = -torch.cat([(residual.T @ x / 64).flatten(), residual.mean(0)])

    def estimate(popsize, repeat):
        trainer = OpenAIES(popsize=popsize, sigma=0.02, noise_table=2**16)
        trainer.setup(model, TaskInfo((6,), 3, 64, CPU), torch.Generator().manual_seed(repeat))
        noise = trainer.ask()
        loss, _ = population.evaluate_mirrored(model, population.flatten(model), noise, 0.02, x, y)
        return gradient_estimate(noise, loss, 0.02)

    cos = mean_cosine(estimate, true_descent, [8, 64, 512, 4096])
    assert all(later > earlier for earlier, later in zip(cos, cos[1:])), cos
    assert cos[0] < 0.7 and cos[-1] > 0.95, cos


def salimans_update_direction(theta: np.ndarray, noise: np.ndarray, loss: np.ndarray, l2coeff: float) -> np.ndarray:
    """What openai/evolution-strategies-starter's `run_master` hands `optimizer.update`, in numpy: returns
    `returns_n2 [H, 2]` (+eps, -eps; rewards = -loss) shaped by `compute_centered_ranks`, `g` their weighted sum
    of the noise rows divided by `returns_n2.size` (no 1/sigma), then `-g + l2coeff * theta`."""
    returns_n2 = np.stack([-loss[:len(noise)], -loss[len(noise):]], axis=1)
    ranks = np.empty(returns_n2.size, dtype=int)
    ranks[returns_n2.ravel().argsort()] = np.arange(returns_n2.size)
    proc = ranks.reshape(returns_n2.shape) / (returns_n2.size - 1) - 0.5
    g = (proc[:, 0] - proc[:, 1]) @ noise / returns_n2.size
    return -g + l2coeff * theta


def openai_es_after_one_tell(sigma: float, **hparams) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A 6-parameter openai-es told fixed noise and losses once: (mean before, noise, losses, mean after)."""
    torch.manual_seed(0)
    model = build({"kind": "mlp", "hidden": []}, (2,), 2)  # 6 parameters
    trainer = OpenAIES(popsize=6, sigma=sigma, noise_table=0, **hparams)
    trainer.setup(model, TaskInfo((2,), 2, 8, CPU), torch.Generator().manual_seed(0))
    theta = population.flatten(trainer.eval_model()).double().numpy()
    noise = torch.tensor(np.random.default_rng(0).normal(size=(3, 6)), dtype=torch.float32)  # [H, n]
    loss = torch.tensor([0.9, 0.2, 1.4, 0.5, 1.1, 0.3])  # [2H], +eps members then -eps
    trainer.tell(noise, loss)
    after = population.flatten(trainer.eval_model()).double().numpy()
    return theta, noise.double().numpy(), loss.double().numpy(), after


@pytest.mark.parametrize("sigma", [0.02, 0.3])  # Salimans et al.'s update does not involve sigma
def test_openai_es_sgd_step_follows_salimans_et_al(sigma):
    theta, noise, loss, after = openai_es_after_one_tell(sigma, optimizer="sgd", lr=1.0, weight_decay=0.1)
    expected = theta - 1.0 * salimans_update_direction(theta, noise, loss, 0.1)  # SGD, lr 1
    np.testing.assert_allclose(after, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.02, 0.3])
def test_openai_es_first_adam_step_is_adam_on_minus_g_plus_l2_theta(sigma):
    lr, l2 = 0.01, 0.5  # an L2 term large enough to change the sign of some coordinates' steps

    def adam_first_step(theta, grad, b1=0.9, b2=0.999, eps=1e-8):
        m, v = (1 - b1) * grad, (1 - b2) * grad**2  # the moments after one step, then bias-corrected
        return theta - lr * (m / (1 - b1)) / (np.sqrt(v / (1 - b2)) + eps)

    theta, noise, loss, after = openai_es_after_one_tell(sigma, lr=lr, weight_decay=l2)
    np.testing.assert_allclose(after, adam_first_step(theta, salimans_update_direction(theta, noise, loss, l2)),
                               rtol=1e-6, atol=1e-7)
    # the former convention, g / sigma with Adam's weight_decay added to it, takes another step
    g = -salimans_update_direction(theta, noise, loss, 0.0)
    assert np.abs(after - adam_first_step(theta, -g / sigma + l2 * theta)).max() > lr


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_cma_es_takes_the_same_steps_as_pycma(covariance):
    torch.manual_seed(0)
    model = build({"kind": "mlp", "hidden": [4]}, (5,), 3)  # 39 parameters
    x0 = population.flatten(model)
    batches = [Batch(torch.randn(32, 5), torch.randint(0, 3, (32,))) for _ in range(6)]
    trainer = CMAES(popsize=8, batch_size=32, sigma0=0.1, covariance=covariance)
    trainer.setup(model, TaskInfo((5,), 3, 32, CPU), torch.Generator().manual_seed(7))
    for batch in batches:
        trainer.step(batch)

    # pycma called directly: its defaults, the same noise source, losses from a per-member module loop
    es = cma.CMAEvolutionStrategy(x0.double().numpy(), 0.1, {
        "popsize": 8, "CMA_diagonal": covariance == "diagonal", "seed": math.nan, "verbose": -9,
        "verb_log": 0, "verb_disp": 0, "randn": torch_randn(torch.Generator().manual_seed(7))})
    reference = build({"kind": "mlp", "hidden": [4]}, (5,), 3)
    for batch in batches:
        candidates = es.ask()
        losses = []
        for c in candidates:
            population.load(reference, torch.from_numpy(c).float())
            losses.append(F.cross_entropy(reference(batch.x), batch.y).item())
        es.tell(candidates, losses)
    np.testing.assert_allclose(trainer.es.mean, es.mean, rtol=1e-12, atol=1e-12)
    assert trainer.es.sigma == pytest.approx(es.sigma, rel=1e-12)
    torch.testing.assert_close(population.flatten(trainer.eval_model()), torch.from_numpy(es.mean).float())


def test_cma_es_full_covariance_refuses_large_models():
    model = build({"kind": "mlp", "hidden": [128]}, (1, 8, 8), 10)  # 9,610 parameters
    assert population.Layout.of(model).n_params > MAX_FULL_PARAMS
    with pytest.raises(ValueError, match="limit is 5,000 parameters"):
        CMAES(covariance="full").setup(model, TaskInfo((1, 8, 8), 10, 100, CPU), torch.Generator())
    auto = CMAES(covariance="auto")
    auto.setup(model, TaskInfo((1, 8, 8), 10, 100, CPU), torch.Generator())
    assert auto.es.opts["CMA_diagonal"] is True


def test_nes_utilities_match_the_published_formula():
    u = nes_utilities(8).double()
    raw = [max(0.0, math.log(5) - math.log(k)) for k in range(1, 9)]
    expected = [r / sum(raw) - 1 / 8 for r in raw]
    torch.testing.assert_close(u, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    assert abs(u.sum()) < 1e-6 and (u[:-1] >= u[1:]).all()


def test_snes_published_defaults():
    model = build({"kind": "cnn"}, (1, 28, 28), 10)
    trainer = SNES()
    trainer.setup(model, TaskInfo((1, 28, 28), 10, 100, CPU), torch.Generator())
    d = 11_274
    assert trainer._popsize == 4 + math.floor(3 * math.log(d)) == 31
    assert trainer._lr_sigma == pytest.approx((3 + math.log(d)) / (5 * math.sqrt(d)))


# ------------------------------------------------------------------------------------------ training behaviour

@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(data.target)
    return x[:1400], y[:1400], x[1400:], y[1400:]


TRAINERS = {
    "openai-es": lambda: OpenAIES(popsize=32, batch_size=128, sigma=0.05, lr=0.05, noise_table=2**20),
    "openai-es-fresh-noise": lambda: OpenAIES(popsize=32, batch_size=128, sigma=0.05, lr=0.05, noise_table=0),
    "snes": lambda: SNES(popsize=32, batch_size=128, sigma_init=0.1, noise_table=0),
    "snes-antithetic": lambda: SNES(popsize=32, batch_size=128, sigma_init=0.1, antithetic=True),
    "cma-es": lambda: CMAES(popsize=16, batch_size=128, sigma0=0.1, covariance="diagonal"),
}


def train(make, digits, seed=0, steps=60):
    xtr, ytr, xte, yte = digits
    torch.manual_seed(seed)
    model = build({"kind": "mlp", "hidden": [16]}, (1, 8, 8), 10)
    trainer = make()
    trainer.setup(model, TaskInfo((1, 8, 8), 10, len(ytr), CPU), torch.Generator().manual_seed(seed))
    order = torch.Generator().manual_seed(100 + seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(ytr), (trainer.batch_size,), generator=order)
        batch = Batch(xtr[idx], ytr[idx])
        before = batch.x.clone()
        stats = trainer.step(batch)
        assert torch.equal(batch.x, before)  # the batch is not mutated
        losses.append(float(stats.loss))
    with torch.no_grad():
        accuracy = (trainer.eval_model().eval()(xte).argmax(-1) == yte).float().mean().item()
    return trainer, losses, accuracy, stats


@pytest.mark.parametrize("name", TRAINERS)
def test_trainer_improves_on_digits(name, digits):
    trainer, losses, accuracy, stats = train(TRAINERS[name], digits)
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10]), losses
    assert accuracy > 0.6, accuracy  # chance is 0.1; the initial network scores about that
    popsize = trainer.popsize
    assert stats.forward_passes == popsize * trainer.batch_size


@pytest.mark.parametrize("name", TRAINERS)
def test_same_seed_same_result(name, digits):
    runs = [population.flatten(train(TRAINERS[name], digits, seed=s, steps=4)[0].eval_model()) for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_noise_table_rows_are_reproducible_standard_normal_windows():
    table = NoiseTable(torch.Generator().manual_seed(3), 2**16, 1000, CPU)
    rows = table.sample(300)
    assert rows.shape == (300, 1000)
    # every row is a contiguous window of the table
    for row in rows[:5]:
        start = int(torch.nonzero(table.table == row[0])[0])
        torch.testing.assert_close(row, table.table[start:start + 1000])
    assert abs(rows.mean()) < 0.02 and abs(rows.std() - 1) < 0.02
    again = NoiseTable(torch.Generator().manual_seed(3), 2**16, 1000, CPU).sample(300)
    assert torch.equal(rows, again)
    assert NoiseTable(torch.Generator(), 10, 1000, CPU).table.numel() == 8000  # grows to 8 windows


def test_nan_members_never_drive_the_update():
    torch.manual_seed(0)
    model = build({"kind": "mlp", "hidden": []}, (4,), 2)
    trainer = OpenAIES(popsize=8)
    trainer.setup(model, TaskInfo((4,), 2, 8, CPU), torch.Generator().manual_seed(0))
    noise = trainer.ask()
    loss = torch.rand(8)
    loss[[1, 6]] = float("nan")
    trainer.tell(noise, loss)
    assert torch.isfinite(population.flatten(trainer.eval_model())).all()


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, torch
    from learnbench.algorithms.openai_es import OpenAIES
    from learnbench.models import build
    from learnbench.spec import Batch, TaskInfo
    torch.set_num_threads(1)
    model = build({"kind": "mlp", "hidden": [128]}, (1, 28, 28), 10)  # 101,770 parameters
    trainer = OpenAIES(popsize=1024, batch_size=256)
    trainer.setup(model, TaskInfo((1, 28, 28), 10, 60000, torch.device("cpu")), torch.Generator().manual_seed(0))
    batch = Batch(torch.rand(256, 1, 28, 28), torch.randint(0, 10, (256,)))
    stats = trainer.step(batch)
    print(sum(p.numel() for p in model.parameters()), stats.forward_passes,
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


@pytest.mark.slow
def test_population_1024_on_100k_parameter_mlp_stays_under_4_gib():
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, check=True)
    n_params, forward_passes, peak_bytes = map(int, out.stdout.split())
    assert n_params > 100_000 and forward_passes == 1024 * 256
    assert peak_bytes < 4 * 2**30, f"peak RSS {peak_bytes / 2**30:.2f} GiB"


@pytest.mark.slow
def test_population_trainers_keep_the_runners_one_thread_per_worker(tiny_suite, tmp_path, capsys):
    """Two workers on this machine's cores: every population trial trains with cores // 2 threads (1 on 2 cores),
    the rule that keeps two busy processes from slowing each other 5-13x."""
    import json
    import os

    from learnbench.cli import main

    out = tmp_path / "run"
    assert main(["run", str(tiny_suite), "--algorithms", "openai-es,snes,cma-es,ga", "--set", "budget.steps=3",
                 "--workers", "2", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["show", str(out), "--json"]) == 0
    trials = json.loads(capsys.readouterr().out)["trials"]
    assert sorted(t["algorithm"] for t in trials) == ["cma-es", "ga", "openai-es", "snes"]
    assert {t["metrics"]["cost/threads"] for t in trials} == {max(1, len(os.sched_getaffinity(0)) // 2)}
