"""Backpropagation (Rumelhart, Hinton & Williams 1986) with the optimizers and schedules of `torch.optim`.

This is the file to copy when writing a new trainer: hyper-parameters as dataclass fields, each with a one-line
docstring and its published default; `setup` validates and builds state; `step` does one minibatch; `eval_model`
returns the plain module. The runner owns everything else (batches, budget, clock, evaluation, seeding).

Cost: the runner charges each step B forward and B backward passes of the model (its dense FLOPs per example,
`learnbench.cost`); the work outside the model declared in `StepStats.extra_flops` is the optimizer's update
(`learnbench.cost.optimizer_flops`: e.g. Adam 14 FLOPs per parameter) plus, with `grad_clip`, the global norm
and the rescaling (3 FLOPs per parameter: square, add, multiply).

Second order: `optimizer = "lbfgs"` (`torch.optim.LBFGS` with its closure: each step runs up to `max_iter`
iterations, and every loss-and-gradient evaluation in them, the strong-Wolfe line search's included, is counted as
B forward and B backward passes; `lbfgs_flops` declares its vector work). L-BFGS is a full- or large-batch method:
its curvature pairs and line search assume the same loss at every evaluation, so give it large batches (the
`backprop-variants` suite uses 2,048). `optimizer = "kfac"`: K-FAC's natural gradient on SGD with momentum
(`kfac.py`: the factors' extra forward and backward pass every `factor_every` steps are counted as passes, the
factor, eigendecomposition and preconditioning work as declared FLOPs).

Defaults: Adam (Kingma & Ba 2015: lr 1e-3, betas 0.9/0.999, eps 1e-8), batch 128. `lr = None` picks the optimizer's
published default (see `DEFAULT_LR`). The feedback-alignment trainers subclass it and reuse its optimizer, schedule
and step on a converted model (`feedback_training.train_with_rule`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

from learnbench.cost import optimizer_flops
from learnbench.search_space import Dimension, LogUniform
from learnbench.spec import Batch, StepStats, TaskInfo

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad", "lbfgs", "kfac")
SCHEDULES = ("constant", "cosine", "onecycle", "step")
# Published / library defaults: Adam & AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019), RMSprop (torch's 1e-2),
# Adagrad (Duchi et al. 2011, torch's 1e-2), plain and momentum SGD 0.1 (the usual MNIST/ImageNet base rate).
# L-BFGS: 1, the full quasi-Newton step its line search starts from (Nocedal & Wright 2006; torch's default). K-FAC:
# 0.01 with momentum 0.9 under its KL clip (the widely used K-FAC implementation of Wang et al.,
# alecwangcq/KFAC-Pytorch).
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.1, "nesterov": 0.1, "adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-2,
              "adagrad": 1e-2, "lbfgs": 1.0, "kfac": 1e-2}
DEFAULT_WEIGHT_DECAY = {"adamw": 1e-2}  # AdamW's decoupled decay default; every other optimizer: 0
ACTS_WITH = {  # hyper-parameter -> the optimizers or schedules it acts with (`hparams_in_effect`; `make_optimizer`)
    "betas": ("adam", "adamw"), "eps": ("adam", "adamw", "rmsprop"),
    "momentum": ("momentum", "nesterov", "rmsprop", "kfac"),
    "weight_decay": tuple(o for o in OPTIMIZERS if o != "lbfgs"),
    **dict.fromkeys(("history_size", "max_iter", "line_search"), ("lbfgs",)),
    **dict.fromkeys(("damping", "fisher", "factor_every", "inverse_every", "factor_decay", "kl_clip"), ("kfac",)),
    "horizon_steps": ("cosine", "onecycle"), "step_every": ("step",), "step_gamma": ("step",)}


@dataclass(eq=False)
class Backprop:
    """Minibatch backpropagation with a `torch.optim` optimizer."""

    name: ClassVar[str] = "backprop"
    true_gradient: ClassVar[bool] = True
    """Whether `step` descends the loss's true gradient (False for the feedback-alignment family: no K-FAC there)."""

    batch_size: int = 128
    """Examples per step."""
    optimizer: str = "adam"
    """One of sgd, momentum, nesterov, adam, adamw, rmsprop, adagrad, lbfgs (quasi-Newton: give it large batches),
    kfac (natural gradient, `kfac.py`)."""
    lr: float | None = None
    """Peak learning rate; None takes the optimizer's published default (DEFAULT_LR)."""
    momentum: float | None = None
    """Momentum coefficient; None: 0.9 for `momentum` and `nesterov` (Sutskever et al. 2013), 0 for `rmsprop`."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW moment decay rates."""
    eps: float = 1e-8
    """Adam/AdamW/RMSprop denominator epsilon."""
    weight_decay: float | None = None
    """L2 penalty (decoupled for AdamW); None: 0.01 for adamw, 0 otherwise."""
    schedule: str = "constant"
    """Learning-rate schedule: constant, cosine (to 0), onecycle (Smith 2018), step."""
    horizon_steps: int | None = None
    """Steps the cosine/onecycle schedule spans; None lets the runner fill it from a step or epoch budget."""
    step_every: int = 1000
    """`step` schedule: steps between decays."""
    step_gamma: float = 0.1
    """`step` schedule: decay factor."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing (Szegedy et al. 2016); 0 is plain cross-entropy."""
    amp: bool = False
    """bfloat16 autocast for the forward pass (CUDA only)."""
    checkpoint_segments: int = 0
    """Activation checkpointing (Chen et al. 2016, torch.utils.checkpoint): keep only this many segments' inputs
    and recompute the rest in the backward pass (same gradients, about one more forward); 0 keeps everything."""
    history_size: int = 100
    """lbfgs: curvature pairs kept (torch.optim.LBFGS's default)."""
    max_iter: int = 20
    """lbfgs: quasi-Newton iterations per step, each one or more loss and gradient evaluations of the batch."""
    line_search: str | None = "strong_wolfe"
    """lbfgs: "strong_wolfe" (Nocedal & Wright 2006, Alg. 3.5) or None (fixed steps of lr)."""
    damping: float = 1e-3
    """kfac: Tikhonov damping added to the Kronecker-factored Fisher's eigenvalues."""
    fisher: str = "mc"
    """kfac: "mc" (one label drawn from the model per example, Martens & Grosse 2015) or "type-2" (the exact
    expectation over labels: one backward per class)."""
    factor_every: int = 10
    """kfac: steps between updates of the Kronecker factors (each costs one forward and one backward of the batch)."""
    inverse_every: int = 100
    """kfac: steps between eigendecompositions of the factors."""
    factor_decay: float = 0.95
    """kfac: running-average decay of the factors (Martens & Grosse 2015)."""
    kl_clip: float = 1e-3
    """kfac: bound on lr^2 g^T F^-1 g, the update's predicted KL change (Ba et al. 2017); 0 disables it."""

    # What `learnbench tune` searches, as declared for the default optimizer, Adam; `adjust_search_space` moves the
    # learning rate to the entry's optimizer (SGD's rates lie higher: AlgoPerf's Nesterov baseline searches [2e-2, 5]).
    search_space: ClassVar[dict[str, Dimension]] = {
        # AlgoPerf's baseline spaces for Adam-type optimizers (mlcommons/algorithmic-efficiency: the NAdamW
        # baseline and the MNIST workload): learning rate log-uniform in [1e-4, 1e-2], around Adam's default 1e-3.
        "lr": LogUniform(1e-4, 1e-2),
        # AlgoPerf tunes only decoupled decay (AdamW, [5e-3, 1]) and SGD's L2 ([1e-7, 5e-5]); Adam's coupled L2 has
        # no published range: a decade either side of the usual image-classifier L2, 1e-4 (He et al. 2016, ResNet)
        # to 5e-4 (Zagoruyko & Komodakis 2016, WRN). Log-uniform, so the default 0 is not in it.
        "weight_decay": LogUniform(1e-5, 5e-3),
    }

    @classmethod
    def adjust_search_space(cls, space: dict[str, Dimension], hparams: Mapping[str, Any]) -> dict[str, Dimension]:
        """The declared learning-rate range is for Adam; another optimizer's is it scaled by the ratio of the two
        published defaults (`DEFAULT_LR`): with the declared [1e-4, 1e-2], SGD's [1e-2, 1], RMSprop's and
        Adagrad's [1e-3, 1e-1]."""
        scale = DEFAULT_LR.get(hparams.get("optimizer"), DEFAULT_LR["adam"]) / DEFAULT_LR["adam"]
        lr = space.get("lr")
        if isinstance(lr, LogUniform) and scale != 1:
            space["lr"] = LogUniform(lr.low * scale, lr.high * scale)
        if hparams.get("optimizer") == "kfac" and "damping" not in space:
            # K-FAC's damping decides how far its step trusts the curvature: from a decade below the 1e-3 default
            # (Wang et al.'s KFAC-Pytorch) to 1, the grid the backprop-variants suite screened (it keeps 0.1: at
            # 1e-3 the first layer's tiny output-gradient factor is inverted almost undamped and training stalls).
            space["damping"] = LogUniform(1e-4, 1.0)
        return space

    @classmethod
    def hparams_in_effect(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """These hyper-parameters without those that do not act on the entry (L-BFGS's history or Adam's betas with
        K-FAC, a step schedule's interval under cosine): what the report's table of algorithms shows."""
        chosen = {hparams.get("optimizer"), hparams.get("schedule")}
        return {key: value for key, value in hparams.items() if key not in ACTS_WITH or chosen & set(ACTS_WITH[key])}

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self.validate(task)
        self.build_state(model, task, generator=generator)

    def build_state(self, model: nn.Module, task: TaskInfo, *, generator: torch.Generator | None = None,
                    evaluated: nn.Module | None = None,
                    after_optimizer_step: Callable[[torch.optim.Optimizer], None] | None = None,
                    extra_flops: float = 0.0, metrics: Callable[[], dict[str, Any]] | None = None) -> None:
        """Optimizer, schedule, checkpoint stages and declared FLOPs for training `model`, the hyper-parameters
        already validated. A trainer that transforms the model first (the feedback-alignment family, through
        `feedback_training.train_with_rule`) passes the plain module `eval_model()` returns (`evaluated`), work to
        run after every optimizer step, that work's FLOPs per step, and values of its own to report each step
        (`StepStats.metrics`, e.g. Kolen-Pollack's B-W distance). `generator`: K-FAC's label draws."""
        self._model = model.train()
        self._evaluated = model if evaluated is None else evaluated
        self._device_type = task.device.type
        self._optimizer = make_optimizer(self, [p for p in model.parameters() if p.requires_grad], task.device)
        self._steps = 0
        self._kfac = None
        if self.optimizer == "kfac":
            from learnbench.algorithms.kfac import KFACPreconditioner

            self._kfac = KFACPreconditioner(model, task.input_shape, self.damping, self.factor_decay, self.kl_clip,
                                            generator, self.fisher)
            self._curvature_backwards = task.n_classes if self.fisher == "type-2" else 1
        if after_optimizer_step is not None:
            self._optimizer.register_step_post_hook(lambda optimizer, args, kwargs: after_optimizer_step(optimizer))
        self._scheduler = make_scheduler(self, self._optimizer)
        self._metrics = metrics or dict
        self._stages = checkpoint_stages(model, self.checkpoint_segments) if self.checkpoint_segments else None
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self._trained = trained
        update_flops = 0 if self.optimizer == "lbfgs" else optimizer_flops(self._optimizer)  # lbfgs: per step below
        self._extra_flops = update_flops + (3 * trained if self.grad_clip > 0 else 0) + extra_flops
        if self._kfac is not None:
            self._extra_flops += self._kfac.step_flops(self.batch_size, self.factor_every, self.inverse_every)

    @property
    def supports_data_parallel(self) -> bool:
        """Whether N processes may each step on a shard (`learnbench.data_parallel`): a first-order optimizer on
        the true gradient (L-BFGS's line search and K-FAC's factors would differ between the shards)."""
        return self.true_gradient and self.optimizer not in ("lbfgs", "kfac") and type(self).step is Backprop.step

    def validate(self, task: TaskInfo) -> None:
        """Check hyper-parameter values; raises ValueError naming the bad one."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}; got {self.schedule!r}")
        if self.schedule in ("cosine", "onecycle") and not self.horizon_steps:
            raise ValueError(f"schedule {self.schedule!r} needs horizon_steps (or a step/epoch budget)")
        if self.checkpoint_segments < 0:
            raise ValueError(f"checkpoint_segments must be >= 0; got {self.checkpoint_segments}")
        if self.batch_size <= 0 or (self.lr is not None and self.lr <= 0):
            raise ValueError("batch_size and lr must be positive")
        if self.amp and task.device.type != "cuda":
            raise ValueError("amp (bfloat16 autocast) is only supported on CUDA")
        if self.optimizer == "lbfgs" and (self.grad_clip > 0 or self.amp or self.checkpoint_segments):
            raise ValueError("optimizer 'lbfgs' takes no grad_clip, amp or checkpoint_segments")
        if self.line_search not in ("strong_wolfe", None):
            raise ValueError(f"line_search must be 'strong_wolfe' or None; got {self.line_search!r}")
        if min(self.history_size, self.max_iter, self.factor_every, self.inverse_every) < 1:
            raise ValueError("history_size, max_iter, factor_every and inverse_every must be >= 1")
        if self.fisher not in ("mc", "type-2"):
            raise ValueError(f"fisher must be 'mc' or 'type-2'; got {self.fisher!r}")
        if self.damping <= 0 or not 0 <= self.factor_decay < 1 or self.kl_clip < 0:
            raise ValueError("damping must be > 0, factor_decay in [0, 1) and kl_clip >= 0")
        if self.optimizer == "kfac" and importlib.util.find_spec("curvlinops") is None:
            raise ValueError("optimizer 'kfac' needs curvlinops (pip install curvlinops-for-pytorch)")
        if self.optimizer == "kfac" and not self.true_gradient:
            raise ValueError(f"optimizer 'kfac' preconditions the true gradient's curvature; {self.name} sends "
                             "other errors backward")

    def step(self, batch: Batch) -> StepStats:
        if not self._model.training:  # the runner switched to eval mode for evaluation
            self._model.train()
        self._steps += 1
        if self.optimizer == "lbfgs":
            return self._lbfgs_step(batch)
        n = batch.y.shape[0]
        curvature_forwards = curvature_backwards = 0
        if self._kfac is not None and (self._steps - 1) % self.factor_every == 0:
            self._kfac.update_factors(batch.x)  # one more forward and one (or C) backward of the batch
            curvature_forwards, curvature_backwards = n, n * self._curvature_backwards
            if (self._steps - 1) % self.inverse_every == 0 or self._steps == 1:
                self._kfac.update_inverses()
        if self.amp:
            with torch.autocast(self._device_type, dtype=torch.bfloat16):
                logits = self._forward(batch.x).float()  # [B, C]
        else:
            logits = self._forward(batch.x)  # [B, C]
        loss = F.cross_entropy(logits, batch.y, label_smoothing=self.label_smoothing)
        lr = self.current_lr()
        self.descend(loss)
        # loss stays a tensor: reading it here would be a host sync every step on CUDA.
        return StepStats(loss=loss.detach(), forward_passes=n + curvature_forwards,
                         backward_passes=n + curvature_backwards, extra_flops=self._extra_flops,
                         metrics={"lr": lr, **self._metrics()})

    def _lbfgs_step(self, batch: Batch) -> StepStats:
        """One `torch.optim.LBFGS` step on the batch: up to `max_iter` iterations, each evaluating the loss and its
        gradient on all B examples once or more (the line search); every evaluation is B forward and B backward
        passes."""
        lr = self.current_lr()
        state = self._optimizer.state[self._optimizer.param_groups[0]["params"][0]]
        iterations_before = state.get("n_iter", 0)
        loss, evaluations = lbfgs_step(self._optimizer, lambda: F.cross_entropy(
            self._forward(batch.x), batch.y, label_smoothing=self.label_smoothing))
        if self._scheduler is not None:
            self._scheduler.step()
        n = batch.y.shape[0] * evaluations
        work = lbfgs_flops(self._trained, state["n_iter"] - iterations_before, len(state.get("old_dirs", [])),
                           evaluations)
        return StepStats(loss=loss.detach(), forward_passes=n, backward_passes=n,
                         extra_flops=self._extra_flops + work, metrics={"lr": lr, **self._metrics()})

    def current_lr(self) -> float:
        """The learning rate the next optimizer step applies (the schedule's current value; a Python float)."""
        return float(self._optimizer.param_groups[0]["lr"])

    def descend(self, loss: torch.Tensor) -> None:
        """One optimizer step on `loss`: gradients, optional clipping, the update, the schedule."""
        self._optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self._model.parameters(), self.grad_clip, foreach=True)
        if self._kfac is not None:
            self._kfac.precondition(self.current_lr())
        self._optimizer.step()
        if self._scheduler is not None:
            self._scheduler.step()

    def eval_model(self) -> nn.Module:
        return self._evaluated

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._stages is None:
            return self._model(x)
        # non-reentrant: works with autocast, custom autograd functions (feedback layers) and inputs without grad
        return checkpoint_sequential(self._stages, self.checkpoint_segments, x, use_reentrant=False)


def checkpoint_stages(model: nn.Module, segments: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The model's forward as a chain of functions to checkpoint: an `nn.Sequential`'s layers, or what the model's
    `stages()` returns (the built-in models have one). ValueError for models checkpointing would change."""
    if isinstance(model, nn.Sequential):
        stages = list(model)
    elif callable(getattr(model, "stages", None)):
        stages = model.stages()
    else:
        raise ValueError(f"checkpoint_segments needs an nn.Sequential or a model with stages() (the built-in "
                         f"mlp, resmlp, cnn, lenet); {type(model).__name__} has neither")
    if segments > len(stages):
        raise ValueError(f"checkpoint_segments {segments} exceeds the model's {len(stages)} stages")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError("checkpoint_segments cannot be used with BatchNorm: the recomputed forward would update "
                         "the running statistics twice")
    if model._forward_hooks or model._forward_pre_hooks:  # dfa catches the output error with one
        raise ValueError("checkpoint_segments cannot be used on a model with forward hooks (dfa's output-error "
                         "hook among them): the checkpointed stages bypass the model's own call")
    return stages


def make_optimizer(hp: Backprop, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """The `torch.optim` optimizer named by `hp.optimizer`; multi-tensor (foreach) or fused kernels, so one step
    is a few kernel launches rather than one per parameter."""
    lr = hp.lr if hp.lr is not None else DEFAULT_LR[hp.optimizer]
    decay = hp.weight_decay if hp.weight_decay is not None else DEFAULT_WEIGHT_DECAY.get(hp.optimizer, 0.0)
    name = hp.optimizer
    if name == "lbfgs":  # one parameter group, no foreach kernels (torch's implementation flattens the parameters)
        return torch.optim.LBFGS(params, lr=lr, max_iter=hp.max_iter, history_size=hp.history_size,
                                 line_search_fn=hp.line_search)
    if name in ("sgd", "momentum", "nesterov", "kfac"):  # K-FAC's natural gradient goes to SGD with momentum
        momentum = 0.0 if name == "sgd" else (0.9 if hp.momentum is None else hp.momentum)
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=name == "nesterov",
                               weight_decay=decay, foreach=True)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        # Fused Adam exists for CPU (torch >= 2.4) and CUDA; it does the whole update in one kernel.
        return cls(params, lr=lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=decay, fused=True)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=hp.momentum or 0.0,
                                   eps=hp.eps, weight_decay=decay, foreach=True)
    return torch.optim.Adagrad(params, lr=lr, weight_decay=decay, foreach=True)


def lbfgs_step(optimizer: torch.optim.LBFGS, loss_fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """One L-BFGS step on `loss_fn` (a fresh forward each call): the loss before the step and how many loss and
    gradient evaluations the closure made (what the cost counts)."""
    evaluations = 0

    def closure() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    return loss, evaluations


def lbfgs_flops(parameters: int, iterations: int, history: int, evaluations: int) -> float:
    """Work of one L-BFGS step outside the model, per parameter: each iteration's two-loop recursion (a dot product
    and an axpy per stored pair in each loop: 8 x history) plus 12 for the direction, the new curvature pair and the
    update; each loss evaluation of the line search 4 more (a dot product and an axpy)."""
    return float(parameters * (iterations * (8 * history + 12) + 4 * evaluations))


def make_scheduler(hp: Backprop, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The `torch.optim.lr_scheduler` for `hp.schedule`, stepped once per training step; None for constant."""
    if hp.schedule == "constant":
        return None
    if hp.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp.horizon_steps)
    if hp.schedule == "onecycle":
        peak = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=hp.horizon_steps + 1)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.step_every, gamma=hp.step_gamma)
