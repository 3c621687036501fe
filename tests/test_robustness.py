"""The runner hooks: settings resolution, the per-trial evaluation (metrics, masking flags, the pseudo-gradient
attack on feedback-alignment models) and the transfer attack after the run."""

from __future__ import annotations

import copy

import pytest
import torch
from attack_models import digits, masked_mlp, trained_mlp
from torch import nn

from learnbench.attacks import attack_mode, evaluate, pgd_linf, resolve_settings
from learnbench.attacks.robustness import accuracy_metrics
from learnbench.errors import UsageError
from learnbench.store import Store
from learnbench.trial import Budget, Trial, TrialResult

FAST = {"examples": 500, "square_queries": 200, "apgd_steps": 40}


pytestmark = pytest.mark.usefixtures("one_thread")


def run(model: nn.Module, training_model: nn.Module | None = None, **overrides) -> dict[str, float]:
    _, _, x, y = digits()
    return evaluate(model, x, y, resolve_settings({**FAST, **overrides}, "digits"),
                    generator=torch.Generator().manual_seed(0), training_model=training_model)


# --- settings ------------------------------------------------------------------------------------------------------

def test_defaults_and_grids_per_dataset():
    mnist = resolve_settings({}, "mnist")
    assert mnist["examples"] == 1000 and mnist["attacks"] == ["fgsm", "pgd-linf", "pgd-l2", "apgd-ce", "square",
                                                              "noise", "transfer"]
    assert mnist["eps_linf"] == [0.05, 0.1, 0.2, 0.3] and mnist["eps_l2"] == [0.5, 1.0, 2.0, 3.0]
    assert resolve_settings({}, "fashion-mnist")["eps_l2"] == [0.5, 1.0, 2.0, 3.0]
    digits_grid = resolve_settings({}, "digits")
    assert digits_grid["eps_linf"] == [0.05, 0.1, 0.2, 0.3]  # inputs are in [0, 1] for every dataset
    assert digits_grid["eps_l2"] == pytest.approx([0.5 * 8 / 28, 8 / 28, 2 * 8 / 28, 3 * 8 / 28], rel=2e-3)
    assert resolve_settings({"eps_linf": [0.3, 0.1], "attacks": ["square", "fgsm"]}, "mnist")["eps_linf"] == [0.1, 0.3]
    assert resolve_settings({"standard_eps": {"pgd-linf": 0.3, "pgd-l2": 2}}, "mnist")["standard_eps"] == \
        {"pgd-linf": 0.3, "pgd-l2": 2.0}


def test_presets_and_grids_by_dataset():
    standard = resolve_settings({"preset": "standard"}, "mnist")
    assert standard["attacks"] == ["transfer"] and standard["square_queries"] == 5000  # AutoAttack's budget
    assert resolve_settings({}, "mnist")["square_queries"] == 1000
    mine = resolve_settings({"preset": "standard", "attacks": ["square"], "square_queries": 200}, "mnist")
    assert mine["attacks"] == ["square"] and mine["square_queries"] == 200  # the suite's own values win
    table = {"eps_linf": {"mnist": [0.1, 0.3], "fashion-mnist": [0.05, 0.2]}}
    assert resolve_settings(table, "mnist")["eps_linf"] == [0.1, 0.3]
    assert resolve_settings(table, "fashion-mnist")["eps_linf"] == [0.05, 0.2]
    assert resolve_settings(table, "digits")["eps_linf"] == [0.05, 0.1, 0.2, 0.3]  # not in the table: the default


@pytest.mark.parametrize("table, needle", [
    ({"exampels": 10}, "exampels"),
    ({"examples": -1}, "examples"),
    ({"examples": True}, "examples"),
    ({"pgd_steps": 4.0}, "pgd_steps"),
    ({"pgd_steps": 0}, "pgd_steps"),
    ({"attacks": ["pgd", "fgsm"]}, "pgd"),
    ({"attacks": "fgsm"}, "attacks"),
    ({"eps_linf": []}, "eps_linf"),
    ({"eps_linf": [0.1, 1.5]}, "eps_linf"),
    ({"eps_l2": ["1"]}, "eps_l2"),
    ({"square_p_init": 0}, "square_p_init"),
    ({"pseudo_gradient": 1}, "pseudo_gradient"),
    ({"masking_margin": 2}, "masking_margin"),
    ({"standard_eps": "0.1"}, "standard_eps"),
    ({"standard_eps": {"pgd": 0.1}}, "pgd"),
    ({"preset": "autoattack"}, "preset"),
    ({"fab_targets": 0}, "fab_targets"),
])
def test_bad_settings_are_usage_errors_naming_the_key(table, needle):
    with pytest.raises(UsageError, match=needle):
        resolve_settings(table, "mnist")


