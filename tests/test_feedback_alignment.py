"""Feedback-alignment family: the converter against autograd and hand-written references, and each trainer on
scikit-learn's digits with a tiny budget."""

from __future__ import annotations

import copy
import math
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from learnbench import Batch, TaskInfo, models
from learnbench.algorithms.direct_feedback_alignment import DirectFeedbackAlignment, DirectFeedbackAlignmentRule
from learnbench.algorithms.feedback_alignment import FeedbackAlignment, FeedbackAlignmentRule
from learnbench.algorithms.feedback_layers import convert, set_feedback_to_weights
from learnbench.algorithms.kolen_pollack import KolenPollack, KolenPollackRule
from learnbench.algorithms.sign_symmetry import SignSymmetry, SignSymmetryRule
from learnbench.diagnostics.alignment import angle


pytestmark = pytest.mark.usefixtures("one_thread")


SHAPE = (1, 16, 16)  # small enough for speed, big enough for LeNet
BUILT_IN = {
    "mlp": {"kind": "mlp", "hidden": [24, 12]},
    "resmlp": {"kind": "resmlp", "hidden": [16, 16, 16]},
    "cnn": {"kind": "cnn"},
    "cnn-batch": {"kind": "cnn", "norm": "batch"},
    "cnn-layer": {"kind": "cnn", "norm": "layer"},
    "lenet": {"kind": "lenet"},
}
TRAINERS = [FeedbackAlignment, DirectFeedbackAlignment, SignSymmetry, KolenPollack]
RULES = {"fa": FeedbackAlignmentRule, "kp": KolenPollackRule, "sign": SignSymmetryRule,
         "dfa": DirectFeedbackAlignmentRule}  # test id -> rule class, built with its defaults


