"""The alignment probe against closed forms (SGD backprop: the update is the negative gradient) and its promise to
leave training untouched."""

from __future__ import annotations

import pytest
import torch

from learnbench import Batch, TaskInfo, models
from learnbench.algorithms.backprop import Backprop
from learnbench.algorithms.direct_feedback_alignment import DirectFeedbackAlignment
from learnbench.algorithms.feedback_alignment import FeedbackAlignment
from learnbench.algorithms.kolen_pollack import KolenPollack
from learnbench.algorithms.sign_symmetry import SignSymmetry
from learnbench.algorithms.feedback_layers import set_feedback_to_weights
from learnbench.diagnostics import PROBES, get_probe
from learnbench.diagnostics.alignment import AlignmentProbe
from learnbench.errors import UsageError


pytestmark = pytest.mark.usefixtures("one_thread")


SHAPE = (1, 8, 8)
TASK = TaskInfo(SHAPE, 10, 256, torch.device("cpu"))


def data(n: int = 32, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch(torch.rand(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)) for _ in range(6)]


def setup(trainer, spec: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = models.build(spec, SHAPE, 10)
    trainer.setup(model, TASK, torch.Generator().manual_seed(seed))
    return model, AlignmentProbe(model, trainer, TASK)


def probed_step(probe: AlignmentProbe, trainer, batch: Batch) -> dict[str, float]:
    probe.before_step(batch)
    trainer.step(batch)
    return probe.after_step(batch)


def test_sgd_backprop_update_is_the_negative_true_gradient() -> None:
    trainer = Backprop(batch_size=32, optimizer="sgd", lr=0.1)
    _, probe = setup(trainer, {"kind": "mlp", "hidden": [16, 16]})
    values = probed_step(probe, trainer, data()[0])
    layers = ["blocks.0.0", "blocks.1.0", "head"]
    for layer in layers:
        assert values[f"align/update-grad/{layer}"] == pytest.approx(0, abs=0.1)
        assert values[f"align/estimate-grad/{layer}"] == pytest.approx(0, abs=0.1)
        assert values[f"align/norm-ratio/{layer}"] == pytest.approx(1, rel=1e-4)
    assert not any(key.startswith("align/B-W/") for key in values)


def test_fa_with_b_equal_w_and_sgd_is_aligned_and_random_b_is_not() -> None:
    trainer = FeedbackAlignment(batch_size=32, optimizer="sgd", lr=0.1)
    _, probe = setup(trainer, {"kind": "mlp", "hidden": [16, 16]})
    batches = data()
    values = probed_step(probe, trainer, batches[0])
    assert values["align/estimate-grad/head"] == pytest.approx(0, abs=0.1)  # the output layer's update is true
    assert values["align/estimate-grad/blocks.0.0"] > 20
    assert 60 < values["align/B-W/blocks.0.0"] < 120  # independent random matrices
    set_feedback_to_weights(trainer.conversion)
    values = probed_step(probe, trainer, batches[1])
    for layer in ["blocks.0.0", "blocks.1.0", "head"]:
        assert values[f"align/update-grad/{layer}"] == pytest.approx(0, abs=0.1)
        assert values[f"align/B-W/{layer}"] < 1  # B = W before the step; measured after W moved


@pytest.mark.parametrize("cls", [FeedbackAlignment, DirectFeedbackAlignment, SignSymmetry, KolenPollack],
                         ids=lambda c: c.name)
def test_metrics_per_algorithm(cls) -> None:
    trainer = cls(batch_size=32)
    _, probe = setup(trainer, {"kind": "cnn", "channels": [4]})
    values = probed_step(probe, trainer, data()[0])
    for layer in ["features.0", "head"]:
        assert 0 <= values[f"align/update-grad/{layer}"] <= 180
        assert values[f"align/norm-ratio/{layer}"] > 0
    has_b_w = any(key.startswith("align/B-W/") for key in values)
    assert has_b_w == (cls is not DirectFeedbackAlignment)


def test_probe_leaves_training_unchanged() -> None:
    """BatchNorm statistics, parameters and dropout's RNG come out the same with and without the probe."""
    spec = {"kind": "cnn", "channels": [4], "norm": "batch"}
    runs = []
    for with_probe in (False, True):
        torch.manual_seed(123)  # the global RNG the steps draw from
        trainer = FeedbackAlignment(batch_size=32)
        model, probe = setup(trainer, spec)
        for batch in data():
            probed_step(probe, trainer, batch) if with_probe else trainer.step(batch)
        runs.append({k: v.clone() for k, v in model.state_dict().items()} | {"rng": torch.rand(3)})
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_registry() -> None:
    assert get_probe("alignment") is AlignmentProbe
    assert "alignment" in PROBES
    with pytest.raises(UsageError, match="alignment"):
        get_probe("nope")

