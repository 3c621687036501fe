"""A user model factory, as a researcher would write one (used by test_models and test_runner)."""

from torch import nn


def tiny_net(input_shape, n_classes, width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(__import__("math").prod(input_shape)), width), nn.ReLU(),
                         nn.Linear(width, n_classes))