def test_auc_is_the_normalised_trapezoid():
    got = accuracy_metrics("pgd-linf", 0.9, {0.1: 0.5, 0.3: 0.0})
    assert got["robust/pgd-linf/0.1"] == 0.5 and got["robust/pgd-linf/0.3"] == 0.0
    assert got["robust/auc/pgd-linf"] == pytest.approx((0.1 * (0.9 + 0.5) / 2 + 0.2 * 0.5 / 2) / 0.3)


# --- evaluation ----------------------------------------------------------------------------------------------------

def test_evaluate_reports_every_attack_and_eps_and_no_masking_on_a_plain_model():
    settings = resolve_settings(FAST, "digits")
    metrics = run(trained_mlp())
    for attack in ("fgsm", "pgd-linf", "pgd-l2", "apgd-ce", "square", "noise"):
        grid = settings["eps_l2"] if attack in ("pgd-l2", "noise") else settings["eps_linf"]
        accs = [metrics[f"robust/{attack}/{eps:g}"] for eps in grid]
        assert all(0.0 <= a <= metrics["robust/clean"] for a in accs)
        assert f"robust/auc/{attack}" in metrics and metrics[f"robust/seconds/{attack}"] > 0
    assert not any(k.startswith("robust/transfer") or "pseudo" in k for k in metrics)  # transfer: after the run
    assert metrics["robust/pgd-linf/0.2"] < 0.1 < metrics["robust/clean"] - 0.5  # a plain MLP is not robust
    flags = {k: v for k, v in metrics.items() if k.startswith("flag/masking/")}
    assert set(flags) == {"flag/masking/black-box-beats-white-box", "flag/masking/accuracy-not-falling",
                          "flag/masking/zero-gradients", "flag/masking/more-iterations-help"}
    assert all(v == 0.0 for v in flags.values()), flags
    assert metrics["robust/seconds"] >= sum(v for k, v in metrics.items() if k.startswith("robust/seconds/"))


def test_a_masked_model_raises_the_masking_flags():
    metrics = run(masked_mlp())
    assert metrics["robust/clean"] > 0.85
    assert metrics["robust/pgd-linf/0.2"] > 0.8  # white-box attacks see a zero gradient and do nothing ...
    assert metrics["robust/square/0.2"] < 0.3  # ... the black-box attack breaks it
    assert metrics["flag/masking/zero-gradients"] == 1.0
    assert metrics["flag/masking/black-box-beats-white-box"] == 1.0
    assert metrics["flag/masking/accuracy-not-falling"] == 1.0


STANDARD_FAST = {"preset": "standard", "examples": 300, "apgd_steps": 30, "apgd_targets": 3, "fab_steps": 30,
                 "fab_targets": 3, "square_queries": 300, "eps_linf": [0.05, 0.1, 0.2]}


def test_the_standard_worst_case_is_never_above_any_single_attack():
    metrics = run(trained_mlp(), **STANDARD_FAST, attacks=["fgsm", "pgd-linf", "apgd-t", "fab-t", "square"])
    clean = metrics["robust/clean"]
    for eps in ("0.05", "0.1", "0.2"):
        worst = metrics[f"robust/worst-case/linf/{eps}"]
        singles = [metrics[f"robust/{a}/{eps}"] for a in ("fgsm", "pgd-linf", "apgd-t", "fab-t", "square")]
        running = [metrics[f"robust/ensemble/{a}/{eps}"] for a in ("apgd-ce", "apgd-t", "fab-t", "square")]
        assert worst <= min(singles + running) + 1e-9
        assert running == sorted(running, reverse=True)  # each attack only sees what the earlier ones left
        first = sum(metrics[f"robust/first-break/{a}/{eps}"] for a in ("apgd-ce", "apgd-t", "fab-t", "square"))
        assert first == pytest.approx(clean - running[-1])  # every broken point has exactly one first breaker
    assert metrics["robust/worst-case/linf/0.05"] < clean - 0.1  # the model is attackable at all
    assert 0.0 <= metrics["robust/auc/worst-case/linf"] <= 1.0 and metrics["robust/seconds/standard"] > 0
    assert not any(v for k, v in metrics.items() if k.startswith("flag/masking/")), metrics


def test_the_masking_checks_run_on_the_ensemble():
    metrics = run(masked_mlp(), **STANDARD_FAST, attacks=[])  # the ensemble alone: its Square is the black box
    assert metrics["robust/ensemble/fab-t/0.2"] > 0.8  # zero gradients: the white-box attacks do nothing ...
    assert metrics["robust/first-break/square/0.2"] > 0.3  # ... its Square breaks the points they left
    assert metrics["flag/masking/black-box-beats-white-box"] == 1.0
    assert metrics["flag/masking/zero-gradients"] == 1.0


