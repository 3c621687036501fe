"""Forward-Forward (Hinton 2022, "The Forward-Forward Algorithm: Some Preliminary Investigations", arXiv:2212.13345,
section 3.3, "A simple supervised example of FF"; code read: github.com/mohammadpz/pytorch_forward_forward,
github.com/loeweX/Forward-Forward, the latter a reproduction of Hinton's Matlab code).

The rule as implemented, on the hidden blocks (Linear -> activation) of the `mlp` model; B examples, C classes:

* Label in the input: the first C values of the flattened input are replaced by the one-hot label (the paper's
  MNIST recipe: the first 10 pixels, which lie in the black border). Positive data: the image with its true label.
  Negative data: the image with one wrong label per example, drawn (`negatives`)
    random      uniformly from the C - 1 wrong labels (mohammadpz, loeweX);
    hard        from the wrong labels in proportion to the network's own softmax over them (the paper's hard
                negatives): the summed log-odds of the classifier's layers for every label, C B more passes;
    hard-first  the same from the first layer's log-odds alone: the label enters that layer through one column of
                W, so every label's first-layer activity is the image part, already computed for the positive
                pass, plus a column; ~15% more CPU time than `random` at 784-1024-1024, and on MNIST the most
                accurate per CPU second of the three (measured: docstring of `ForwardForward`).
* Layer l (width H): h = act(W u + b); goodness G = sum_j h_j^2, the paper's sum of squared activities; the next
  layer's input is h divided by its root mean square, sqrt(G / H), and detached: the paper's length normalisation
  (which hides the goodness from the next layer) at the per-unit scale that PyTorch's default initialisation
  assumes (loeweX's choice; dividing by the length alone made the second layer learn several times slower here).
  No gradient crosses a layer.
* Local loss, the paper's logistic p(positive) = sigmoid(G - theta) with theta = `threshold` H, read per unit and
  sharpened: z = (G / H - threshold) / temperature, loss = softplus(-z_pos) + softplus(z_neg), the negative log
  likelihood (mohammadpz's loss is this with temperature 1; loeweX's is threshold 1, temperature 1 / H), averaged
  over the 2B passes. `loss = "symba"` is SymBa's pairwise softplus(-alpha (G_pos - G_neg) / H) (Lee & Song 2023,
  arXiv:2303.08418), which needs no threshold. Every layer has its own `torch.optim.Adam` and all layers learn from
  every minibatch (loeweX's simultaneous training), optionally with loeweX's linear cooldown of the learning rate.
* Classification (`eval_model()`): logit c = the goodness per unit, G / H, of the input with label c embedded,
  accumulated over the layers: all of them (`eval_layers = "all"`, the default: better than the paper's choice on a
  two-layer net, where it leaves a single layer) or all but the first (the paper's). The C candidates go through as
  one batch; the module is an ordinary differentiable function of its input, so attacks take autograd's input
  gradient (the overwritten label values get gradient 0: they do not influence the output).
* The output Linear (`head`) is neither trained nor used: FF classifies by goodness. It stays in the evaluated
  module, whose state dict is therefore the model's.

Cost per step (StepStats): forward_passes = 2B (the positive and the negative pass through the model;
`negatives = "hard"` adds C B candidate passes). backward_passes = 2B: each layer's backward reaches its own weights
only, which is no more than a full backward (that one also carries the error from layer to layer). extra_flops, by
`learnbench.cost`'s rule (1 FLOP per elementwise operation, 2 per multiply-add): every layer's Adam update
(`learnbench.cost.optimizer_flops`) plus, per example-pass and layer of width H, goodness 2H (square, add),
normalisation H + 2 (G / H, a square root, H divisions), the loss 6 (z as 3 operations, softplus as 3) and the
goodness' backward 2H (dG/dh = 2h times the loss' derivative): 5H + 8. `hard` adds per candidate pass and layer
2H + 3 (goodness, log-odds) and per example 4C (softmax and draw); `hard-first` adds per example the C candidates'
first layer charged as dense products, C (2 D H) for D inputs (the code adds a column instead: charged the same
whatever the shortcut, as `learnbench.cost` requires), their goodness and log-odds C (2H + 3), and 4C.
Evaluating the C candidates at test time is the runner's evaluation, off the trainer's cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnbench.cost import optimizer_flops
from learnbench.models import ACTIVATIONS, MLP
from learnbench.search_space import Dimension, LogUniform, Uniform
from learnbench.spec import Batch, StepStats, TaskInfo

LOSSES = ("logistic", "symba")
NEGATIVES = ("random", "hard", "hard-first")
EVAL_LAYERS = ("all", "all-but-first")
SCHEDULES = ("constant", "cooldown")
EPS = 1e-8  # in the normalisation's denominator: a layer whose units are all off passes on zeros


# --- pure helpers: one layer, the label candidates, the goodness classifier ------------------------------------------

def normalise(h: Tensor, goodness: Tensor) -> Tensor:
    """h [N, H] divided by its root mean square sqrt(goodness / H): the next layer's input."""
    return h / ((goodness / h.shape[1]).sqrt().unsqueeze(1) + EPS)


