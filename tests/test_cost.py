"""Nominal FLOPs (`learnbench.cost`): the same trial costs the same whatever code path evaluates it.

Before nominal counting, `cost/flops` was what FlopCounterMode saw: the population engine's CPU shortcuts (dropping
all-zero input columns, sharing the first layer between mirrored pairs, the cnn's fused first convolution) made the
same ES trial count 0.40-0.65x of its dense work on CPU and about 1x on CUDA."""

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import make_trials
from learnbench import cost, models, population, population_engines
from learnbench.datasets import info
from learnbench.runner import run_trial

POPSIZE, BATCH, STEPS = 8, 16, 4


def generic_engine(model, x):
    return population_engines.Engine(model, x)  # vmap of functional_call over dense members: no shortcut


def mirrored_without_sharing(model, center, noise, sigma, x, y, chunk_size=None, **_):
    members = torch.cat([center + sigma * noise, center - sigma * noise])  # [2H, n], built explicitly
    return population.evaluate(model, members, x, y, chunk_size=chunk_size)


def one_member_one_example(spec: dict) -> float:
    """An independent count: FlopCounterMode on a freshly built plain module, one example."""
    shape = info("digits").input_shape
    model = models.build(models.normalize_spec(spec), shape, 10)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    return counter.get_total_flops()


@pytest.mark.slow
@pytest.mark.parametrize("spec", [{"kind": "mlp", "hidden": [16]}, {"kind": "cnn"}])
def test_openai_es_costs_the_same_with_and_without_the_cpu_fast_paths(spec, monkeypatch):
    trial = make_trials({"models": [spec], "budget": {"steps": STEPS},
                         "algorithms": [{"id": "openai-es", "popsize": POPSIZE, "batch_size": BATCH}]})[0]
    x = torch.rand(BATCH, *info("digits").input_shape)
    x[:, :, 0, :] = 0  # a zero row of pixels: the MLP engine's CPU path drops those columns
    engine = population_engines.engine_for(models.build(trial.model, x.shape[1:], 10), x)
    assert type(engine) is not population_engines.Engine
    results = {}
    for fast_engine, shared_first_layer in itertools.product([True, False], repeat=2):
        with monkeypatch.context() as patch:
            if not fast_engine:
                patch.setattr(population, "engine_for", generic_engine)
            if not shared_first_layer:
                patch.setattr(population, "evaluate_mirrored", mirrored_without_sharing)
            results[fast_engine, shared_first_layer] = run_trial(trial, None)
    flops = {key: r.metrics["cost/flops"] for key, r in results.items()}
    assert len(set(flops.values())) == 1, flops
    losses = [r.metrics["train/loss"] for r in results.values()]
    assert max(losses) - min(losses) < 1e-4  # the four paths compute the same thing to float rounding
    m = results[True, True].metrics
    assert m["cost/steps"] == STEPS and m["cost/extra_flops"] > 0
    assert m["cost/flops"] == STEPS * POPSIZE * BATCH * one_member_one_example(spec) + m["cost/extra_flops"]


def test_model_flops_counts_the_dense_forward_and_the_backward_to_the_parameters():
    model = models.build(models.normalize_spec({"kind": "mlp", "hidden": [32, 8]}), (1, 8, 8), 10)
    flops = cost.model_flops(model, (1, 8, 8))
    forward = 2 * (64 * 32 + 32 * 8 + 8 * 10)
    assert flops.forward == forward
    assert flops.backward == forward + 2 * (32 * 8 + 8 * 10)  # weight gradients + input gradients after layer 1
    assert all(p.grad is None for p in model.parameters())  # counted on a copy


@pytest.mark.parametrize("make,per_parameter", [
    (lambda p: torch.optim.SGD(p, lr=0.1), 2),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 4),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4), 8),
    (lambda p: torch.optim.Adam(p), 14),
    (lambda p: torch.optim.AdamW(p), 16),  # AdamW's default weight decay 0.01
    (lambda p: torch.optim.RMSprop(p), 9),
    (lambda p: torch.optim.Adagrad(p), 7),
])
def test_optimizer_flops_per_parameter(make, per_parameter):
    params = [torch.nn.Parameter(torch.zeros(3, 5)), torch.nn.Parameter(torch.zeros(7))]
    assert cost.optimizer_flops(make(params)) == per_parameter * 22


def test_an_optimizer_without_a_formula_is_refused():
    with pytest.raises(ValueError, match="no FLOP formula for LBFGS"):
        cost.optimizer_flops(torch.optim.LBFGS([torch.nn.Parameter(torch.zeros(2))]))
