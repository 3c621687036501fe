"""A trainer's own values (`StepStats.metrics`): the runner records them as `train/<name>` curve metrics at
evaluation points only, the conformance kit checks them, and each built-in's values match an independent reading
(closed forms, pycma, DEAP's logbook, a hand computation of ||B - W|| / ||W||). Tiny budgets on the digits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from helpers import make_trials
from learnbench import models, population
from learnbench.algorithms.adversarial import AdversarialTraining, epsilon_at
from learnbench.algorithms.backprop import Backprop
from learnbench.algorithms.cma_es import CMAES
from learnbench.algorithms.feedback_alignment import FeedbackAlignment
from learnbench.algorithms.forward_gradient import ForwardGradient
from learnbench.algorithms.genetic import GeneticAlgorithm
from learnbench.algorithms.kolen_pollack import KolenPollack
from learnbench.algorithms.memetic import Memetic
from learnbench.algorithms.openai_es import OpenAIES
from learnbench.algorithms.pepita import Pepita
from learnbench.algorithms.snes import SNES
from learnbench.runner import run_trial
from learnbench.spec import Batch, StepStats, TaskInfo
from learnbench.testing import check_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

MLP = {"kind": "mlp", "hidden": [16]}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    return torch.tensor(data.data / 16, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(data.target)


def steps(trainer, digits, n: int, between=None) -> list[StepStats]:
    """`n` steps of `trainer` (set up on an MLP 64-16-10) on fixed slices of the digits; `between(t)` runs before
    step t and reads the trainer's state (the independent reading)."""
    x, y = digits
    trainer.setup(models.build(MLP, (1, 8, 8), 10), TaskInfo((1, 8, 8), 10, 640, torch.device("cpu")),
                  torch.Generator().manual_seed(0))
    stats = []
    for t in range(n):
        if between is not None:
            between(t)
        start = (t * trainer.batch_size) % (len(y) - trainer.batch_size)
        stats.append(trainer.step(Batch(x[start:start + trainer.batch_size], y[start:start + trainer.batch_size])))
    return stats


def values(stats: list[StepStats], name: str) -> list[float]:
    return [float(s.metrics[name]) for s in stats]


# --- the runner --------------------------------------------------------------------------------------------------