def layer_forward(linear: nn.Linear, act: nn.Module, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One FF layer on inputs u [N, D]: activities h [N, H], goodness [N] (sum of squares), next input [N, H]."""
    h = act(linear(u))
    goodness = h.square().sum(1)
    return h, goodness, normalise(h, goodness)


def image_part(linear: nn.Linear, x: Tensor, n_classes: int) -> Tensor:
    """W x + b for x [B, D] without its first `n_classes` values, where the label goes: [B, H]. With label c
    embedded, the first layer's pre-activation is this plus W[:, c]."""
    return F.linear(x[:, n_classes:], linear.weight[:, n_classes:], linear.bias)


def label_columns(linear: nn.Linear, n_classes: int) -> Tensor:
    """The first layer's weights on the label values, one row per label: [C, H]."""
    return linear.weight[:, :n_classes].T


def candidate_goodness(blocks: nn.ModuleList, x: Tensor, n_classes: int) -> list[Tensor]:
    """Goodness per unit (G / H) of every layer for every label embedded in x [B, D]: one [B, C] per layer."""
    batch, first = x.shape[0], blocks[0]
    pre = image_part(first[0], x, n_classes).unsqueeze(1) + label_columns(first[0], n_classes)  # [B, C, H]
    h = first[1](pre).reshape(batch * n_classes, -1)  # [B C, H]
    goodness = h.square().sum(1)
    per_layer, u = [goodness / h.shape[1]], normalise(h, goodness)
    for linear, act in list(blocks)[1:]:
        h, goodness, u = layer_forward(linear, act, u)
        per_layer.append(goodness / h.shape[1])
    return [g.reshape(batch, n_classes) for g in per_layer]


class GoodnessClassifier(nn.Module):
    """FF's classifier: image [B, *input_shape] -> [B, C] logits, logit c = the goodness per unit of the image with
    label c embedded, accumulated over the layers from `first` on. Holds the model's `blocks` and `head` (unused), so
    its state dict is the model's."""

    def __init__(self, model: MLP, n_classes: int, first: int):
        super().__init__()
        self.blocks, self.head = model.blocks, model.head
        self.n_classes, self.first = n_classes, first

    def wrapper_args(self) -> dict[str, int]:
        """What `ForwardForward.wrap_eval_model` needs to rebuild this module around a saved model."""
        return {"n_classes": self.n_classes, "first": self.first}

    def forward(self, x: Tensor) -> Tensor:
        per_layer = candidate_goodness(self.blocks, x.flatten(1), self.n_classes)[self.first:]
        return torch.stack(per_layer).sum(0)  # [B, C]


def check_model(model: nn.Module, task: TaskInfo) -> None:
    """ValueError unless `model` is a learnbench `mlp` whose hidden blocks are Linear -> elementwise activation."""
    if not isinstance(model, MLP) or model.residual:
        raise ValueError(f"forward-forward trains the `mlp` model kind (learnbench.models.MLP without skips); got "
                         f"{type(model).__name__}{' with residual skips' if getattr(model, 'residual', 0) else ''}")
    if not len(model.blocks):
        raise ValueError("forward-forward needs at least one hidden layer; the model has none")
    for index, block in enumerate(model.blocks):
        if len(block) != 2 or not isinstance(block[0], nn.Linear) or \
                not isinstance(block[1], tuple(ACTIVATIONS.values())):
            raise ValueError(f"forward-forward needs hidden blocks Linear -> activation (norm 'none', a non-identity "
                             f"activation); block {index} is {[type(m).__name__ for m in block]}")
    if model.blocks[0][0].in_features <= task.n_classes:
        raise ValueError(f"the input ({model.blocks[0][0].in_features} values) is too small to embed "
                         f"{task.n_classes} labels in its first values")


@dataclass(eq=False)
class ForwardForward:
    """Forward-Forward: the label in the input, a goodness loss per layer, the goodness of every label to classify.

    The defaults, as measured on MNIST with the MLP 784-1024-1024-10, batch 100, cooldown, seed 0 (test accuracy
    after 25 epochs, this code on a GPU): at temperature 1 and lr 3e-3, negatives random 96.2%, hard-first 97.1%,
    hard 96.3% (10 epochs, about the same CPU time); hard-first at temperature 0.1 / 0.2 / 0.3 / 0.5: 98.5 / 98.4 /
    98.4 / 98.1%; at temperature 0.3, lr 1e-3 / 3e-3 / 1e-2: 98.3 / 98.4 / 97.9%, threshold 1 / 2 / 4: 97.9 / 98.4 /
    98.4%. On one CPU core the defaults with cooldown over 30 epochs passed 97% after 6 epochs (104 CPU s of
    training) and ended at 98.35% (500 CPU s)."""

    name: ClassVar[str] = "forward-forward"
    supported_models: ClassVar[tuple[str, ...]] = ("mlp",)

    batch_size: int = 100
    """Positive examples per step, each with one negative (Hinton's Matlab code and loeweX: 100)."""
    lr: float = 3e-3
    """Adam learning rate of every layer (mohammadpz: 0.03 on full batches; measured best at batch 100: 1e-3-3e-3)."""
    threshold: float = 2.0
    """Goodness threshold per unit: theta = threshold * H for a layer of H units (mohammadpz: mean square 2)."""
    temperature: float = 0.2
    """The logistic loss reads (G / H - threshold) / temperature; hard negatives are drawn at the same scale."""
    loss: str = "logistic"
    """logistic (the paper's sigmoid(G - theta)) or symba (pairwise, Lee & Song 2023)."""
    symba_alpha: float = 4.0
    """SymBa's scale on the per-unit goodness gap G_pos / H - G_neg / H (Lee & Song 2023: 4)."""
    negatives: str = "hard-first"
    """How wrong labels are drawn: random, hard (the whole network's predictions), hard-first (the first layer's)."""
    eval_layers: str = "all"
    """Layers whose goodness the classifier accumulates: all, or all-but-first (the paper's)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam moment decay rates."""
    schedule: str = "constant"
    """constant, or cooldown: the learning rate constant for the first half of horizon_steps, then falling
    linearly to 0 at its end (loeweX's reproduction of the paper's Matlab code)."""
    horizon_steps: int | None = None
    """Steps the cooldown spans; None lets the runner fill it from a step or epoch budget."""

    search_space: ClassVar[dict[str, Dimension]] = {
        # a decade either side of the measured best 3e-3, up to mohammadpz's 0.03
        "lr": LogUniform(3e-4, 3e-2),
        # mohammadpz's 2 per unit (mean square); loeweX's threshold is 1 per unit; 4 measured as good as 2
        "threshold": Uniform(1.0, 4.0),
        # loeweX's sharp sigmoid to mohammadpz's temperature 1
        "temperature": LogUniform(0.05, 1.0),
    }

    def validate(self, task: TaskInfo | None = None) -> None:
        """Check hyper-parameter values; raises ValueError naming the bad one."""
        for field in ("batch_size", "lr", "threshold", "temperature", "symba_alpha"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field} must be positive; got {getattr(self, field)!r}")
        for field, allowed in (("loss", LOSSES), ("negatives", NEGATIVES), ("eval_layers", EVAL_LAYERS),
                               ("schedule", SCHEDULES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}; got {getattr(self, field)!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1); got {self.betas!r}")
        if self.schedule == "cooldown" and not self.horizon_steps:
            raise ValueError("schedule 'cooldown' needs horizon_steps (or a step/epoch budget)")
        if self.horizon_steps is not None and self.horizon_steps <= 0:
            raise ValueError(f"horizon_steps must be positive; got {self.horizon_steps}")
        if task is not None and task.n_classes < 2:
            raise ValueError(f"forward-forward needs at least 2 classes; got {task.n_classes}")

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self.validate(task)
        check_model(model, task)
        self._classes, self._generator = task.n_classes, generator
        self._layers = [(block[0], block[1]) for block in model.blocks]
        self._optimizers = [torch.optim.Adam(linear.parameters(), lr=self.lr, betas=tuple(self.betas))
                            for linear, _ in self._layers]
        self._schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, self._cooldown) for opt in self._optimizers] \
            if self.schedule == "cooldown" else []
        self._first_eval = 1 if self.eval_layers == "all-but-first" and len(self._layers) > 1 else 0
        self._classifier = GoodnessClassifier(model, task.n_classes, self._first_eval)
        self._extra_flops = self._declared_flops(model)

    def step(self, batch: Batch) -> StepStats:
        x, y = batch.x.flatten(1), batch.y  # [B, D], [B]
        n = y.shape[0]
        lr = self._optimizers[0].param_groups[0]["lr"]  # this step's rate, every layer's (cooldown schedule)
        first, act = self._layers[0]
        image = image_part(first, x, self._classes)  # [B, H], shared by the positive and negative passes
        columns = label_columns(first, self._classes)  # [C, H]
        wrong = self._wrong_labels(x, y, image, columns)
        h = act(torch.cat([image + columns[y], image + columns[wrong]]))  # [2B, H]: positives, then negatives
        losses = [self._learn(0, h)]
        for index in range(1, len(self._layers)):
            with torch.no_grad():
                u = normalise(h, h.square().sum(1))  # the previous layer's activities, detached
            h = self._layers[index][1](self._layers[index][0](u))
            losses.append(self._learn(index, h))
        forward = (2 + self._classes * (self.negatives == "hard")) * n
        return StepStats(loss=torch.stack(losses).sum(), forward_passes=forward, backward_passes=2 * n,
                         extra_flops=self._extra_flops[0] + n * self._extra_flops[1], metrics={"lr": lr})

    def eval_model(self) -> nn.Module:
        return self._classifier

    @classmethod
    def wrap_eval_model(cls, model: nn.Module, n_classes: int, first: int) -> nn.Module:
        """The goodness classifier around a rebuilt mlp: how `learnbench.load_model` restores a saved trial."""
        return GoodnessClassifier(model, n_classes, first)

    def _learn(self, index: int, h: Tensor) -> Tensor:
        """One optimizer step of layer `index` on its local loss from its activities h [2B, H]; the loss, detached."""
        loss = self.local_loss(h.square().sum(1), h.shape[1])
        optimizer = self._optimizers[index]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if self._schedulers:
            self._schedulers[index].step()
        return loss.detach()

    def local_loss(self, goodness: Tensor, width: int) -> Tensor:
        """A layer's loss from the goodness [2B] of its positive (first half) and negative passes."""
        positive, negative = (goodness / width).chunk(2)
        if self.loss == "symba":
            return F.softplus(-self.symba_alpha * (positive - negative)).mean()
        z_positive = (positive - self.threshold) / self.temperature  # log-odds of "positive"
        z_negative = (negative - self.threshold) / self.temperature
        return torch.cat([F.softplus(-z_positive), F.softplus(z_negative)]).mean()

    def _wrong_labels(self, x: Tensor, y: Tensor, image: Tensor, columns: Tensor) -> Tensor:
        """One wrong label per example [B] (the module docstring's `negatives`)."""
        if self.negatives == "random":  # y + k mod C, k uniform in 1..C-1
            shift = torch.randint(1, self._classes, y.shape, generator=self._generator, device=y.device)
            return (y + shift) % self._classes
        with torch.no_grad():
            if self.negatives == "hard-first":
                h = self._layers[0][1](image.unsqueeze(1) + columns)  # [B, C, H]
                per_unit = h.square().mean(2)  # [B, C]
            else:
                per_unit = torch.stack(candidate_goodness(self._classifier.blocks, x, self._classes)
                                       [self._first_eval:]).sum(0)  # [B, C], accumulated over the layers used
            logits = (per_unit / self.temperature).masked_fill(F.one_hot(y, self._classes).bool(), float("-inf"))
            # double: log-odds gaps of a few hundred underflow in a float softmax
            probs = torch.softmax(logits.double(), dim=1)
            return torch.multinomial(probs, 1, generator=self._generator).squeeze(1)

    def _cooldown(self, step: int) -> float:
        """1 for the first half of the horizon, then a linear fall to 0 at its end."""
        half = self.horizon_steps / 2
        return 1.0 if step < half else max(0.0, (self.horizon_steps - step) / half)

    def _declared_flops(self, model: MLP) -> tuple[float, float]:
        """extra_flops per step as (fixed, per example), by the module docstring's formula."""
        widths = [linear.out_features for linear, _ in self._layers]
        per_example = 2 * sum(5 * h + 8 for h in widths)  # two passes
        c, first = self._classes, self._layers[0][0]
        if self.negatives == "hard":
            per_example += c * sum(2 * h + 3 for h in widths) + 4 * c
        elif self.negatives == "hard-first":
            per_example += c * (2 * first.in_features * first.out_features + 2 * widths[0] + 3) + 4 * c
        return float(sum(optimizer_flops(opt) for opt in self._optimizers)), float(per_example)
