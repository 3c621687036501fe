"""Memetic (Lamarckian) neuroevolution: the `ga` trainer whose offspring each take `local_steps` gradient steps on
the step's minibatch before they are scored, and keep the improved weights.

Moscato 1989, "On evolution, search, optimization, genetic algorithms and martial arts: towards memetic
algorithms" (Caltech C3P Report 826): a population search whose individuals also improve themselves by local
search. In neuroevolution, the ERL line: Khadka & Tumer 2018, "Evolution-guided policy gradient in reinforcement
learning" (NeurIPS), and Pourchot & Sigaud 2019, "CEM-RL: Combining evolutionary and gradient-based methods for
policy search" (ICLR), where part of the population takes gradient steps and goes back into the population.
`inheritance = "baldwinian"` keeps the fitness after learning but not the learned weights (Hinton & Nowlan 1987,
"How learning can guide evolution"; Whitley, Gordon & Mathias 1994, "Lamarckian evolution, the Baldwin effect and
function optimization", PPSN III).

Everything evolutionary is the `ga` trainer's (`genetic.GeneticAlgorithm`: DEAP selection, vectorised variation,
elites picked on the held-back pool, hall of fame, logbook) with its defaults. One generation, `step(batch)`:

1. learning: rows of the population `[P, n_params]` take `local_steps` plain SGD steps (`local_lr`) on the
   cross-entropy of windows of `local_batch` examples of this step's batch (step k: examples k*lb, ..., mod B;
   the batch is already a random sample, so no draw is needed), all rows at once: `torch.func.vmap` of
   `torch.func.grad` of `functional_call` on the flat genomes, in chunks. The model runs in eval mode (dropout
   off, norm layers on stored statistics), as `population.evaluate` scores it. `local_rule = "fa"` takes feedback
   alignment's gradient instead: each Linear/Conv2d sends the error to its input through a fixed random B (drawn
   once in `setup`, shared by every member), its weights get the usual local `g^T x`;
2. scoring: `population.evaluate` of the learned rows on the same batch, then ga's selection, pool and variation.
   The new offspring are learned at the start of the next step, on that step's batch, right before they are
   scored; so the local steps always use the batch of the step that spends them, and `local_steps = 0` is `ga`.

Which rows learn. Lamarckian: the new offspring (every row in generation 0); the elites carried over unmutated
already hold their learned weights and take no further steps. Baldwinian: every row, elites included, into a copy
that is scored (on the batch and, for the candidates, on the pool) and then dropped: a Baldwinian fitness is by
definition the loss after learning, and nothing is learned twice since nothing learned is kept. The genome array,
the parents bred and the hall of fame hold the unlearned weights, so `eval_model()` is the best genome as inherited,
without the learning step that earned its fitness. The reported loss is row 0's on this batch: the elite as
`eval_model()` gave it (Lamarckian, generation >= 1) or after its local steps (Baldwinian, and generation 0).

Declared cost, per generation, R rows learning, lb = min(local_batch, B), n parameters: ga's passes and FLOPs
(genetic.py) plus R * local_steps * lb example-forward and as many example-backward passes (nominal: fa's
extra feedback product is not charged, as for the fa trainer), and 2 n R local_steps FLOPs of SGD updates
(p - lr * g: a multiply and an add per parameter).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from learnbench import population
from learnbench.algorithms.feedback_layers import UNSUPPORTED, feedback_weights
from learnbench.algorithms.genetic import GeneticAlgorithm
from learnbench.search_space import Dimension, IntRange, LogUniform
from learnbench.spec import Batch, TaskInfo

LOCAL_RULES = ("backprop", "fa")
INHERITANCES = ("lamarckian", "baldwinian")


@dataclass(eq=False)
class Memetic(GeneticAlgorithm):
    """The ga trainer with a few batched SGD steps per offspring before it is scored (Lamarckian or Baldwinian)."""

    name: ClassVar[str] = "memetic"

    local_steps: int = 1
    """SGD steps each offspring takes on the step's batch before it is scored; 0 is exactly the ga trainer."""
    local_rule: Literal["backprop", "fa"] = "backprop"
    """Gradient of the local steps: backprop (the true gradient) or fa (feedback alignment, fixed random B)."""
    local_lr: float = 0.1
    """Plain SGD step size: 0.1, the usual constant rate of plain SGD on small MNIST MLPs with mean cross-entropy."""
    inheritance: Literal["lamarckian", "baldwinian"] = "lamarckian"
    """lamarckian: the learned weights replace the genome; baldwinian: only the fitness is measured after learning."""
    local_batch: int | None = None
    """Examples of the step's batch each local step uses (consecutive windows); None: the whole batch."""

    search_space: ClassVar[dict[str, Dimension]] = {
        **GeneticAlgorithm.search_space,
        # One step (Khadka & Tumer's one learner per generation in spirit) up to a few; 0 would be the ga itself.
        "local_steps": IntRange(1, 4),
        # A decade either side of the default 0.1.
        "local_lr": LogUniform(0.01, 1.0),
    }

    def validate(self) -> None:
        """Check hyper-parameter values; raises ValueError naming the bad one."""
        super().validate()
        if not isinstance(self.local_steps, int) or self.local_steps < 0:
            raise ValueError(f"local_steps must be an integer >= 0; got {self.local_steps!r}")
        if self.local_rule not in LOCAL_RULES:
            raise ValueError(f"local_rule must be one of {LOCAL_RULES}; got {self.local_rule!r}")
        if self.inheritance not in INHERITANCES:
            raise ValueError(f"inheritance must be one of {INHERITANCES}; got {self.inheritance!r}")
        if not (math.isfinite(self.local_lr) and self.local_lr > 0):
            raise ValueError(f"local_lr must be positive and finite; got {self.local_lr!r}")
        if self.local_batch is not None and not 1 <= self.local_batch <= self.batch_size:
            raise ValueError(f"local_batch must be None or in [1, batch_size]; got {self.local_batch!r}")

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        super().setup(model, task, generator)  # validates; ga's state
        self._layout = population.Layout.of(model)
        if self.local_steps:  # nothing drawn for 0 steps, so the generator stays ga's
            self._net = local_network(model, self.local_rule, generator, task.input_shape)
            example = torch.zeros(2, *task.input_shape, device=task.device)
            self._chunk = self.chunk_size or max(1, population.DEFAULT_MEMORY_BYTES // (
                (self.local_batch or self.batch_size) * example_bytes(self._net, example)))
            try:  # a model vmap cannot take fails here, not in the first timed step
                local_sgd(self._net, self._layout, population.flatten(model)[None], example,
                          torch.zeros(2, dtype=torch.long, device=task.device), 1, self.local_lr, 2, 1)
            except Exception as exc:
                raise ValueError(f"memetic's local steps run the model under torch.func.vmap/grad (eval mode), "
                                 f"which failed: {type(exc).__name__}: {exc}") from exc

    def _scored(self, batch: Batch) -> tuple[Tensor, int, float]:
        """ga's hook (genetic.py `step`): the rows scored this generation are the learned ones; Lamarckian, they
        also become the genomes (what is bred and kept). Returns them with the local steps' example-passes (each
        way) and their SGD FLOPs."""
        b = batch.y.shape[0]
        learned, learners = self._learn(batch)  # [P, n]; rows that took local steps
        if self.inheritance == "lamarckian":
            self._genomes = learned
        passes = learners * self.local_steps * min(self.local_batch or b, b)
        return learned, passes, float(2 * self._layout.n_params * learners * self.local_steps)

    def _learn(self, batch: Batch) -> tuple[Tensor, int]:
        """The population as it is scored this generation `[P, n]`, and how many rows (the last ones) took the
        local steps: Lamarckian, the new offspring (every row in generation 0); Baldwinian, every row."""
        p, b = self._popsize, batch.y.shape[0]
        first = 0 if self._generation == 0 or self.inheritance == "baldwinian" else self.elites
        if not self.local_steps:
            return self._genomes, 0  # exactly ga
        rows = local_sgd(self._net, self._layout, self._genomes[first:], batch.x, batch.y, self.local_steps,
                         self.local_lr, min(self.local_batch or b, b), self._chunk)  # [P - first, n]
        return torch.cat([self._genomes[:first], rows]), p - first