class UserNet(nn.Module):
    """A user model: strided, dilated, grouped and 'same'-padded convs, no bias, and a Linear on 3-D input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 8, 3, padding="same", dilation=2, groups=2)
        self.token = nn.Linear(8, 6)
        self.out = nn.Linear(6 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv2(F.relu(self.conv1(x))))  # [N, 8, 8, 8]
        h = self.token(h.flatten(2).transpose(1, 2))  # [N, 64, 6]: Linear on a 3-D input
        return self.out(F.gelu(h).flatten(1))


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return UserNet() if name == "user" else models.build(BUILT_IN[name], SHAPE, 10)


def batch(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, input_grad: bool = True) -> dict[str, torch.Tensor]:
    """Loss gradients w.r.t. every parameter and (when `input_grad`, as attacks ask) the input."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(input_grad)
    F.cross_entropy(model(x), y).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {**grads, "input": x.grad} if input_grad else grads


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", [*BUILT_IN, "user"])
@pytest.mark.parametrize("rule", ["fa", "kp"])
def test_feedback_equal_to_weights_gives_autograd_gradients(name: str, rule: str) -> None:
    model, x_y = build(name), batch()
    reference = copy.deepcopy(model).train()
    set_feedback_to_weights(convert(model.train(), RULES[rule](), generator()))  # B = W^T in the paper's notation
    for input_grad in (True, False):  # without an input gradient the first layer takes autograd's own path
        ours, expected = gradients(model, *x_y, input_grad), gradients(reference, *x_y, input_grad)
        assert ours.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(ours[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["mlp", "cnn-batch", "lenet"])
def test_b_equal_w_matches_autograd_under_bfloat16_autocast(name: str) -> None:
    """The backward casts saved fp32 inputs to the gradient's dtype, as autograd's graph of casts does."""
    model, (x, y) = build(name), batch()
    reference = copy.deepcopy(model)
    set_feedback_to_weights(convert(model, FeedbackAlignmentRule(), generator()))
    for net in (model, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(x)
        F.cross_entropy(logits.float(), y).backward()
    for (key, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert ours.grad.dtype == torch.float32
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", ["mlp", "cnn-batch", "user"])
def test_sign_rule_is_fa_with_b_set_to_scaled_sign_of_w(name: str) -> None:
    sign_model, x_y = build(name), batch()
    fa_model = copy.deepcopy(sign_model)
    convert(sign_model, SignSymmetryRule(), generator())
    fa = convert(fa_model, FeedbackAlignmentRule(), generator())
    with torch.no_grad():
        for layer in fa.layers.values():
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
            layer.weight_feedback.copy_(torch.sign(layer.weight) * math.sqrt(2 / (fan_in + fan_out)))
    ours, expected = gradients(sign_model, *x_y), gradients(fa_model, *x_y)
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_dfa_with_one_hidden_layer_equals_fa_and_with_b_equal_w2_equals_backprop() -> None:
    torch.manual_seed(0)
    dfa_model = models.build({"kind": "mlp", "hidden": [20]}, SHAPE, 10)
    fa_model, bp_model = copy.deepcopy(dfa_model), copy.deepcopy(dfa_model)
    dfa = convert(dfa_model, DirectFeedbackAlignmentRule(), generator(1), input_shape=SHAPE)
    fa = convert(fa_model, FeedbackAlignmentRule(), generator(2))
    with torch.no_grad():  # the matrix DFA sends the output error through to the hidden layer = FA's B2
        dfa.layers["head"].weight_feedback.copy_(fa.layers["head"].weight_feedback)
    x, y = batch()
    ours, expected = gradients(dfa_model, x, y), gradients(fa_model, x, y)
    for key in ("blocks.0.0.weight", "blocks.0.0.bias", "head.weight", "head.bias"):
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)
    with torch.no_grad():
        dfa.layers["head"].weight_feedback.copy_(dfa_model.head.weight)
    ours, expected = gradients(dfa_model, x, y), gradients(bp_model, x, y)
    for key in ("blocks.0.0.weight", "blocks.0.0.bias", "head.weight", "head.bias"):
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)


def test_dfa_matches_a_hand_written_reference_on_two_hidden_layers() -> None:
    """Nøkland's eqs: delta_l = (e B_l) * f'(a_l); every layer's update is delta_l^T h_{l-1}."""
    torch.manual_seed(0)
    model = models.build({"kind": "mlp", "hidden": [20, 16], "activation": "tanh"}, SHAPE, 10)
    conversion = convert(model, DirectFeedbackAlignmentRule(), generator(), input_shape=SHAPE)
    x, y = batch()
    grads = gradients(model, x, y)
    w1, w2, w3 = model.blocks[0][0].weight, model.blocks[1][0].weight, model.head.weight
    with torch.no_grad():
        h0 = x.flatten(1)
        a1 = h0 @ w1.T + model.blocks[0][0].bias
        a2 = torch.tanh(a1) @ w2.T + model.blocks[1][0].bias
        logits = torch.tanh(a2) @ w3.T + model.head.bias
        e = (logits.softmax(1) - F.one_hot(y, 10)) / len(y)  # dL/dlogits of the mean cross-entropy
        d2 = (e @ conversion.layers["head"].weight_feedback) * (1 - torch.tanh(a2) ** 2)
        d1 = (e @ conversion.layers["blocks.1.0"].weight_feedback) * (1 - torch.tanh(a1) ** 2)
        expected = {"head.weight": e.T @ torch.tanh(a2), "blocks.1.0.weight": d2.T @ torch.tanh(a1),
                    "blocks.0.0.weight": d1.T @ h0, "blocks.0.0.bias": d1.sum(0),
                    # the pseudo input gradient: e projected into pixel space by the first layer's matrix
                    "input": (e @ conversion.layers["blocks.0.0"].weight_feedback).view_as(x)}
    for key, value in expected.items():
        torch.testing.assert_close(grads[key], value, rtol=1e-4, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", [*BUILT_IN, "user"])
@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_convert_then_undo_gives_back_the_identical_model(name: str, rule: str) -> None:
    model = build(name).eval()
    x, _ = batch()
    modules_before = [id(m) for m in model.modules()]
    state_before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    expected = model(x)
    conversion = convert(model, RULES[rule](), generator(), input_shape=SHAPE)
    assert torch.equal(model(x), expected)  # the forward pass is bit-identical
    assert torch.equal(conversion.plain.eval()(x), expected)
    plain_ptrs = {k: v.data_ptr() for k, v in conversion.plain.state_dict().items()}
    assert plain_ptrs == {k: ptr for k, (ptr, _) in state_before.items()}  # shares, never copies
    assert not any(getattr(m, "uses_feedback_weights", False) for m in conversion.plain.modules())
    assert all(type(m).uses_feedback_weights for m in conversion.layers.values())
    assert conversion.undo() is model
    assert [id(m) for m in model.modules()] == modules_before
    assert {k: (v.data_ptr(), v) for k, v in model.state_dict().items()}.keys() == state_before.keys()
    for key, value in model.state_dict().items():
        assert value.data_ptr() == state_before[key][0] and torch.equal(value, state_before[key][1])
    assert model._forward_hooks == {}  # DFA's output hook is gone
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("name", ["mlp", "cnn", "lenet"])
def test_pseudo_gradient_differs_for_fa_and_agrees_when_b_equals_w(name: str) -> None:
    model, (x, y) = build(name), batch()
    conversion = convert(model, FeedbackAlignmentRule(), generator())
    pseudo, true = gradients(model, x, y)["input"], gradients(conversion.plain, x, y)["input"]
    assert angle(pseudo, true) > 30  # random B: the input gradient is another direction
    set_feedback_to_weights(conversion)
    torch.testing.assert_close(gradients(model, x, y)["input"], true, rtol=1e-5, atol=1e-7)


def test_converter_refuses_layers_it_cannot_redirect() -> None:
    for model in (nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.LazyLinear(3)),
                  nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 1)), nn.Linear(3, 2)):
        with pytest.raises(ValueError):
            convert(model, FeedbackAlignmentRule(), generator())
    model = build("mlp")
    convert(model, FeedbackAlignmentRule(), generator())
    with pytest.raises(ValueError, match="already"):
        convert(model, FeedbackAlignmentRule(), generator())
    with pytest.raises(ValueError, match="rule"):
        convert(build("mlp"), "bp", generator())


