"""Adversarial training: PGD (Madry, Makelov, Schmidt, Tsipras & Vladu 2018, "Towards Deep Learning Models
Resistant to Adversarial Attacks", ICLR; reference code MadryLab/mnist_challenge) and, with `method = "trades"`,
TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan 2019, "Theoretically Principled Trade-off between Robustness and
Accuracy", ICML; reference code yaodongyu/TRADES, `trades.py`).

Each step first crafts an adversarial batch through the model's true input gradient, in eval mode with the weights
frozen (`learnbench.attacks.attack_mode`, which restores train mode and `requires_grad` afterwards), then takes one
optimizer step in train mode. All randomness (the attacks' random starts) comes from the generator `setup` is given.

* `pgd`: the min-max of Madry et al. The attack is `learnbench.attacks.pgd_linf` with `early_stop=False` (every
  step on every point, the last iterate: Madry's code): a uniform random start in the Linf ball, `attack_steps`
  steps of `step_size` along the sign of the cross-entropy's input gradient, each projected onto the ball and
  [0, 1]. The update is backprop's own `step` (optimizer, schedule, clipping, amp, checkpointing) on the
  adversarial batch alone, as in Madry's code.
* `trades`: the inner maximisation of KL(p(x) || p(x')) from x' = x + 0.001 N(0, 1), steps of `step_size` along
  the sign of its input gradient, each projected (`trades_perturb`, written here because the inner loss is not the
  cross-entropy `pgd_linf` climbs); the outer loss CE(f(x), y) + beta KL(p(x) || p(x')) (`trades_loss`), the
  gradient flowing through both p(x) and p(x'), as in the reference code. The paper writes the weight as 1/lambda;
  the code's `beta` is 1/lambda, and so is `trades_beta` here. p(x) for the inner loop is computed once, in eval
  mode (the reference recomputes it every step; the value is the same).

Defaults, Madry et al.'s MNIST setting (config.json of mnist_challenge): epsilon 0.3, 40 steps of 0.01, random
start. Their optimizer (Adam, lr 1e-4, batch 50, 100k steps ~ 83 epochs) is not copied: every algorithm of a problem
shares one budget, mostly of a few epochs, so the optimizer keeps backprop's defaults (Adam lr 1e-3, batch 128) and
its tuned range. A budget that cannot afford 40 steps may lower `attack_steps` (Madry's CIFAR-10 setting is 7): set
`step_size = None` then, so the step follows the scaled rule 2.5 * epsilon / attack_steps
(`learnbench.attacks.pgd.STEP_FACTOR`) instead of a fixed 0.01 that could no longer walk across the ball.
`epsilon_warmup` ramps epsilon linearly from 0 over a fraction of the horizon: Madry trains at full epsilon from the
start, and a short budget can stall near the constant prediction that way (the conformance kit's 40 steps on digits
at 0.3: full-data loss 2.33 -> 2.29); ramps are the usual cure (Gowal et al. 2018, "On the effectiveness of interval
bound propagation", ramp epsilon linearly from 0 over part of training; Wong, Schmidt, Metzen & Kolter 2018,
"Scaling provable adversarial defenses", over the first epochs). TRADES' weight 6 is the paper's 1/lambda for its
MNIST and CIFAR-10 results (Table 5) and the CIFAR script's default (its MNIST script defaults to 1).

Cost (`learnbench.cost`), in example-passes: each attack step is one forward and one backward pass per example,
charged, as the issue asks, at the model's nominal forward and backward FLOPs, although the attack's backward goes
to the input, not to the weights. FlopCounterMode counts that input backward at the forward's FLOPs, below the
parameter backward the runner charges (MFLOPs per MNIST example, input vs parameter backward: MLP 784-256-256-10
0.54 vs 0.67, cnn 1.58 vs 2.85, lenet 0.83 vs 1.43): the attack is over-charged by that ratio, a nominal convention
that keeps one unit, the example-pass, for every trainer. So a `pgd` step of B examples reports (attack_steps + 1) B
forward and (attack_steps + 1) B backward passes; a `trades` step (attack_steps + 3) B forward (the clean target,
the attack, then the clean and adversarial forwards of the update) and (attack_steps + 2) B backward. `extra_flops`
is backprop's (the optimizer's update, `grad_clip`'s norm) plus the attack's elementwise work per input element, by
`learnbench.cost`'s rule of 1 FLOP per elementwise operation: PGD 15 once (the uniform draw, its shift to [-1, 1),
times eps, plus x: 5; the start's projection 6; the [0, 1]-clipped box 4) and 5 per step (sign, multiply-add, clip
to the box 2); TRADES 3 once (normal draw, multiply-add) and 9 per step (sign, multiply-add, the ball's bounds 2,
clip to them 2, clip to [0, 1] 2). Losses are not counted (backprop's cross-entropy is not either).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnbench.algorithms.backprop import Backprop
from learnbench.attacks.common import attack_mode, normal, project_linf
from learnbench.attacks.pgd import STEP_FACTOR, pgd_linf
from learnbench.search_space import Dimension
from learnbench.spec import Batch, StepStats, TaskInfo

METHODS = ("pgd", "trades")
TRADES_START_STD = 0.001  # the reference code's start: x + 0.001 * N(0, 1)
# Elementwise FLOPs per input element (see the module docstring): (once per step, per attack step).
ATTACK_ELEMENT_FLOPS = {"pgd": (15, 5), "trades": (3, 9)}


def epsilon_at(step: int, epsilon: float, ramp_steps: int) -> float:
    """The radius of training step `step` (0-based): epsilon * (step + 1) / ramp_steps up to `ramp_steps`, then
    epsilon (ramp_steps 0: epsilon from the start). The ramp starts just above 0, so no step is wasted at radius 0."""
    if ramp_steps <= 0 or step + 1 >= ramp_steps:
        return epsilon
    return epsilon * (step + 1) / ramp_steps


def trades_perturb(model: nn.Module, x: Tensor, eps: float, *, steps: int, step_size: float,
                   generator: torch.Generator) -> Tensor:
    """TRADES' inner maximisation of KL(p(x) || p(x')) over the Linf ball around x [B, ...] and [0, 1] -> x' of
    x's shape. Call inside `attack_mode(model)`: p(x) is fixed for the attack, gradients go to x' only."""
    with torch.no_grad():
        target = F.softmax(model(x), dim=1)  # [B, C] p(x)
    x_adv = x + TRADES_START_STD * normal(x.shape, generator, x.device)  # unclipped, as the reference
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), target, reduction="sum")  # summed, as the reference
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = project_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv


def trades_loss(logits: Tensor, logits_adv: Tensor, y: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """CE(f(x), y) + beta * KL(p(x) || p(x')), the KL averaged over the batch; logits [B, C] at x and x'."""
    natural = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return natural + beta * robust


@dataclass(eq=False)
class AdversarialTraining(Backprop):
    """Backprop on adversarial examples crafted each step (PGD, or TRADES' KL attack and loss)."""

    name: ClassVar[str] = "adversarial"

    method: str = "pgd"
    """pgd (Madry et al. 2018: train on the PGD batch) or trades (Zhang et al. 2019: CE + beta * KL)."""
    epsilon: float = 0.3
    """Linf radius in [0, 1] pixel units (Madry's and TRADES' MNIST 0.3; CIFAR-10 uses 8/255)."""
    attack_steps: int = 40
    """Attack steps per training step (Madry's MNIST 40; budgets may scale it down, with step_size None)."""
    step_size: float | None = 0.01
    """Attack step (Madry's and TRADES' MNIST 0.01); None: 2.5 * epsilon / attack_steps, the scaled rule."""
    epsilon_warmup: float = 0.0
    """Fraction of horizon_steps over which epsilon ramps linearly from 0 (0: full epsilon at once, Madry)."""
    trades_beta: float = 6.0
    """trades: weight of the KL term, the paper's 1/lambda (6 in its MNIST and CIFAR-10 results)."""

    # backprop's optimizer ranges (AlgoPerf's Adam learning rates, see Backprop.search_space); epsilon is part of the
    # problem (the threat model), not a knob to tune, and the attack's settings trade cost for strength.
    search_space: ClassVar[dict[str, Dimension]] = {**Backprop.search_space}

    def validate(self, task: TaskInfo) -> None:
        super().validate(task)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {self.method!r}")
        if not 0 < self.epsilon <= 1:
            raise ValueError(f"epsilon must be in (0, 1] (pixels are in [0, 1]); got {self.epsilon}")
        if self.attack_steps < 1:
            raise ValueError(f"attack_steps must be >= 1; got {self.attack_steps}")
        if self.step_size is not None and self.step_size <= 0:
            raise ValueError(f"step_size must be positive or None; got {self.step_size}")
        if not 0 <= self.epsilon_warmup <= 1:
            raise ValueError(f"epsilon_warmup must be a fraction in [0, 1]; got {self.epsilon_warmup}")
        if self.epsilon_warmup > 0 and not self.horizon_steps:
            raise ValueError("epsilon_warmup needs horizon_steps (or a step/epoch budget, from which the runner "
                             "fills it); a time or FLOP budget alone gives no horizon to ramp over")
        if self.trades_beta < 0:
            raise ValueError(f"trades_beta must be >= 0; got {self.trades_beta}")
        if self.optimizer in ("lbfgs", "kfac"):
            raise ValueError(f"optimizer {self.optimizer!r} is backprop's alone here: adversarial training's step "
                             "takes a first-order optimizer")

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self.validate(task)
        self.build_state(model, task)
        self._generator = generator  # the attacks' random starts
        self._ramp_steps = math.ceil(self.epsilon_warmup * self.horizon_steps) if self.epsilon_warmup else 0
        self._steps_done = 0
        self._input_size = math.prod(task.input_shape)

    def step(self, batch: Batch) -> StepStats:
        self._model.train()  # the runner may have left eval mode; attack_mode restores train mode for the update
        eps = epsilon_at(self._steps_done, self.epsilon, self._ramp_steps)
        self._steps_done += 1
        metrics = {"lr": self.current_lr(), "epsilon": eps}  # this step's learning rate and (ramped) attack radius
        if self.method == "pgd":
            loss, forward, backward = self._pgd_step(batch, eps)
        else:
            loss, forward, backward = self._trades_step(batch, eps)
        n = batch.y.shape[0]
        once, per_step = ATTACK_ELEMENT_FLOPS[self.method]
        attack_flops = (once + per_step * self.attack_steps) * n * self._input_size
        return StepStats(loss=loss, forward_passes=forward * n, backward_passes=backward * n,
                         extra_flops=self._extra_flops + attack_flops, metrics=metrics)

    def _step_size(self, eps: float) -> float:
        return STEP_FACTOR * eps / self.attack_steps if self.step_size is None else self.step_size

    def _pgd_step(self, batch: Batch, eps: float) -> tuple[Tensor, int, int]:
        """Madry: PGD on the batch, then backprop's step on the adversarial batch. Passes per example: the attack's
        steps, one forward and one backward each, plus the update's."""
        factor = self._step_size(eps) * self.attack_steps / eps  # pgd_linf steps by factor * eps / steps
        with attack_mode(self._model):
            x_adv = pgd_linf(self._model, batch.x, batch.y, eps, generator=self._generator,
                             steps=self.attack_steps, step_factor=factor, early_stop=False)  # [B, ...]
        stats = super().step(Batch(x_adv, batch.y))
        return stats.loss, self.attack_steps + 1, self.attack_steps + 1

    def _trades_step(self, batch: Batch, eps: float) -> tuple[Tensor, int, int]:
        """TRADES: the KL attack, then one optimizer step on CE + beta * KL. Passes per example: p(x) for the
        attack, its steps (forward and backward each), the update's two forwards and their backward."""
        with attack_mode(self._model):
            x_adv = trades_perturb(self._model, batch.x, eps, steps=self.attack_steps,
                                   step_size=self._step_size(eps), generator=self._generator)  # [B, ...]
        # two forwards, not one on the concatenation: BatchNorm statistics stay per batch, as in the reference
        loss = trades_loss(self._logits(batch.x), self._logits(x_adv), batch.y, self.trades_beta,
                           self.label_smoothing)
        self.descend(loss)
        return loss.detach(), self.attack_steps + 3, self.attack_steps + 2

    def _logits(self, x: Tensor) -> Tensor:
        """[B, C] float logits in train mode, through backprop's forward (checkpointing) and its amp setting."""
        if not self.amp:
            return self._forward(x)
        with torch.autocast(self._device_type, dtype=torch.bfloat16):
            return self._forward(x).float()