PLUGIN = '''
from dataclasses import dataclass
from typing import ClassVar

import torch

from learnbench.algorithms.backprop import Backprop
from learnbench.spec import StepStats

READS = []  # one entry per float() of a reported value: the runner's reads


class Counted:
    """A metric value that notes when it is read."""

    def __init__(self, value):
        self.value = value

    def __float__(self):
        READS.append(self.value)
        return float(self.value)


@dataclass(eq=False)
class Metered(Backprop):
    """Reports how many steps it has taken (a counted read), and a 0-d tensor."""
    name: ClassVar[str] = "metered"

    def step(self, batch):
        self._n = getattr(self, "_n", 0) + 1
        stats = super().step(batch)
        return StepStats(stats.loss, stats.forward_passes, stats.backward_passes,
                         metrics={"steps": Counted(self._n), "half/tensor": torch.tensor(0.5)})


@dataclass(eq=False)
class Silent(Backprop):
    """Reports no metrics of its own."""
    name: ClassVar[str] = "silent"

    def step(self, batch):
        stats = super().step(batch)
        return StepStats(stats.loss, stats.forward_passes, stats.backward_passes)


@dataclass(eq=False)
class Shouting(Backprop):
    """Reports a metric name the runner refuses."""
    name: ClassVar[str] = "shouting"

    def step(self, batch):
        stats = super().step(batch)
        stats.metrics["LR"] = 1.0
        return stats
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "metered.py"
    path.write_text(PLUGIN)
    return path


def run(plugin, algorithm: str, **suite):
    trial = make_trials({"algorithms": [{"id": algorithm, "batch_size": 32}], "budget": {"steps": 30},
                         "eval": {"points": 3}, **suite}, plugin_files=[plugin])[0]
    return run_trial(trial, None)


def test_runner_records_a_trainers_metrics_at_evaluation_points_only(plugin):
    from learnbench.registry import discover

    reads = discover([str(plugin)]).get("metered").cls.step.__globals__["READS"]
    reads.clear()
    result = run(plugin, "metered")
    assert result.status == "done", result.error
    curve = {name: [(p.step, p.value) for p in result.curves if p.metric == name]
             for name in ("train/steps", "train/half/tensor", "test/accuracy")}
    assert [step for step, _ in curve["test/accuracy"]] == [0, 10, 20, 30]
    assert curve["train/steps"] == [(10, 10.0), (20, 20.0), (30, 30.0)]  # the latest step's value; none at 0
    assert curve["train/half/tensor"] == [(10, 0.5), (20, 0.5), (30, 0.5)]
    assert reads == [10, 20, 30]  # read at the 3 evaluation points, never in between
    assert result.metrics["train/steps"] == 30.0 and result.metrics["train/half/tensor"] == 0.5


def test_runner_records_no_trainer_metric_for_a_trainer_without_any(plugin):
    result = run(plugin, "silent")
    assert result.status == "done", result.error
    assert {p.metric for p in result.curves if p.metric.startswith("train/")} == {"train/loss"}
    assert [k for k in result.metrics if k.startswith("train/")] == ["train/loss"]


def test_runner_fails_a_trial_whose_metric_name_is_invalid(plugin):
    result = run(plugin, "shouting")
    assert result.status == "failed"
    assert "Shouting.step reported metric name(s) ['LR']" in result.error


def test_kolen_pollacks_metrics_reach_the_curves_and_final_metrics_of_a_trial():
    trial = make_trials({"algorithms": [{"id": "kolen-pollack", "batch_size": 32}]})[0]
    result = run_trial(trial, None)
    assert result.status == "done", result.error
    assert result.metrics["train/lr"] == 1e-3 and 0 < result.metrics["train/bw_distance"] < 10
    assert len([p for p in result.curves if p.metric == "train/bw_distance"]) == 3


# --- the conformance kit -----------------------------------------------------------------------------------------

@dataclass(eq=False)
class NanMetric(Backprop):
    name: ClassVar[str] = "test-nan-metric"

    def step(self, batch):
        stats = super().step(batch)
        self._n = getattr(self, "_n", 0) + 1
        stats.metrics["noise"] = torch.tensor(math.nan if self._n == 12 else 1.0)
        return stats


@dataclass(eq=False)
class ChangingNames(Backprop):
    name: ClassVar[str] = "test-changing-names"

    def step(self, batch):
        stats = super().step(batch)
        self._n = getattr(self, "_n", 0) + 1
        if self._n > 3:  # from step 3 on
            stats.metrics["late"] = 1.0
        return stats


@pytest.mark.parametrize("cls, reason", [(NanMetric, "step 11: metric 'noise' is nan, not finite"),
                                         (ChangingNames, "step 3 reported metrics ['late', 'lr'], step 0 ['lr']")])
def test_the_kit_fails_nan_or_changing_metrics(cls, reason):
    [result] = check_trainer(cls, only=["step_metrics"])
    assert not result.passed and reason in result.reason, result.reason


def test_the_kit_passes_backprops_metrics():
    [result] = check_trainer(Backprop, only=["step_metrics"])
    assert result.passed and "1 metric(s), the same at each of 40 steps, finite: lr" in result.reason


# --- each built-in's values against an independent reading -------------------------------------------------------

def test_openai_es_sigma_and_lr_follow_their_closed_form_decays(digits):
    trainer = OpenAIES(popsize=8, batch_size=64, noise_table=2**16, sigma=0.05, sigma_decay=0.8, sigma_min=0.02,
                       lr=0.1, lr_decay=0.7, lr_min=0.03)
    stats = steps(trainer, digits, 6)
    assert values(stats, "sigma") == pytest.approx([max(0.05 * 0.8**t, 0.02) for t in range(6)], rel=1e-12)
    assert values(stats, "lr") == pytest.approx([0.1 * max(0.7**t, 0.3) for t in range(6)], rel=1e-12)


def test_snes_reports_its_per_parameter_stds_and_lr_sigma(digits):
    trainer = SNES(popsize=8, batch_size=64, sigma_init=0.1)
    seen = []
    stats = steps(trainer, digits, 4, between=lambda t: seen.append(trainer._sigma.clone()))
    d = seen[0].numel()
    assert values(stats, "sigma")[0] == pytest.approx(0.1) and values(stats, "sigma/max")[0] == pytest.approx(0.1)
    for s, sigma in zip(stats, seen):
        assert float(s.metrics["sigma"]) == pytest.approx(sigma.double().mean().item(), rel=1e-6)
        assert float(s.metrics["sigma/min"]) == sigma.min().item()
        assert float(s.metrics["sigma/max"]) == sigma.max().item()
    assert values(stats, "sigma")[-1] != pytest.approx(0.1)  # the stds adapt
    assert values(stats, "lr_sigma") == [(3 + math.log(d)) / (5 * math.sqrt(d))] * 4


def test_cma_es_reports_pycmas_step_size(digits):
    trainer = CMAES(popsize=8, batch_size=64, sigma0=0.1, covariance="diagonal")
    seen = []
    stats = steps(trainer, digits, 4, between=lambda t: seen.append(trainer.es.sigma))
    assert values(stats, "sigma") == seen and seen[0] == 0.1 and seen[-1] != 0.1


@pytest.mark.parametrize("cls", [GeneticAlgorithm, Memetic], ids=lambda c: c.name)
def test_ga_reports_the_logbook_statistics_of_each_generation(cls, digits):
    trainer = cls(popsize=12, batch_size=64, candidates=3, elite_batches=0)
    scored = []  # ga: the generation's losses, measured independently before the step

    def measure(t):
        if cls is GeneticAlgorithm:  # memetic scores its rows after local learning: the logbook only
            x, y = (part[t * 64:(t + 1) * 64] for part in digits)  # the batch `steps` gives step t
            scored.append(population.evaluate(trainer._model, trainer._genomes, x, y)[0].tolist())

    stats = steps(trainer, digits, 3, between=measure)
    assert len(trainer.logbook) == 3
    for s, record in zip(stats, trainer.logbook):
        assert s.metrics == {f"fitness/{k}": record[k] for k in ("min", "median", "max", "elite")}
        assert s.metrics["fitness/elite"] == s.metrics["fitness/min"]  # no held-back pool: the best is the elite
    for s, losses in zip(stats, scored):
        assert s.metrics["fitness/min"] == pytest.approx(min(losses), rel=1e-6)
        assert s.metrics["fitness/median"] == pytest.approx(float(np.median(losses)), rel=1e-6)
        assert s.metrics["fitness/max"] == pytest.approx(max(losses), rel=1e-6)


def test_backprop_and_fa_report_the_scheduled_learning_rate(digits):
    stats = steps(Backprop(batch_size=32, optimizer="sgd", lr=0.1, schedule="step", step_every=3, step_gamma=0.5),
                  digits, 8)
    assert values(stats, "lr") == pytest.approx([0.1 * 0.5 ** (t // 3) for t in range(8)], rel=1e-12)
    stats = steps(FeedbackAlignment(batch_size=32, lr=0.01, schedule="cosine", horizon_steps=8), digits, 8)
    assert values(stats, "lr") == pytest.approx([0.005 * (1 + math.cos(math.pi * t / 8)) for t in range(8)])


def test_kolen_pollack_reports_the_relative_b_w_distance(digits):
    trainer = KolenPollack(batch_size=32, optimizer="sgd", lr=0.5, decay=0.5)
    stats = steps(trainer, digits, 3)
    layers = trainer.conversion.layers.values()
    by_hand = np.mean([torch.linalg.norm(layer.feedback_matrix() - layer.weight).item()
                       / torch.linalg.norm(layer.weight).item() for layer in layers])
    assert float(stats[-1].metrics["bw_distance"]) == pytest.approx(by_hand, rel=1e-5)
    assert trainer.conversion.rule.mismatch_scale == pytest.approx(0.75**3)  # k = 1 - lr * decay each step
    assert values(stats, "lr") == [0.5] * 3


def test_forward_gradient_reports_its_exponentially_decayed_lr(digits):
    stats = steps(ForwardGradient(batch_size=32, optimizer="sgd", lr=1e-3, lr_decay=0.1), digits, 5)
    assert values(stats, "lr") == pytest.approx([1e-3 * math.exp(-0.1 * t) for t in range(5)], rel=1e-9)


def test_pepita_reports_its_lr_after_the_milestone(digits):
    """640 examples at batch 64: 10 steps per epoch, so decay_epochs (1,) decays after step 10."""
    stats = steps(Pepita(batch_size=64, lr=0.1, decay_epochs=(1.0,), decay_gamma=0.5, dropout=0.0), digits, 12)
    assert values(stats, "lr") == [0.1] * 10 + [0.05] * 2


def test_adversarial_reports_its_lr_and_ramped_epsilon(digits):
    trainer = AdversarialTraining(batch_size=32, epsilon=0.2, attack_steps=2, epsilon_warmup=0.5, horizon_steps=8)
    stats = steps(trainer, digits, 4)
    assert values(stats, "epsilon") == [epsilon_at(t, 0.2, 4) for t in range(4)]
    assert values(stats, "lr") == [1e-3] * 4