def test_feedback_weights_come_from_the_generator_with_each_init() -> None:
    a = convert(build("mlp"), FeedbackAlignmentRule(), generator(5)).layers["blocks.0.0"].weight_feedback
    b = convert(build("mlp"), FeedbackAlignmentRule(), generator(5)).layers["blocks.0.0"].weight_feedback
    c = convert(build("mlp"), FeedbackAlignmentRule(), generator(6)).layers["blocks.0.0"].weight_feedback
    assert torch.equal(a, b) and not torch.equal(a, c)
    big = torch.Generator().manual_seed(0)
    fan_in, fan_out = 300, 200
    layer = convert(nn.Sequential(nn.Linear(fan_in, fan_out)), FeedbackAlignmentRule(), big).layers["0"]
    assert torch.var(layer.weight_feedback).item() == pytest.approx(1 / (fan_in + fan_out), rel=0.05)
    xavier = convert(nn.Sequential(nn.Linear(fan_in, fan_out)), FeedbackAlignmentRule("xavier"), big).layers["0"]
    assert xavier.weight_feedback.abs().max() <= math.sqrt(6 / (fan_in + fan_out))


# --- trainers on digits --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16, torch.tensor(data.target)


def train(trainer, digits, steps: int, hidden=(32,), seed: int = 0) -> list[float]:
    x, y = digits
    torch.manual_seed(seed)
    model = models.build({"kind": "mlp", "hidden": list(hidden)}, (1, 8, 8), 10)
    trainer.setup(model, TaskInfo((1, 8, 8), 10, len(x), torch.device("cpu")), generator(seed))
    g, losses = generator(seed + 1), []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (trainer.batch_size,), generator=g)
        losses.append(float(trainer.step(Batch(x[idx], y[idx])).loss))
    return losses


@pytest.mark.parametrize("cls", TRAINERS, ids=lambda c: c.name)
def test_each_trainer_learns_digits(cls, digits) -> None:
    trainer = cls(batch_size=32, lr=3e-3)
    losses = train(trainer, digits, 200)
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:10]) / 10
    plain = trainer.eval_model().eval()
    with torch.no_grad():
        accuracy = (plain(digits[0]).argmax(1) == digits[1]).float().mean().item()
    assert accuracy > 0.8
    assert not any(getattr(m, "uses_feedback_weights", False) for m in plain.modules())


def test_kolen_pollack_b_aligns_with_w_within_a_short_run(digits) -> None:
    """Akrout et al.'s setting: SGD with momentum and weight decay on B and W."""
    trainer = KolenPollack(batch_size=64, optimizer="momentum", lr=0.05, decay=0.1)
    train(trainer, digits, 800, hidden=(64, 64))
    angles = [angle(layer.feedback_matrix(), layer.weight) for layer in trainer.conversion.layers.values()]
    assert max(angles) < 10, angles


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_kolen_pollack_equals_storing_b_and_applying_w_updates_to_it(digits, optimizer: str) -> None:
    """Reference: Akrout et al.'s eqs. 16-17 with B stored and given W's update step by step, then both decayed."""
    trainer = KolenPollack(batch_size=16, optimizer=optimizer, lr=1e-2, decay=2.0, schedule="cosine",
                           horizon_steps=40)
    train(trainer, digits, 1, hidden=(16, 16))
    layers = list(trainer.conversion.layers.values())
    stored = [layer.feedback_matrix().clone() for layer in layers]
    x, y = digits
    for step in range(30):
        before = [layer.weight.detach().clone() for layer in layers]
        lr = trainer._optimizer.param_groups[0]["lr"]
        trainer.step(Batch(x[16 * step:16 * step + 16], y[16 * step:16 * step + 16]))
        keep = 1 - lr * 2.0
        for i, (layer, w) in enumerate(zip(layers, before)):
            moved = layer.weight.detach() / keep - w  # the optimizer's update of W, before the decay
            stored[i] = keep * (stored[i] + moved)
    for layer, b in zip(layers, stored):
        torch.testing.assert_close(layer.feedback_matrix(), b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", TRAINERS, ids=lambda c: c.name)
def test_bad_hyper_parameters_are_value_errors(cls) -> None:
    task = TaskInfo((1, 8, 8), 10, 100, torch.device("cpu"))
    bad = {"feedback_init": "zeros"} if cls is not SignSymmetry else {"optimizer": "nope"}
    with pytest.raises(ValueError):
        cls(**bad).setup(build("mlp"), task, generator())


def test_trainers_are_registered_as_entry_points() -> None:
    registered = {ep.name: ep for ep in entry_points(group="learnbench.algorithms")}
    for cls in TRAINERS:
        assert registered[cls.name].load() is cls
