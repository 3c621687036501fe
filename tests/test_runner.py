"""The runner: determinism, budgets, FLOP accounting against a closed form, divergence and failure handling."""

import math

import pytest

from helpers import make_trials
from learnbench.runner import run_trial
from plugin_cases import BROKEN

COST_KEYS_THAT_VARY = ("cost/train_seconds", "cost/peak_memory_bytes")


def test_same_seed_gives_identical_metrics_on_cpu():
    trial = make_trials({"budget": {"steps": 60}})[0]
    a, b = run_trial(trial, None), run_trial(trial, None)
    assert a.status == b.status == "done"
    strip = lambda m: {k: v for k, v in m.items() if k not in COST_KEYS_THAT_VARY}
    assert strip(a.metrics) == strip(b.metrics)
    assert [c for c in a.curves if c.metric != "x"] and [c.value for c in a.curves] == [c.value for c in b.curves]
    other = run_trial(make_trials({"budget": {"steps": 60}, "seeds": [1]})[0], None)
    assert other.metrics["test/loss"] != a.metrics["test/loss"]


def test_step_budget_and_examples():
    result = run_trial(make_trials({"budget": {"steps": 25}})[0], None)
    m = result.metrics
    assert m["cost/steps"] == 25 and m["cost/examples"] == 25 * 32
    assert m["cost/forward_passes"] == 25 * 32 == m["cost/backward_passes"]


def test_epoch_budget_counts_examples():
    from learnbench.datasets import info
    n_train = info("digits").n_train
    m = run_trial(make_trials({"budget": {"epochs": 2}})[0], None).metrics
    assert 2 * n_train <= m["cost/examples"] < 2 * n_train + 32
    assert m["cost/epochs"] == pytest.approx(m["cost/examples"] / n_train)


def test_time_budget_stops_soon_after_the_limit():
    m = run_trial(make_trials({"budget": {"time_s": 0.3}})[0], None).metrics
    assert 0.3 <= m["cost/train_seconds"] < 0.6


# digits 64 -> 16 -> 10 with Adam, batch 32. A matmul is 2*m*n*k FLOPs: forward 2*(64*16 + 16*10) per example;
# backward: the weight gradients the same again plus the input gradient of layer 2 only (the input needs none).
FORWARD = 2 * (64 * 16 + 16 * 10)
BACKWARD = FORWARD + 2 * 16 * 10
ADAM_STEP = 14 * (64 * 16 + 16 + 16 * 10 + 10)  # learnbench.cost: Adam's update, 14 FLOPs per parameter
PER_STEP = 32 * (FORWARD + BACKWARD) + ADAM_STEP


def test_nominal_flops_match_the_closed_form_for_an_mlp():
    m = run_trial(make_trials({"budget": {"steps": 12}})[0], None).metrics
    assert (m["cost/model_forward_flops"], m["cost/model_backward_flops"]) == (FORWARD, BACKWARD)
    assert m["cost/extra_flops"] == 12 * ADAM_STEP
    assert m["cost/flops"] == 12 * PER_STEP


def test_flop_budget_stops_at_the_first_step_past_it():
    m = run_trial(make_trials({"budget": {"flops": 10.5 * PER_STEP}})[0], None).metrics
    assert m["cost/steps"] == 11


def test_evaluation_cadence_gives_points_plus_one_curve_values():
    result = run_trial(make_trials({"budget": {"steps": 40}, "eval": {"points": 4}})[0], None)
    acc = [c for c in result.curves if c.metric == "test/accuracy"]
    assert [c.step for c in acc] == [0, 10, 20, 30, 40]
    assert all(c.examples == c.step * 32 for c in acc)  # examples column
    assert acc[-1][5] == result.metrics["test/accuracy"]


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "misbehaving.py"
    path.write_text(BROKEN)
    return path


def test_non_finite_loss_marks_the_trial_diverged(plugin):
    trial = make_trials({"algorithms": [{"id": "nan-after", "batch_size": 32}]}, plugin_files=[plugin])[0]
    result = run_trial(trial, None)
    assert result.status == "diverged" and "non-finite" in result.error
    assert result.metrics["cost/steps"] == 6


def test_exception_in_step_marks_failed_with_traceback(plugin):
    trial = make_trials({"algorithms": [{"id": "raises", "batch_size": 32}]}, plugin_files=[plugin])[0]
    result = run_trial(trial, None)
    assert result.status == "failed"
    assert "deliberate failure in step 3" in result.error and "Traceback" in result.error


def test_wrong_return_type_fails_clearly(plugin):
    trial = make_trials({"algorithms": [{"id": "wrong-type", "batch_size": 32}]}, plugin_files=[plugin])[0]
    result = run_trial(trial, None)
    assert result.status == "failed" and "not StepStats" in result.error


def test_model_factory_and_saved_weights_round_trip(tmp_path):
    import sys
    from pathlib import Path

    import torch

    from learnbench import load_model
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    trial = make_trials({"models": [{"kind": "factory", "factory": "user_models:tiny_net", "width": 9}]})[0]
    result = run_trial(trial, str(tmp_path))
    assert result.status == "done", result.error
    model = load_model(tmp_path, trial.id)
    from learnbench.datasets import load
    data = load("digits")
    with torch.no_grad():
        accuracy = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
    assert math.isclose(accuracy, result.metrics["test/accuracy"], abs_tol=1e-6)
