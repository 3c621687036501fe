"""Diagnostics against references: closed forms for the update-gradient cosine (SGD: 1; Adam's first step:
sign-like), independent autograd for gradient norms, finite differences on an independent NumPy forward pass for
influence attribution, and plain backprop for gradient checkpointing."""

from __future__ import annotations

import copy
import json
import math
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from learnbench import Batch, StepStats, TaskInfo, models
from learnbench.algorithms.backprop import Backprop
from learnbench.algorithms.direct_feedback_alignment import DirectFeedbackAlignment
from learnbench.algorithms.feedback_alignment import FeedbackAlignment
from learnbench.cli import main
from learnbench.diagnostics import get_probe
from learnbench.diagnostics.alignment import AlignmentProbe
from learnbench.diagnostics.gradient_flow import GradientFlowProbe, flow_flags
from learnbench.diagnostics.influence import LayerInfluence, attributions, summarize
from learnbench.diagnostics.update_grad import UpdateGradProbe
from learnbench.runner import run_trial

from helpers import make_trials

SHAPE = (1, 8, 8)
TASK = TaskInfo(SHAPE, 10, 256, torch.device("cpu"))


def batches(n: int = 32, count: int = 4, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch(torch.rand(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)) for _ in range(count)]


def built(trainer, spec: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = models.build(spec, SHAPE, 10)
    trainer.setup(model, TASK, torch.Generator().manual_seed(seed))
    return model


def probed(probes: list, trainer, batch: Batch) -> dict[str, float]:
    for probe in probes:
        probe.before_step(batch)
    trainer.step(batch)
    values: dict[str, float] = {}
    for probe in probes:
        values.update(probe.after_step(batch))
    return values


def reference_gradient(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Plain autograd on a copy: d cross-entropy / d parameter."""
    twin = copy.deepcopy(model)
    F.cross_entropy(twin(batch.x), batch.y).backward()
    return {name: p.grad for name, p in twin.named_parameters()}


LAYERS = ["blocks.0.0", "blocks.1.0", "head"]


# --- update-gradient alignment -------------------------------------------------------------------------------------

def test_sgd_backprop_update_is_the_negative_gradient() -> None:
    trainer = Backprop(batch_size=32, optimizer="sgd", lr=0.1)
    model = built(trainer, {"kind": "mlp", "hidden": [16, 16]})
    probe = UpdateGradProbe(model, trainer, TASK)
    for batch in batches():
        values = probed([probe], trainer, batch)
        assert values["cos/update-grad"] == pytest.approx(1, abs=1e-6)
        for layer in LAYERS:
            assert values[f"cos/update-grad/{layer}"] == pytest.approx(1, abs=1e-6)


def test_adam_first_step_cosine_matches_its_closed_form() -> None:
    """Adam's first update is -lr g / (|g| + eps) per coordinate (bias-corrected moments are g and g^2), so its
    cosine with -g is sum|g| / (sqrt(n) |g|) (n: the nonzero g_i) for eps << |g|: below 1 unless every nonzero
    |g_i| is equal."""
    trainer = Backprop(batch_size=32, optimizer="adam", lr=1e-3)
    model = built(trainer, {"kind": "mlp", "hidden": [16, 16]})
    batch = batches()[0]
    grads = reference_gradient(model, batch)
    values = probed([UpdateGradProbe(model, trainer, TASK)], trainer, batch)
    g = torch.cat([v.flatten() for v in grads.values()]).double()
    step = g / (g.abs() + 1e-8)
    expected = float(step @ g / (step.norm() * g.norm()))
    assert values["cos/update-grad"] == pytest.approx(expected, rel=1e-4)
    assert values["cos/update-grad"] < 0.95
    head = torch.cat([grads["head.weight"].flatten(), grads["head.bias"]]).double()  # ReLU zeros: sign 0
    sign_cosine = float(head.abs().sum() / (head.count_nonzero() ** 0.5 * head.norm()))
    assert values["cos/update-grad/head"] == pytest.approx(sign_cosine, rel=1e-4)


class VectorTrainer:
    """An ES-like trainer: it keeps a flat mean, moves it by a prescribed direction, and `eval_model` loads the mean
    into the module (as learnbench.population.load does). The direction is -g plus noise of a known size."""

    name = "vector"

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self.model, self.generator = model, generator
        self.mean = nn.utils.parameters_to_vector(model.parameters()).detach().clone()

    def step(self, batch: Batch) -> StepStats:
        grads = reference_gradient(self.eval_model(), batch)
        g = torch.cat([v.flatten() for v in grads.values()])
        noise = torch.randn(g.shape, generator=self.generator)
        self.direction = -g + 2 * g.norm() * noise / noise.norm()
        self.expected = float(F.cosine_similarity(self.direction.double(), -g.double(), dim=0))
        self.mean += 0.01 * self.direction
        return StepStats(loss=0.0, forward_passes=batch.y.shape[0])

    def eval_model(self) -> nn.Module:
        with torch.no_grad():
            nn.utils.vector_to_parameters(self.mean, self.model.parameters())
        return self.model


def test_any_trainer_cosine_is_that_of_the_direction_it_took() -> None:
    trainer = VectorTrainer()
    model = built(trainer, {"kind": "resmlp", "width": 16, "depth": 3})
    probe = UpdateGradProbe(model, trainer, TASK)
    for batch in batches(count=2):
        values = probed([probe], trainer, batch)
        assert values["cos/update-grad"] == pytest.approx(trainer.expected, abs=1e-5)
        assert 0.2 < values["cos/update-grad"] < 0.8


def test_fa_head_is_a_gradient_step_and_hidden_layers_are_not() -> None:
    trainer = FeedbackAlignment(batch_size=32, optimizer="sgd", lr=0.1)
    model = built(trainer, {"kind": "mlp", "hidden": [16, 16]})
    values = probed([UpdateGradProbe(model, trainer, TASK)], trainer, batches()[0])
    assert values["cos/update-grad/head"] == pytest.approx(1, abs=1e-6)
    assert values["cos/update-grad/blocks.0.0"] < 0.9


# --- gradient flow ------------------------------------------------------------------------------------------------

def test_gradient_and_update_norms_against_autograd() -> None:
    trainer = Backprop(batch_size=32, optimizer="sgd", lr=0.1)
    model = built(trainer, {"kind": "mlp", "hidden": [16, 16]})
    batch = batches()[0]
    grads = reference_gradient(model, batch)
    values = probed([GradientFlowProbe(model, trainer, TASK)], trainer, batch)
    for layer in LAYERS:
        norm = float(torch.cat([grads[f"{layer}.weight"].flatten(), grads[f"{layer}.bias"]]).norm())
        assert values[f"grad/norm/{layer}"] == pytest.approx(norm, rel=1e-5)
        assert values[f"update/norm/{layer}"] == pytest.approx(0.1 * norm, rel=1e-4)
    assert values["grad/first-last-ratio"] == pytest.approx(values["grad/norm/blocks.0.0"] / values["grad/norm/head"])


@pytest.mark.parametrize("kind, vanishing", [("mlp", 1.0), ("resmlp", 0.0)])
def test_twenty_sigmoid_layers_vanish_without_skips(kind: str, vanishing: float) -> None:
    trainer = Backprop(batch_size=32, optimizer="sgd")
    model = built(trainer, {"kind": kind, "width": 32, "depth": 20, "activation": "sigmoid"})
    values = probed([GradientFlowProbe(model, trainer, TASK)], trainer, batches()[0])
    assert values["flag/vanishing"] == vanishing
    assert values["flag/exploding"] == 0.0
    assert (values["grad/first-last-ratio"] < 1e-10) == (kind == "mlp")  # mlp: ~1e-17; resmlp: ~1e-2


def test_flag_thresholds() -> None:
    assert flow_flags([1.0, 2e3]) == {"grad/first-last-ratio": 5e-4, "flag/vanishing": 1.0, "flag/exploding": 0.0}
    assert flow_flags([2e3, 1.0])["flag/exploding"] == 1.0
    assert flow_flags([1.0, 1.0, 1.0])["flag/vanishing"] == 0.0
    assert flow_flags([1.0]) == {} and flow_flags([1.0, 0.0]) == {}


# --- the probes together --------------------------------------------------------------------------------------------

def test_probes_of_one_step_share_one_true_gradient() -> None:
    trainer = Backprop(batch_size=32, optimizer="sgd", lr=0.1)
    model = built(trainer, {"kind": "mlp", "hidden": [16, 16]})
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    probes = [get_probe(n)(model, trainer, TASK) for n in ("alignment", "gradient-flow", "update-grad")]
    batch = batches()[0]
    for probe in probes:
        probe.before_step(batch)
    assert len(calls) == 1
    trainer.step(batch)
    values = {k: v for p in probes for k, v in p.after_step(batch).items()}
    # the weights-only angle and the weight+bias cosine of one SGD step: both exact descent
    assert values["align/update-grad/head"] == pytest.approx(0, abs=0.1)
    assert values["cos/update-grad/head"] == pytest.approx(1, abs=1e-6)
    calls.clear()
    for probe in probes:  # the same batch after the step: parameters moved, so computed afresh, once
        probe.before_step(batch)
    assert len(calls) == 1


def test_probes_leave_training_unchanged() -> None:
    spec = {"kind": "cnn", "channels": [4], "norm": "batch"}
    runs = []
    for with_probes in (False, True):
        torch.manual_seed(123)
        trainer = FeedbackAlignment(batch_size=32)
        model = built(trainer, spec)
        probes = [GradientFlowProbe(model, trainer, TASK), UpdateGradProbe(model, trainer, TASK),
                  AlignmentProbe(model, trainer, TASK)]
        for batch in batches():
            probed(probes, trainer, batch) if with_probes else trainer.step(batch)
        runs.append({k: v.clone() for k, v in model.state_dict().items()} | {"rng": torch.rand(3)})
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_runner_records_the_issue_metric_names() -> None:
    trial = make_trials({"models": [{"kind": "resmlp", "width": 16, "depth": 3}], "budget": {"steps": 12},
                         "diagnostics": {"every": 4, "probes": ["gradient-flow", "update-grad"]},
                         "algorithms": [{"id": "backprop", "batch_size": 32, "optimizer": "sgd"}]})[0]
    result = run_trial(trial, None)
    assert result.status == "done", result.error
    metrics = result.metrics
    for layer in ["blocks.0.0", "blocks.1.0", "blocks.2.0", "head"]:
        assert metrics[f"grad/norm/{layer}"] > 0 and metrics[f"update/norm/{layer}"] > 0
        assert metrics[f"cos/update-grad/{layer}"] == pytest.approx(1, abs=1e-5)
    assert metrics["cos/update-grad"] == pytest.approx(1, abs=1e-5)
    assert metrics["flag/vanishing"] in (0.0, 1.0) and metrics["flag/exploding"] in (0.0, 1.0)
    probe_steps = {row[0] for row in result.curves if row[4] == "cos/update-grad"}
    assert probe_steps == {1, 5, 9}  # steps 0, 4, 8 are probed; their rows carry the count after the step


# --- influence ------------------------------------------------------------------------------------------------------

def numpy_influence(model: models.MLP, x: np.ndarray, eps: float = 1e-6) -> list[np.ndarray]:
    """Brute force, independent of learnbench: a NumPy tanh MLP whose target layer l reads sum_k c_k * f_k
    (resmlp) or c * f_{l-1} (mlp); the attribution of (k, i) on (l, j) is d f_l[j] / d c_k[i] at c = 1, by central
    differences. Returns per target layer the mean |attribution| [K, W, out]."""
    layers = [(b[0].weight.detach().double().numpy(), b[0].bias.detach().double().numpy()) for b in model.blocks]
    head = (model.head.weight.detach().double().numpy(), model.head.bias.detach().double().numpy())
    f, h = [], x
    for k, (w, b) in enumerate(layers):
        f.append(np.tanh(h @ w.T + b))
        h = h + f[-1] if model.residual and k > 0 else f[-1]
    out = []
    for l in range(1, len(layers) + 1):
        sources = list(range(l)) if model.residual else [l - 1]
        w, b = layers[l] if l < len(layers) else head
        act = np.tanh if l < len(layers) else (lambda z: z)

        def target(gates):  # gates [K, W] multiply each source component in layer l's input only
            stream = sum(g * f[k] for g, k in zip(gates, sources))
            return act(stream @ w.T + b)  # [N, out]

        ones = np.ones((len(sources), f[0].shape[1]))
        scores = np.zeros((len(sources), f[0].shape[1], w.shape[0]))
        for kk in range(len(sources)):
            for i in range(f[0].shape[1]):
                up, down = ones.copy(), ones.copy()
                up[kk, i] += eps
                down[kk, i] -= eps
                scores[kk, i] = np.abs((target(up) - target(down)) / (2 * eps)).mean(0)
        out.append(scores)
    return out


@pytest.mark.parametrize("kind", ["mlp", "resmlp"])
def test_influence_matches_finite_differences(kind: str) -> None:
    torch.manual_seed(0)
    model = models.build({"kind": kind, "width": 4, "depth": 4, "activation": "tanh"}, (5,), 3).double().eval()
    x = torch.randn(7, 5, dtype=torch.float64)
    ours = attributions(model, x, chunk=3)  # chunks of 3 examples: the sum over chunks is checked too
    reference = numpy_influence(model, x.numpy())
    assert [layer.layer for layer in ours] == ["blocks.1.0", "blocks.2.0", "blocks.3.0", "head"]
    for layer, expected in zip(ours, reference):
        assert layer.sources == (list(range(layer.index)) if kind == "resmlp" else [layer.index - 1])
        np.testing.assert_allclose(layer.scores.numpy(), expected, rtol=1e-6, atol=1e-9)


def test_influence_summary_by_hand() -> None:
    scores = torch.zeros(3, 2, 2)  # [K, W, out]; target layer 3 reads layers 0, 1, 2 (distances 3, 2, 1)
    scores[0, 1, 0], scores[2, 0, 0] = 5.0, 4.0  # unit 0: top-2 at distances 3 and 1
    scores[1, 0, 1], scores[1, 1, 1] = 3.0, 2.0  # unit 1: top-2 both at distance 2
    scores[0, 0, 1] = 1.0
    metrics = summarize(LayerInfluence("blocks.3.0", 3, [0, 1, 2], scores), top=2)
    assert metrics["influence/share/blocks.3.0/1"] == 0.25
    assert metrics["influence/share/blocks.3.0/2"] == 0.5
    assert metrics["influence/share/blocks.3.0/3"] == 0.25
    assert metrics["influence/mean-distance/blocks.3.0"] == 2.0
    assert metrics["influence/mass-distance/blocks.3.0"] == pytest.approx((3 * 6 + 2 * 5 + 1 * 4) / 15)


@pytest.mark.slow
def test_diagnose_command(tmp_path, capsys) -> None:
    suite = tmp_path / "deep-tiny.toml"
    suite.write_text(textwrap.dedent("""
        name = "deep-tiny"
        datasets = ["digits"]
        [[models]]
        kind = "mlp"
        width = 8
        depth = 3
        [[models]]
        kind = "resmlp"
        width = 8
        depth = 3
        [budget]
        steps = 10
        [eval]
        points = 2
        [robustness]
        examples = 0
        [diagnostics]
        every = 5
        probes = ["gradient-flow", "update-grad"]
        [[algorithms]]
        id = "backprop"
        batch_size = 16
    """))
    run = tmp_path / "run"
    assert main(["run", str(suite), "--out", str(run), "--workers", "1", "--quiet"]) == 0
    assert main(["diagnose", str(run), "--trial", "zzz"]) == 2
    assert main(["diagnose", str(run), "--examples", "40"]) == 0
    capsys.readouterr()
    assert main(["show", str(run), "--json"]) == 0
    trials = {t["model"]: t["metrics"] for t in json.loads(capsys.readouterr().out)["trials"]}
    assert trials["mlp-8x3"]["influence/mean-distance/head"] == 1.0  # no skips: the layer before, always
    assert trials["mlp-8x3"]["influence/share/head/3"] == 0.0
    resmlp = trials["resmlp-8x3"]
    assert 1.0 <= resmlp["influence/mean-distance/head"] <= 3.0
    assert sum(resmlp[f"influence/share/head/{d}"] for d in (1, 2, 3)) == pytest.approx(1.0)
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "Influence locality" in report and "influence.svg" in report and "gradient-profile.svg" in report


# --- gradient checkpointing ----------------------------------------------------------------------------------------

SPECS = [{"kind": "mlp", "hidden": [16, 16, 16]}, {"kind": "resmlp", "width": 16, "depth": 6, "activation": "tanh"},
         {"kind": "cnn", "channels": [4, 8]}]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["kind"])
def test_checkpointing_gives_backprops_gradients(spec: dict) -> None:
    batch, grads = batches()[0], []
    for segments in (0, 3):
        trainer = Backprop(batch_size=32, optimizer="sgd", checkpoint_segments=segments)
        model = built(trainer, spec)
        calls = []
        first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        first.register_forward_hook(lambda *args: calls.append(1))
        trainer.step(batch)
        assert len(calls) == (2 if segments else 1)  # the checkpointed segment was recomputed in backward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7)


def test_stages_compose_to_the_forward() -> None:
    x = torch.rand(4, 1, 28, 28)
    for spec in [*SPECS, {"kind": "lenet"}, {"kind": "mlp", "hidden": [8], "norm": "layer"}]:
        model = models.build(spec, (1, 28, 28), 10)
        h = x
        for stage in model.stages():
            h = stage(h)
        assert torch.equal(h, model(x)), spec


def test_checkpointing_with_feedback_alignment_and_refusals() -> None:
    params = []
    for segments in (0, 2):
        trainer = FeedbackAlignment(batch_size=32, optimizer="sgd", checkpoint_segments=segments)
        model = built(trainer, SPECS[1])
        for batch in batches():
            trainer.step(batch)
        params.append(nn.utils.parameters_to_vector(model.parameters()).detach())
    torch.testing.assert_close(params[1], params[0], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="forward hooks"):
        built(DirectFeedbackAlignment(checkpoint_segments=2), SPECS[0])
    with pytest.raises(ValueError, match="BatchNorm"):
        built(Backprop(checkpoint_segments=2), {"kind": "mlp", "hidden": [8], "norm": "batch"})
    with pytest.raises(ValueError, match="exceeds"):
        built(Backprop(checkpoint_segments=9), {"kind": "mlp", "hidden": [8]})
    with pytest.raises(ValueError, match=">= 0"):
        built(Backprop(checkpoint_segments=-1), {"kind": "mlp", "hidden": [8]})


def test_deep_model_specs() -> None:
    spec = models.normalize_spec({"kind": "mlp", "width": 128, "depth": 12, "activation": "sigmoid"})
    assert spec["hidden"] == [128] * 12 and models.label(spec) == "mlp-128x12-sigmoid"
    model = models.build({"kind": "resmlp", "width": 128, "depth": 20, "activation": "tanh"}, (1, 28, 28), 10)
    assert len(model.blocks) == 20 and math.isfinite(float(model(torch.rand(2, 1, 28, 28)).detach().sum()))


def test_update_grad_reports_each_part_of_a_hybrid_update() -> None:
    """guided-es with the true gradient as surrogate: its surrogate part is -grad exactly (cosine 1); its ES estimate
    lies close to it; fa's surrogate is not the gradient (cosine < 1). openai-es reports its estimate too."""
    from learnbench.algorithms.guided_es import GuidedES
    from learnbench.algorithms.openai_es import OpenAIES

    values = {}
    for name, trainer in (("backprop", GuidedES(surrogate="backprop", popsize=64)), ("fa", GuidedES(surrogate="fa")),
                          ("openai-es", OpenAIES(popsize=64, noise_table=0))):
        model = built(trainer, {"kind": "mlp", "hidden": [16, 16]})
        values[name] = probed([UpdateGradProbe(model, trainer, TASK)], trainer, batches()[0])
    assert values["backprop"]["cos/part-grad/surrogate"] == pytest.approx(1, abs=1e-5)
    assert 0.5 < values["backprop"]["cos/part-grad/es-estimate"] < 1
    assert values["fa"]["cos/part-grad/surrogate"] < 0.99
    assert set(values["openai-es"]) >= {"cos/update-grad", "cos/part-grad/es-estimate"}
    assert "cos/part-grad/surrogate" not in values["openai-es"]
