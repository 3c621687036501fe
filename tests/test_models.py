"""Models: parameter counts against the published architectures, shapes, spec validation."""

from pathlib import Path

import pytest
import torch

from learnbench import models
from learnbench.errors import UsageError


def test_cnn_is_evojax_convnet_with_11274_parameters():
    # EvoJAX/evosax MNIST ConvNet: conv 1->8 5x5 (208), conv 8->16 5x5 (3,216), dense 784->10 (7,850)
    model = models.build({"kind": "cnn"}, (1, 28, 28), 10)
    assert models.n_params(model) == 208 + 3216 + 7850 == 11274
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_lenet5_parameter_count():
    # LeNet-5 on 28x28 (first conv padded): 156 + 2,416 + 48,120 + 10,164 + 850 = 61,706
    model = models.build({"kind": "lenet"}, (1, 28, 28), 10)
    assert models.n_params(model) == 61706


@pytest.mark.parametrize("spec", [
    {"kind": "mlp"}, {"kind": "mlp", "norm": "batch"}, {"kind": "mlp", "norm": "layer", "activation": "tanh"},
    {"kind": "resmlp", "width": 32, "depth": 4}, {"kind": "resmlp", "width": 32, "depth": 3, "norm": "layer"},
    {"kind": "cnn", "norm": "batch"}, {"kind": "cnn", "depth": 3, "norm": "layer"}, {"kind": "lenet"},
])
def test_every_kind_builds_and_runs_on_mnist_shapes(spec):
    model = models.build(spec, (1, 28, 28), 10)
    assert model(torch.rand(4, 1, 28, 28)).shape == (4, 10)


def test_mlp_sizes_and_labels():
    spec = models.normalize_spec({"kind": "mlp", "hidden": [256, 256]})
    model = models.build(spec, (1, 28, 28), 10)
    assert models.n_params(model) == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert models.label(spec) == "mlp-256x2"
    assert models.label(models.normalize_spec({"kind": "resmlp", "width": 256, "depth": 12})) == "resmlp-256x12"
    assert models.label(models.normalize_spec({"kind": "mlp", "hidden": [64, 32]})) == "mlp-64-32"


def test_resmlp_adds_identity_skips():
    torch.manual_seed(0)
    res = models.build({"kind": "resmlp", "width": 8, "depth": 3}, (5,), 2)
    for block in res.blocks[1:]:  # zero hidden-to-hidden blocks: a residual net passes h through unchanged
        torch.nn.init.zeros_(block[0].weight), torch.nn.init.zeros_(block[0].bias)
    x = torch.randn(4, 5)
    h = res.blocks[0](x)
    assert torch.allclose(res(x), res.head(h))


@pytest.mark.parametrize("spec,match", [
    ({"kind": "transformer"}, "unknown model kind"), ({"kind": "mlp", "widht": 3}, "unknown key"),
    ({"kind": "mlp", "hidden": [0]}, "positive integer"), ({"kind": "mlp", "norm": "group"}, "unknown norm"),
    ({"kind": "resmlp", "hidden": [8, 16]}, "equal hidden sizes"), ({"hidden": [3]}, "needs a 'kind'"),
])
def test_bad_specs_are_usage_errors(spec, match):
    with pytest.raises(UsageError, match=match):
        models.normalize_spec(spec)


def test_image_models_refuse_vectors():
    with pytest.raises(UsageError, match="image inputs"):
        models.build({"kind": "cnn"}, (40,), 10)


def test_factory_spec_builds_a_user_module(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    model = models.build({"kind": "factory", "factory": "user_models:tiny_net", "width": 7}, (1, 8, 8), 10)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert model[1].out_features == 7