def _curve(accuracies: list[float], n: int = 1000) -> dict[float, torch.Tensor]:
    """eps -> [n] bool with the given fraction of True."""
    return {eps: torch.arange(n) < round(a * n) for eps, a in zip((0.05, 0.1, 0.2, 0.3), accuracies)}


def test_accuracy_not_falling_ignores_fgsm_overshoot_but_not_a_flat_curve():
    from learnbench.attacks.masking import accuracy_not_falling

    falling = _curve([0.4, 0.2, 0.0, 0.0])
    fgsm_overshoot = _curve([0.012, 0.019, 0.046, 0.051])  # MNIST-1D MLP: FGSM's single step overshoots
    assert accuracy_not_falling({"pgd-linf": falling, "fgsm": fgsm_overshoot}, 0.02) == 0.0
    assert accuracy_not_falling({"pgd-linf": _curve([0.0, 0.0, 0.04, 0.05])}, 0.02) == 1.0  # rises
    assert accuracy_not_falling({"fgsm": _curve([0.8, 0.8, 0.79, 0.8])}, 0.02) == 1.0  # flat above the floor
    assert accuracy_not_falling({"pgd-l2": _curve([0.01, 0.01, 0.0, 0.0])}, 0.02) == 0.0  # flat on the floor
    assert accuracy_not_falling({"square": falling}, 0.02) is None


def test_examples_zero_turns_robustness_off():
    assert run(trained_mlp(), examples=0) == {}


# --- the pseudo-gradient attack on feedback-alignment models -------------------------------------------------------

