"""Small trained models and data shared by the attack tests (sklearn digits, 8x8 images in [0, 1])."""

from __future__ import annotations

import functools

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from learnbench.algorithms.backprop import Backprop
from learnbench.models import build
from learnbench.spec import Batch, TaskInfo

N_TRAIN = 1297  # the last 500 digits are the test points


@functools.lru_cache(maxsize=1)
def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train_x [1297, 1, 8, 8], train_y, test_x [500, 1, 8, 8], test_y); pixels 0..16 scaled to [0, 1]."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).div(16.0).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def train(model: nn.Module, steps: int = 600, seed: int = 0) -> nn.Module:
    """Backprop (Adam, batch 64) on the digits training split; returns the model in eval mode."""
    x, y, _, _ = digits()
    gen = torch.Generator().manual_seed(seed)
    trainer = Backprop(batch_size=64)
    trainer.setup(model, TaskInfo((1, 8, 8), 10, N_TRAIN, torch.device("cpu")), gen)
    for _ in range(steps):
        idx = torch.randint(0, N_TRAIN, (64,), generator=gen)
        trainer.step(Batch(x[idx], y[idx]))
    return model.eval()


@functools.lru_cache(maxsize=None)
def trained_mlp(seed: int = 0, hidden: tuple[int, ...] = (64,)) -> nn.Module:
    """An MLP 64-64-10 trained to about 95% test accuracy on digits (cached: treat as read-only)."""
    torch.manual_seed(seed)
    return train(build({"kind": "mlp", "hidden": list(hidden)}, (1, 8, 8), 10), seed=seed)


class Quantize(nn.Module):
    """Rounds inputs to `levels` grey levels: a non-differentiable layer whose gradient is zero everywhere
    (torch.round's backward), the textbook case of gradient masking (Athalye et al. 2018)."""

    def __init__(self, levels: int = 4):
        super().__init__()
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)


@functools.lru_cache(maxsize=1)
def masked_mlp() -> nn.Module:
    """Quantize(4) in front of an MLP, trained through the quantiser (its weights still learn: the first layer
    gets gradients, only the input gradient is zero)."""
    torch.manual_seed(1)
    model = nn.Sequential(Quantize(4), build({"kind": "mlp", "hidden": [64]}, (1, 8, 8), 10))
    return train(model, seed=1)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def robust_accuracy(model: nn.Module, adv: Tensor, x: Tensor, y: Tensor) -> float:
    """Correct on clean and adversarial input (how learnbench scores)."""
    with torch.no_grad():
        return ((model(x).argmax(1) == y) & (model(adv).argmax(1) == y)).float().mean().item()
