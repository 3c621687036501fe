"""The memetic trainer against its references: 0 local steps is the ga trainer, bit for bit; the batched local step
is a per-member autograd loop (backprop) or the fa trainer's converted layers (fa); Lamarckian keeps the learned
weights and Baldwinian does not; the passes counted follow the formula; local steps beat ga on a small problem."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import make_trials, random_batches
from learnbench import population
from learnbench.algorithms.feedback_alignment import FeedbackAlignmentRule
from learnbench.algorithms.feedback_layers import convert
from learnbench.algorithms.genetic import GeneticAlgorithm
from learnbench.algorithms.memetic import Memetic, local_network, local_sgd
from learnbench.models import build
from learnbench.runner import run_trial
from learnbench.spec import Batch, TaskInfo

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
SMALL = {"popsize": 12, "batch_size": 64, "candidates": 3, "elite_batches": 2}
# Every draw of the variation fixed in number: its FLOPs are a formula (genetic.py's docstring).
FIXED = {"crossover": "uniform", "cxpb": 1.0, "mutpb": 1.0, "indpb": 1.0, "sigma": 0.01}


def make(cls=Memetic, model_seed: int = 0, seed: int = 0, d: int = 6, hidden=(8,), **hparams):
    torch.manual_seed(model_seed)
    trainer = cls(**{**SMALL, **hparams})
    trainer.setup(build({"kind": "mlp", "hidden": list(hidden)}, (d,), 3), TaskInfo((d,), 3, 64, CPU),
                  torch.Generator().manual_seed(seed))
    return trainer


batches = random_batches


def teacher_batches(n: int, d: int = 10, size: int = 128, seed: int = 3) -> list[Batch]:
    """A learnable problem: labels from a fixed random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(d, 3, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(size, d, generator=g)
        out.append(Batch(x, (x @ teacher).argmax(1)))
    return out


def flat(model: nn.Module) -> torch.Tensor:
    return population.flatten(model).clone()


def sgd_loop(model: nn.Module, rows: torch.Tensor, x, y, steps: int, lr: float, local_batch: int) -> torch.Tensor:
    """The reference: each row loaded into `model` (eval mode), `steps` autograd SGD steps on the windows of
    `local_batch` examples memetic uses, one member at a time."""
    model.eval()
    out = []
    for row in rows:
        population.load(model, row)
        for k in range(steps):
            index = (torch.arange(local_batch) + k * local_batch) % y.shape[0]
            model.zero_grad()
            F.cross_entropy(model(x[index]), y[index]).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad
        out.append(flat(model))
    return torch.stack(out)


def member_losses(model: nn.Module, rows: torch.Tensor, x, y) -> list[float]:
    out = []
    with torch.no_grad():
        for row in rows:
            out.append(F.cross_entropy(population.load(model, row).eval()(x), y).item())
    return out


# ---------------------------------------------------------------------------------------------- 0 steps is ga

@pytest.mark.parametrize("hparams", [{}, {"variant": "such2017", "truncation": 4},
                                     {"inheritance": "baldwinian", "local_rule": "fa", **FIXED}])
def test_zero_local_steps_is_exactly_ga(hparams):
    ga_hparams = {k: v for k, v in hparams.items() if k not in ("inheritance", "local_rule")}
    runs = []
    for trainer in (make(GeneticAlgorithm, **ga_hparams), make(local_steps=0, **hparams)):
        stats = [trainer.step(b) for b in batches(6)]
        runs.append(([float(s.loss) for s in stats], [(s.forward_passes, s.backward_passes, s.extra_flops)
                                                      for s in stats], trainer._genomes.clone(),
                     flat(trainer.eval_model()), [dict(r) for r in trainer.logbook]))
    (ga_losses, ga_cost, ga_genomes, ga_best, ga_log), (losses, cost, genomes, best, log) = runs
    assert losses == ga_losses and cost == ga_cost and log == ga_log
    assert torch.equal(genomes, ga_genomes) and torch.equal(best, ga_best)


# ------------------------------------------------------------------------------- the batched local steps

@pytest.mark.parametrize("steps, local_batch", [(1, 64), (3, 24)])  # whole batch; windows that wrap around
def test_batched_local_steps_equal_a_per_member_autograd_loop(steps, local_batch):
    torch.manual_seed(0)
    model = build({"kind": "mlp", "hidden": [8, 8]}, (6,), 3)
    rows = torch.stack([flat(model) + 0.3 * torch.randn(flat(model).shape) for _ in range(5)])  # [5, n]
    x, y = batches(1)[0].x, batches(1)[0].y
    net = local_network(model, "backprop", torch.Generator(), (6,))
    ours = local_sgd(net, population.Layout.of(model), rows, x, y, steps, 0.5, local_batch, chunk=2)
    reference = sgd_loop(copy.deepcopy(model), rows, x, y, steps, 0.5, local_batch)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert (ours - rows).abs().max() > 1e-2  # the steps moved the weights


def conv_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_fa_local_step_equals_the_fa_trainers_converted_layers(kind):
    torch.manual_seed(0)
    shape = (6,) if kind == "mlp" else (1, 6, 6)
    model = build({"kind": "mlp", "hidden": [8, 8]}, shape, 3) if kind == "mlp" else conv_model()
    trainer = Memetic(**SMALL, local_rule="fa", local_lr=0.5)
    trainer.setup(model, TaskInfo(shape, 3, 64, CPU), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(32, *shape, generator=g), torch.randint(0, 3, (32,), generator=g)
    rows = trainer._genomes[:4]
    ours = local_sgd(trainer._net, trainer._layout, rows, x, y, 1, 0.5, 32, chunk=4)
    # the fa trainer's machinery, with memetic's B in its layers' weight_feedback buffers
    reference_model = copy.deepcopy(model)
    conversion = convert(reference_model, FeedbackAlignmentRule(), torch.Generator().manual_seed(9))
    for name, layer in conversion.layers.items():
        layer.weight_feedback.copy_(trainer._net.get_buffer(f"{name}.weight_feedback"))
    reference = sgd_loop(reference_model, rows, x, y, 1, 0.5, 32)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    # a real FA gradient: not backprop's
    backprop = sgd_loop(copy.deepcopy(model), rows, x, y, 1, 0.5, 32)
    assert (backprop - reference).abs().max() > 1e-3


# -------------------------------------------------------------------------------- Lamarckian or Baldwinian

@pytest.mark.parametrize("inheritance", ["lamarckian", "baldwinian"])
def test_lamarckian_keeps_the_learned_weights_baldwinian_only_their_fitness(inheritance):
    trainer = make(inheritance=inheritance, local_lr=0.5, local_steps=2, local_batch=40, elites=1, **FIXED)
    data = batches(3)
    for batch in data[:2]:
        trainer.step(batch)
    genomes = trainer._genomes.clone()  # [P, n]: elite, then the untrained offspring of the last variation
    scored, varied = [], []
    evaluate, vary = trainer._toolbox.evaluate, trainer._vary
    trainer._toolbox.register("evaluate", lambda rows, x, y: scored.append(rows.clone()) or evaluate(rows, x, y))

    def spy_vary(offspring):
        out, flops = vary(offspring.clone())
        varied.append((offspring.clone(), out.clone()))
        return out, flops

    trainer._vary = spy_vary
    trainer.step(data[2])
    first = 1 if inheritance == "lamarckian" else 0  # Lamarckian: the elite already holds its learned weights
    model = copy.deepcopy(trainer._model)
    learned = sgd_loop(model, genomes[first:], data[2].x, data[2].y, 2, 0.5, 40)
    torch.testing.assert_close(scored[0][first:], learned, atol=1e-5, rtol=0)
    assert torch.equal(scored[0][:first], genomes[:first])
    losses = member_losses(model, scored[0], data[2].x, data[2].y)  # the fitness: the learned copies' loss
    assert trainer.logbook[-1]["min"] == pytest.approx(min(losses), rel=1e-5)
    assert trainer.logbook[-1]["max"] == pytest.approx(max(losses), rel=1e-5)
    bred, offspring = varied[0]
    kept = scored[0] if inheritance == "lamarckian" else genomes  # where the parents come from
    assert all(any(torch.equal(row, k) for k in kept) for row in bred)
    assert torch.equal(trainer._genomes[1:], offspring)  # the variation's offspring, not yet learned
    assert any(torch.equal(flat(trainer.eval_model()), k) for k in kept)
    if inheritance == "baldwinian":
        assert not any(torch.equal(row, k) for row in bred for k in scored[0])


# ------------------------------------------------------------------------------------------- cost honesty

@pytest.mark.parametrize("inheritance", ["lamarckian", "baldwinian"])
def test_counted_passes_and_flops_follow_the_formula(inheritance):
    steps, lb, p, b, e = 2, 16, 12, 64, 1
    trainer = make(inheritance=inheritance, local_steps=steps, local_batch=lb, elites=e, **FIXED)
    n = trainer._layout.n_params
    for gen, batch in enumerate(batches(4)):
        stats = trainer.step(batch)
        learning = p if gen == 0 or inheritance == "baldwinian" else p - e  # rows that took local steps
        pool = min(gen, 2) * b  # the held-back batches seen before this one
        assert stats.backward_passes == learning * steps * lb
        assert stats.forward_passes == p * b + (trainer.logbook[-1]["nevals"] - p) * pool + learning * steps * lb
        ga_flops = (p - e) * 3 + (p - e) // 2 * n + 3 * (p - e) * n  # tournaments, uniform crossover, mutation
        assert stats.extra_flops == ga_flops + 2 * n * learning * steps


# ------------------------------------------------------------------------------------------- bad settings

class Branchy(nn.Module):
    """Data-dependent control flow: vmap cannot run it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x):
        h = self.linear(x)
        return h if bool(h.detach().sum() > 0) else -h


@pytest.mark.parametrize("bad", [{"local_steps": -1}, {"local_rule": "dfa"}, {"local_lr": 0.0},
                                 {"local_lr": float("nan")}, {"inheritance": "darwinian"}, {"local_batch": 0},
                                 {"local_batch": 65}, {"elites": 12}])
def test_bad_hyper_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        make(**bad)


def test_a_model_vmap_cannot_run_is_refused_at_setup():
    with pytest.raises(ValueError, match="vmap"):
        Memetic(**SMALL).setup(Branchy(), TaskInfo((6,), 3, 64, CPU), torch.Generator())
    with pytest.raises(ValueError, match="Conv1d"):
        model = nn.Sequential(nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
        Memetic(**SMALL, local_rule="fa").setup(model, TaskInfo((6,), 3, 64, CPU), torch.Generator())
    make(hidden=(8,), local_rule="fa")  # and a plain one is accepted
    torch.manual_seed(0)  # batch norm: eval mode, its stored statistics, goes through vmap
    Memetic(**SMALL).setup(build({"kind": "mlp", "hidden": [8], "norm": "batch"}, (6,), 3),
                           TaskInfo((6,), 3, 64, CPU), torch.Generator())


# ------------------------------------------------------------------------------------------------ it learns

def test_local_steps_beat_ga_at_the_same_number_of_generations():
    data = teacher_batches(31)
    held_out = data.pop()
    results = {}
    for name, cls, extra in (("ga", GeneticAlgorithm, {}), ("memetic", Memetic, {"local_lr": 0.5})):
        trainer = make(cls, d=10, hidden=(16,), popsize=12, batch_size=128, **extra)
        for batch in data:
            trainer.step(batch)
        with torch.no_grad():
            logits = trainer.eval_model().eval()(held_out.x)
        results[name] = (F.cross_entropy(logits, held_out.y).item(), (logits.argmax(1) == held_out.y).float().mean())
    (ga_loss, ga_acc), (loss, acc) = results["ga"], results["memetic"]
    assert loss < 0.7 * ga_loss and acc > ga_acc + 0.1, results


def test_tiny_run_on_digits_learns():
    suite = {"algorithms": [{"id": "memetic", "batch_size": 128, "popsize": 8, "candidates": 3, "elite_batches": 1}],
             "budget": {"steps": 60}}
    trial = make_trials(suite, sets=["memetic.local_lr=0.3", "memetic.local_steps=2"])[0]
    assert trial.hparams["local_lr"] == 0.3 and trial.hparams["local_steps"] == 2
    result = run_trial(trial, None)
    assert result.status == "done", result.error
    assert result.metrics["test/accuracy"] > 0.6  # 10 classes: chance is 0.1
    assert result.metrics["cost/backward_passes"] == 128 * 2 * (8 + 59 * 7)  # all 8 rows at generation 0