# ------------------------------------------------------------------------------------------------ pure helpers

def local_sgd(net: nn.Module, layout: population.Layout, rows: Tensor, x: Tensor, y: Tensor, steps: int,
              lr: float, local_batch: int, chunk: int) -> Tensor:
    """`steps` plain SGD steps of every row of `rows [N, n]` (flat parameters, `layout` order) on the mean
    cross-entropy of `net` (its buffers shared, as it is: eval mode for the trainer's) on windows of `local_batch`
    examples of `x [B, ...]`, `y [B]` (step k: examples k*local_batch, ... mod B); returns the new rows `[N, n]`.
    `chunk` rows go through vmap at once."""
    def loss(flat: Tensor, xs: Tensor, ys: Tensor) -> Tensor:  # one member: flat [n]
        return F.cross_entropy(functional_call(net, layout.unflatten(flat), (xs,)), ys)

    per_member = vmap(grad(loss), in_dims=(0, None, None))  # [C, n] gradients, the batch shared
    b, windows = y.shape[0], []
    for k in range(steps):
        index = (torch.arange(local_batch, device=y.device) + k * local_batch) % b
        windows.append((x, y) if local_batch == b else (x.index_select(0, index), y.index_select(0, index)))
    out = []
    for start in range(0, rows.shape[0], chunk):
        w = rows[start:start + chunk]  # [C, n]
        for xs, ys in windows:
            w = w - lr * per_member(w, xs, ys)
        out.append(w)
    return torch.cat(out)


