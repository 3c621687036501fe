"""The feedback-rule API: rules are objects handed to a converter that knows none by name, a rule defined outside
learnbench trains through it, and adding one is a single plugin file (examples/feedback-rule/)."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnbench import Batch, TaskInfo, models
from learnbench.algorithms import (direct_feedback_alignment, feedback_alignment, feedback_layers,
                                   feedback_training, kolen_pollack, sign_symmetry)
from learnbench.algorithms.backprop import Backprop
from learnbench.algorithms.direct_feedback_alignment import DirectFeedbackAlignmentRule
from learnbench.algorithms.feedback_alignment import FeedbackAlignmentRule
from learnbench.algorithms.feedback_layers import FeedbackRule, convert
from learnbench.algorithms.kolen_pollack import KolenPollack, KolenPollackRule
from learnbench.algorithms.sign_symmetry import SignSymmetryRule
from learnbench.cost import optimizer_flops
from learnbench.registry import discover, load_plugin_file
from learnbench.testing import check_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "feedback-rule" / "redrawn_feedback.py"
SHAPE = (1, 8, 8)
TASK = TaskInfo(SHAPE, 10, 64, torch.device("cpu"))
RULE_IDS = {"fa", "dfa", "kp", "sign", "sign-symmetry", "kolen-pollack"}


class TransposeRule(FeedbackRule):
    """B = W: the backward of backprop, written as a rule outside learnbench."""

    def backward_matrix(self, layer: nn.Module, weight: Tensor) -> Tensor:
        return weight


def build(spec: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.build(spec, SHAPE, 10)


def data(n: int = 16, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g))


def string_constants(module) -> set[str]:
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_the_mechanism_and_the_shared_trainer_know_no_rule_by_name() -> None:
    for module in (feedback_layers, feedback_training):
        assert not string_constants(module) & RULE_IDS, module.__name__


@pytest.mark.parametrize("spec", [{"kind": "mlp", "hidden": [12, 12]}, {"kind": "cnn", "norm": "batch"}],
                         ids=["mlp", "cnn"])
def test_a_rule_defined_outside_learnbench_runs_through_the_converter(spec: dict) -> None:
    model, batch = build(spec), data()
    reference = copy.deepcopy(model)
    conversion = convert(model, TransposeRule(), torch.Generator().manual_seed(0))
    assert all(layer.feedback_rule is conversion.rule for layer in conversion.layers.values())
    assert all(layer.weight_feedback is None for layer in conversion.layers.values())  # make_feedback's default
    inputs = [batch.x.clone().requires_grad_() for _ in range(2)]
    for net, x in zip((model, reference), inputs):
        F.cross_entropy(net(x), batch.y).backward()
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, rtol=1e-5, atol=1e-7)
    for (key, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("rule", [FeedbackAlignmentRule, KolenPollackRule, SignSymmetryRule,
                                  DirectFeedbackAlignmentRule], ids=lambda r: r.__name__)
def test_layers_give_b_shaped_like_w_or_none(rule) -> None:
    conversion = convert(build({"kind": "cnn"}), rule(), torch.Generator().manual_seed(0), input_shape=SHAPE)
    for layer in conversion.layers.values():
        matrix = layer.feedback_matrix()
        if rule is DirectFeedbackAlignmentRule:  # its matrices map the output error, not the layer's own
            assert matrix is None
        else:
            assert matrix.shape == layer.weight.shape


def test_a_rule_missing_its_input_error_says_so() -> None:
    class NoError(FeedbackRule):
        def backward_matrix(self, layer: nn.Module, weight: Tensor) -> None:
            return None

    model = build({"kind": "mlp", "hidden": [8]})
    convert(model, NoError(), torch.Generator())
    x = data().x.requires_grad_()
    with pytest.raises(NotImplementedError, match="input_error"):
        model(x).sum().backward()


def test_each_built_in_file_holds_its_rule_and_its_trainer() -> None:
    for module in (feedback_alignment, direct_feedback_alignment, sign_symmetry, kolen_pollack):
        rules = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, FeedbackRule)
                 and v.__module__ == module.__name__]
        trainers = [v for v in vars(module).values() if isinstance(v, type)
                    and issubclass(v, Backprop) and v.__module__ == module.__name__]
        assert len(rules) == 1 and len(trainers) == 1, module.__name__
        assert trainers[0].__bases__ == (Backprop,)  # one base class: no chain between trainers
        trainer = trainers[0](batch_size=16)
        trainer.setup(build({"kind": "mlp", "hidden": [8]}), TASK, torch.Generator().manual_seed(0))
        assert type(trainer.conversion.rule) is rules[0]


@pytest.mark.parametrize("decay", [0.1, 0.0])
def test_kolen_pollack_declares_its_decay_flops(decay: float) -> None:
    trainer = KolenPollack(batch_size=16, decay=decay)
    trainer.setup(build({"kind": "mlp", "hidden": [12]}), TASK, torch.Generator().manual_seed(0))
    weights = sum(layer.weight.numel() for layer in trainer.conversion.layers.values())
    expected = optimizer_flops(trainer._optimizer) + (weights if decay else 0)  # 1 FLOP per weight and step
    assert trainer.step(data()).extra_flops == expected


# --- the example plugin: a new rule is one file ---------------------------------------------------------------

@pytest.fixture(scope="module")
def example():
    (entry,) = load_plugin_file(EXAMPLE)
    return entry


def test_the_example_rule_passes_the_conformance_kit(example) -> None:
    assert example.name == "redrawn-feedback" and discover([EXAMPLE]).get("redrawn-feedback").cls is example.cls
    failed = [result.line() for result in check_trainer(example) if not result.passed]
    assert not failed, failed


def test_the_example_redraws_b_at_every_step_from_the_given_generator(example) -> None:
    runs = []
    for _ in range(2):
        trainer = example.cls(batch_size=16)
        trainer.setup(build({"kind": "mlp", "hidden": [12]}), TASK, torch.Generator().manual_seed(0))
        layers = list(trainer.conversion.layers.values())
        history = [[layer.feedback_matrix().clone() for layer in layers]]
        for step in range(3):
            stats = trainer.step(data(seed=step))
            history.append([layer.feedback_matrix().clone() for layer in layers])
        runs.append(history)
        weights = sum(layer.weight.numel() for layer in layers)
        assert stats.extra_flops == optimizer_flops(trainer._optimizer) + 2 * weights
    for before, after in zip(runs[0], runs[0][1:]):
        assert all(not torch.equal(b, a) for b, a in zip(before, after))  # every layer's B is new after a step
    for ours, again in zip(runs[0], runs[1]):  # the same seed draws the same Bs
        assert all(torch.equal(b, a) for b, a in zip(ours, again))