class _FeedbackLinearFn(torch.autograd.Function):
    """y = x W^T + b; backward sends the error to the input through a fixed matrix B instead of W (FA)."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback):
        ctx.save_for_backward(x, feedback)
        return x @ weight.T + bias

    @staticmethod
    def backward(ctx, grad):
        x, feedback = ctx.saved_tensors
        grad_w = grad.T @ x if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad @ feedback, grad_w, grad_b, None


class FeedbackLinear(nn.Module):
    uses_feedback_weights = True

    def __init__(self, linear: nn.Linear, feedback: torch.Tensor):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # shared with the plain model
        self.register_buffer("feedback", feedback)

    def forward(self, x):
        return _FeedbackLinearFn.apply(x, self.weight, self.bias, self.feedback)


def feedback_twin(model: nn.Module, random_feedback: bool) -> nn.Module:
    """The model with every Linear swapped for a FeedbackLinear sharing its parameters (B random or B = W)."""
    twin = copy.copy(model)
    twin._modules = dict(model._modules)
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            feedback = torch.randn_like(child.weight) * child.weight.std() if random_feedback else child.weight.detach()
            twin._modules[name] = FeedbackLinear(child, feedback)
        elif len(list(child.children())):
            twin._modules[name] = feedback_twin(child, random_feedback)
    return twin


def test_pseudo_gradient_with_feedback_equal_to_weights_is_the_true_gradient():
    model, (_, _, x, y) = trained_mlp(), digits()
    twin = feedback_twin(model, random_feedback=False)
    assert any(isinstance(m, FeedbackLinear) for m in twin.modules())
    with attack_mode(model, twin):
        true = pgd_linf(model, x, y, 0.1, generator=torch.Generator().manual_seed(3))
        pseudo = pgd_linf(model, x, y, 0.1, generator=torch.Generator().manual_seed(3), grad_model=twin)
    torch.testing.assert_close(pseudo, true)


def test_pseudo_gradient_attack_is_reported_for_feedback_models_and_is_weaker():
    torch.manual_seed(5)
    model = trained_mlp()
    twin = feedback_twin(model, random_feedback=True)
    flags = [p.requires_grad for p in model.parameters()]
    metrics = run(model, training_model=twin, attacks=["pgd-linf"])
    assert [p.requires_grad for p in model.parameters()] == flags
    for eps in ("0.05", "0.1", "0.2", "0.3"):
        assert f"robust/pgd-linf-pseudo/{eps}" in metrics
    assert metrics["robust/pgd-linf-pseudo/0.1"] > metrics["robust/pgd-linf/0.1"] + 0.2
    assert "robust/pgd-linf-pseudo/0.1" not in run(model, training_model=model, attacks=["pgd-linf"])


# --- the transfer attack after the run ------------------------------------------------------------------------------

def _add_trial(store: Store, trial_id: str, algorithm: str, seed: int, model: nn.Module, models: dict) -> None:
    _, _, x, y = digits()
    settings = resolve_settings({**FAST, "attacks": ["fgsm", "pgd-linf", "transfer"]}, "digits")
    store.add_trials([Trial(id=trial_id, label=algorithm, algorithm=algorithm, hparams={}, dataset="digits",
                            model={"kind": "mlp"}, model_label="mlp-64x1", budget=Budget(steps=1), seed=seed,
                            robustness=settings)])
    metrics = evaluate(model, x, y, settings, generator=torch.Generator().manual_seed(seed))
    store.finish_trial(TrialResult(trial_id, "done", None, metrics, (), {}))
    models[trial_id] = model


def test_post_run_transfers_from_the_backprop_sibling(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import learnbench.datasets

    _, _, x, y = digits()
    store, models = Store(tmp_path), {}
    _add_trial(store, "bp0", "backprop", 0, trained_mlp(), models)
    _add_trial(store, "other0", "fa", 0, trained_mlp(1), models)  # an independently trained model
    _add_trial(store, "masked0", "ga", 0, masked_mlp(), models)
    _add_trial(store, "orphan1", "fa", 1, trained_mlp(1), models)  # no backprop trial with seed 1
    monkeypatch.setattr(learnbench, "load_model", lambda run_dir, trial: models[trial])
    monkeypatch.setattr(learnbench.datasets, "load", lambda name, data_dir=None: SimpleNamespace(test_x=x, test_y=y),
                        raising=False)
    learnbench.attacks.post_run(store, tmp_path, "cpu")
    got = {t.id: t.metrics for t in store.trials()}
    assert not any(k.startswith("robust/transfer") for k in got["bp0"]) and \
        not any(k.startswith("robust/transfer") for k in got["orphan1"])
    other, masked = got["other0"], got["masked0"]
    for eps in ("0.05", "0.1", "0.2", "0.3"):
        # Black-box transfer is weaker than white-box PGD on an ordinary model, but still an attack.
        assert other[f"robust/pgd-linf/{eps}"] - 0.02 <= other[f"robust/transfer/{eps}"] <= other["robust/clean"]
    assert other["robust/transfer/0.3"] < other["robust/clean"] - 0.3
    assert other["flag/masking/transfer-beats-white-box"] == 0.0
    assert masked["robust/transfer/0.2"] < masked["robust/pgd-linf/0.2"] - 0.3  # the masked model's PGD fails
    assert masked["flag/masking/transfer-beats-white-box"] == 1.0
    assert other["robust/seconds/transfer"] > 0
    learnbench.attacks.post_run(store, tmp_path, "cpu")  # idempotent: the same metrics again
    assert {t.id: t.metrics["robust/transfer/0.1"] for t in store.trials() if t.id in ("other0", "masked0")} \
        == {"other0": other["robust/transfer/0.1"], "masked0": masked["robust/transfer/0.1"]}


ROBUST_SUITE = """
name = "robust-tiny"
datasets = ["digits"]
seeds = 1
[[models]]
kind = "mlp"
hidden = [32]
[budget]
steps = 150
[eval]
points = 2
[robustness]
examples = 80
square_queries = 50
apgd_steps = 20
pgd_steps = 10
[[algorithms]]
id = "backprop"
label = "backprop-adam"
batch_size = 32
[[algorithms]]
id = "backprop"
label = "backprop-sgd"
optimizer = "momentum"
lr = 0.05
batch_size = 32
"""


@pytest.mark.slow  # a worker process and two short trainings: about 10 s here
def test_a_run_attacks_every_trial_and_transfers_after_it(tmp_path):
    """End to end through the CLI: the runner calls `evaluate`, then `post_run` loads the saved models and the
    dataset and adds the transfer attack from the backprop-adam model (the first label) to backprop-sgd."""
    from learnbench.cli import main

    suite = tmp_path / "robust.toml"
    suite.write_text(ROBUST_SUITE)
    assert main(["run", str(suite), "--out", str(tmp_path / "run"), "--device", "cpu", "--workers", "1",
                 "--quiet"]) == 0
    store = Store.open(tmp_path / "run")
    trials = {t.label: t for t in store.trials()}
    for t in trials.values():
        assert t.status == "done"
        assert {"robust/clean", "robust/pgd-linf/0.1", "robust/square/0.3", "flag/masking/zero-gradients"} <= set(
            t.metrics)
    assert not any(k.startswith("robust/transfer") for k in trials["backprop-adam"].metrics)
    sgd = trials["backprop-sgd"].metrics
    assert all(0.0 <= sgd[f"robust/transfer/{eps}"] <= sgd["robust/clean"] for eps in ("0.05", "0.1", "0.2", "0.3"))
    assert "flag/masking/transfer-beats-white-box" in sgd