def local_network(model: nn.Module, rule: str, generator: torch.Generator, input_shape: tuple[int, ...]) -> nn.Module:
    """A structural copy of `model` in eval mode for the local steps (`functional_call` replaces its parameters).
    rule "fa": its Linear/Conv2d layers become `_AlignedLinear`/`_AlignedConv2d` holding B (`weight_feedback`,
    `feedback_weights(shape, "normal", generator)`, drawn in module order as `feedback_layers.convert` draws); a
    layer whose input needs no gradient (the first) sends no error, as feedback_layers' layers do."""
    net = copy.deepcopy(model).eval()
    if rule == "backprop":
        return net
    layers = {}
    for name, module in net.named_modules():
        if isinstance(module, UNSUPPORTED) or (isinstance(module, (nn.Linear, nn.Conv2d))
                                               and type(module).forward not in (nn.Linear.forward,
                                                                                nn.Conv2d.forward)):
            raise ValueError(f"local_rule 'fa': layer {name!r} ({type(module).__name__}) cannot send its error "
                             "through feedback weights (only nn.Linear and nn.Conv2d can)")
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            layers[name] = module
    fed: dict[str, bool] = {}  # layer name -> whether its input depends on parameters (needs an error)

    def record(module: nn.Module, args: tuple) -> None:
        fed.setdefault(names[module], args[0].requires_grad)

    names = {module: name for name, module in layers.items()}
    hooks = [m.register_forward_pre_hook(record) for m in layers.values()]
    with torch.enable_grad():
        net(torch.zeros(1, *input_shape, device=next(net.parameters()).device))
    for hook in hooks:
        hook.remove()
    for name, module in layers.items():
        module.__class__ = _AlignedLinear if isinstance(module, nn.Linear) else _AlignedConv2d
        module.register_buffer("weight_feedback", feedback_weights(tuple(module.weight.shape), "normal",
                                                                   generator).to(module.weight))
        module.sends_error = fed.get(name, True)
    return net


def example_bytes(net: nn.Module, x: Tensor) -> int:
    """Bytes of activations one member needs per example for a forward and backward: three times every leaf
    module's output (kept for the backward, and its gradient; a margin for temporaries), from a probe on `x`."""
    sizes = []
    hooks = [m.register_forward_hook(lambda m, args, out: sizes.append(out.numel() * out.element_size()))
             for m in net.modules() if not list(m.children())]
    with torch.no_grad():
        net(x)
    for hook in hooks:
        hook.remove()
    return max(1, 3 * sum(sizes) // x.shape[0])


class _AlignedLinear(nn.Linear):
    """Value x W^T + b; d/dW = g^T x (the local update); d/dx = g B (feedback alignment), vmap-friendly."""

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x.detach(), self.weight, self.bias)
        if not self.sends_error:
            return out
        error = F.linear(x, self.weight_feedback)  # value thrown away below; its gradient to x is g B
        return out + (error - error.detach())


class _AlignedConv2d(nn.Conv2d):
    """The Conv2d counterpart of `_AlignedLinear`: the error reaches the input through conv with B."""

    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_forward(x.detach(), self.weight, self.bias)
        if not self.sends_error:
            return out
        error = self._conv_forward(x, self.weight_feedback, None)
        return out + (error - error.detach())
